package bbs

import (
	"context"
	"fmt"
	"slices"
	"time"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sync/errgroup"
	"google.golang.org/protobuf/proto"
)

// actualsPerTxn: each new instance is two puts (record + queue key).
func (s *Store) actualsPerTxn() int32 { return int32(s.commit.maxOps / 2) }

func (s *Store) newActual(guid, domain string, idx int32) *basinv1.ActualLRP {
	return &basinv1.ActualLRP{
		Key:           &basinv1.ActualLRPKey{ProcessGuid: guid, Index: idx, Domain: domain},
		State:         stateUnclaimed,
		SinceUnixNano: s.now().UnixNano(),
	}
}

// actualCreateOps returns the puts that create UNCLAIMED instances [from, to),
// and their values to note in the view once written.
func (s *Store) actualCreateOps(guid, domain string, from, to int32) (ops []clientv3.Op, writes []string, cmps []clientv3.Cmp, vals [][]byte) {
	for i := from; i < to; i++ {
		k := s.keys.Actual(guid, i)
		q := s.keys.Unclaimed(guid, i)
		v := marshal(s.newActual(guid, domain, i))
		vals = append(vals, v)
		ops = append(ops, clientv3.OpPut(k, string(v)), clientv3.OpPut(q, ""))
		writes = append(writes, k, q)
		cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(k), "=", 0))
	}
	return ops, writes, cmps, vals
}

// DesireLRP stores a new desired LRP and creates its UNCLAIMED instances and
// their queue keys. The LRP and its first instances are one transaction; the
// rest follow in batches within etcd's per-transaction limit. If the BBS dies
// between batches the converger creates what is missing.
func (s *Store) DesireLRP(ctx context.Context, sched *basinv1.DesiredLRPSchedule, run *basinv1.DesiredLRPRun) (*basinv1.DesiredLRP, error) {
	sched = proto.Clone(sched).(*basinv1.DesiredLRPSchedule)
	now := s.now().UnixNano()
	sched.CreatedAtUnixNano, sched.UpdatedAtUnixNano = now, now
	guid := sched.GetProcessGuid()
	sk, rk := s.keys.DesiredSchedule(guid), s.keys.DesiredRun(guid)
	sval, rval := marshal(sched), marshal(run)

	first := min(sched.GetInstances(), s.actualsPerTxn()-1)
	ops, writes, _, vals := s.actualCreateOps(guid, sched.GetDomain(), 0, first)
	item := &txnItem{
		cmps:   []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(sk), "=", 0)},
		ops:    append([]clientv3.Op{clientv3.OpPut(sk, string(sval)), clientv3.OpPut(rk, string(rval))}, ops...),
		writes: append([]string{sk, rk}, writes...),
	}
	res := s.commit.do(ctx, item)
	if res.err != nil {
		return nil, fmt.Errorf("desire LRP %s: %w", guid, res.err)
	}
	if !res.succeeded {
		return nil, fmt.Errorf("desire LRP %s: %w", guid, ErrAlreadyExists)
	}
	s.desired.noteWrite(sk, sval, res.rev, false)
	s.desired.noteWrite(rk, rval, res.rev, false)
	s.noteCreated(guid, 0, vals, res.rev)
	if err := s.createActuals(ctx, guid, sched.GetDomain(), first, sched.GetInstances()); err != nil {
		return nil, err
	}
	return &basinv1.DesiredLRP{Schedule: sched, Run: run, Revision: res.rev}, nil
}

// createActuals creates instances [from, to) that do not exist yet.
func (s *Store) createActuals(ctx context.Context, guid, domain string, from, to int32) error {
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	per := s.actualsPerTxn()
	for start := from; start < to; start += per {
		end := min(start+per, to)
		g.Go(func() error {
			ops, writes, cmps, vals := s.actualCreateOps(guid, domain, start, end)
			res := s.commit.do(gctx, &txnItem{cmps: cmps, ops: ops, writes: writes})
			if res.err != nil {
				return fmt.Errorf("create instances %d-%d of %s: %w", start, end-1, guid, res.err)
			}
			if res.succeeded {
				s.noteCreated(guid, start, vals, res.rev)
				return nil
			}
			// Some already exist: create the others one by one.
			for i := start; i < end; i++ {
				ops, writes, cmps, vals := s.actualCreateOps(guid, domain, i, i+1)
				r := s.commit.do(gctx, &txnItem{cmps: cmps, ops: ops, writes: writes})
				if r.err != nil {
					return fmt.Errorf("create instance %d of %s: %w", i, guid, r.err)
				}
				if r.succeeded {
					s.noteCreated(guid, i, vals, r.rev)
				}
			}
			return nil
		})
	}
	return g.Wait()
}

func (s *Store) noteCreated(guid string, from int32, vals [][]byte, rev int64) {
	for i, v := range vals {
		s.actual.noteWrite(s.keys.Actual(guid, from+int32(i)), v, rev, false)
	}
}

// retireFrom removes every instance of guid with index >= from.
func (s *Store) retireFrom(ctx context.Context, guid string, from int32, fence *basinv1.Fence) error {
	actuals, err := s.ListActualLRPs(ctx, ActualFilter{ProcessGUID: guid})
	if err != nil {
		return err
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(64)
	for _, a := range actuals {
		if a.GetKey().GetIndex() < from {
			continue
		}
		g.Go(func() error {
			err := s.removeActual(gctx, guid, a.GetKey().GetIndex(), nil, fence, "retire")
			if isNotFound(err) {
				return nil
			}
			return err
		})
	}
	return g.Wait()
}

// getDesired reads both parts of a desired LRP in one transaction.
func (s *Store) getDesired(ctx context.Context, guid string) (d *basinv1.DesiredLRP, schedRev, runRev int64, err error) {
	sk, rk := s.keys.DesiredSchedule(guid), s.keys.DesiredRun(guid)
	resp, err := s.cli.Txn(ctx).Then(clientv3.OpGet(sk), clientv3.OpGet(rk)).Commit()
	if err != nil {
		return nil, 0, 0, fmt.Errorf("get desired LRP %s: %w", guid, err)
	}
	sr, rr := resp.Responses[0].GetResponseRange(), resp.Responses[1].GetResponseRange()
	if len(sr.Kvs) == 0 || len(rr.Kvs) == 0 {
		return nil, 0, 0, fmt.Errorf("desired LRP %s: %w", guid, ErrNotFound)
	}
	d = decodeDesiredEntries(&kvEntry{val: sr.Kvs[0].Value, modRev: sr.Kvs[0].ModRevision}, &kvEntry{val: rr.Kvs[0].Value, modRev: rr.Kvs[0].ModRevision})
	if d == nil {
		return nil, 0, 0, fmt.Errorf("decode desired LRP %s: corrupt record", guid)
	}
	return d, sr.Kvs[0].ModRevision, rr.Kvs[0].ModRevision, nil
}

// GetDesiredLRP reads one desired LRP.
func (s *Store) GetDesiredLRP(ctx context.Context, guid string) (*basinv1.DesiredLRP, error) {
	d, _, _, err := s.getDesired(ctx, guid)
	return d, err
}

// DesiredUpdate lists the fields UpdateDesiredLRP changes; nil means unchanged.
type DesiredUpdate struct {
	Instances    *int32
	Routes       []*basinv1.Route
	RoutesSet    bool
	Env          []*basinv1.EnvVar
	EnvSet       bool
	Droplet      *basinv1.DropletRef
	Annotation   *string
	StartCommand *string
	// IfRevision, when non-zero, makes the update conditional on the LRP's
	// revision; a mismatch is ErrConflict.
	IfRevision int64
}

// UpdateDesiredLRP applies u in one transaction guarded by both parts' mod
// revisions, retrying on a concurrent change unless u.IfRevision pins the
// revision. Then it creates or retires instances to match a new count.
func (s *Store) UpdateDesiredLRP(ctx context.Context, guid string, u DesiredUpdate) (*basinv1.DesiredLRP, error) {
	for range maxAttempts {
		d, schedRev, runRev, err := s.getDesired(ctx, guid)
		if err != nil {
			return nil, err
		}
		if u.IfRevision != 0 && u.IfRevision != schedRev {
			return nil, fmt.Errorf("update desired LRP %s: %w: revision is %d, not %d", guid, ErrConflict, schedRev, u.IfRevision)
		}
		oldInstances := d.GetSchedule().GetInstances()
		sched, run := d.GetSchedule(), d.GetRun()
		if u.Instances != nil {
			sched.Instances = *u.Instances
		}
		if u.RoutesSet {
			sched.Routes = u.Routes
		}
		if u.Annotation != nil {
			sched.Annotation = *u.Annotation
		}
		if u.EnvSet {
			run.Env = u.Env
		}
		if u.Droplet != nil {
			run.Droplet = u.Droplet
		}
		if u.StartCommand != nil {
			run.StartCommand = *u.StartCommand
		}
		sched.UpdatedAtUnixNano = s.now().UnixNano()
		sk, rk := s.keys.DesiredSchedule(guid), s.keys.DesiredRun(guid)
		sval, rval := marshal(sched), marshal(run)
		res := s.commit.do(ctx, &txnItem{
			cmps: []clientv3.Cmp{
				clientv3.Compare(clientv3.ModRevision(sk), "=", schedRev),
				clientv3.Compare(clientv3.ModRevision(rk), "=", runRev),
			},
			ops:    []clientv3.Op{clientv3.OpPut(sk, string(sval)), clientv3.OpPut(rk, string(rval))},
			elses:  []clientv3.Op{clientv3.OpGet(sk, clientv3.WithKeysOnly())},
			writes: []string{sk, rk},
		})
		if res.err != nil {
			return nil, fmt.Errorf("update desired LRP %s: %w", guid, res.err)
		}
		if !res.succeeded {
			s.metrics.conflicts.Inc()
			if u.IfRevision != 0 {
				return nil, fmt.Errorf("update desired LRP %s: %w: it changed concurrently", guid, ErrConflict)
			}
			continue
		}
		s.desired.noteWrite(sk, sval, res.rev, false)
		s.desired.noteWrite(rk, rval, res.rev, false)
		if n := sched.GetInstances(); n > oldInstances {
			if err := s.createActuals(ctx, guid, sched.GetDomain(), oldInstances, n); err != nil {
				return nil, err
			}
		} else if n < oldInstances {
			if err := s.retireFrom(ctx, guid, n, nil); err != nil {
				return nil, err
			}
		}
		return &basinv1.DesiredLRP{Schedule: sched, Run: run, Revision: res.rev}, nil
	}
	return nil, fmt.Errorf("update desired LRP %s: %w after %d attempts", guid, ErrConflict, maxAttempts)
}

// RemoveDesiredLRP deletes a desired LRP and retires all its instances.
func (s *Store) RemoveDesiredLRP(ctx context.Context, guid string) error {
	sk, rk := s.keys.DesiredSchedule(guid), s.keys.DesiredRun(guid)
	resp, err := s.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(sk), ">", 0)).
		Then(clientv3.OpDelete(sk), clientv3.OpDelete(rk)).
		Commit()
	if err != nil {
		return fmt.Errorf("remove desired LRP %s: %w", guid, err)
	}
	if !resp.Succeeded {
		return fmt.Errorf("desired LRP %s: %w", guid, ErrNotFound)
	}
	s.desired.noteWrite(sk, nil, resp.Header.Revision, true)
	s.desired.noteWrite(rk, nil, resp.Header.Revision, true)
	return s.retireFrom(ctx, guid, 0, nil)
}

// ListDesiredLRPs reads every desired LRP, optionally of one domain.
func (s *Store) ListDesiredLRPs(ctx context.Context, domain string) ([]*basinv1.DesiredLRP, error) {
	scheds := map[string]*kvEntry{}
	runs := map[string]*kvEntry{}
	var order []string
	if _, err := listPrefix(ctx, s.cli, s.keys.DesiredPrefix(), 0, func(kv kvPair) {
		guid, part, ok := s.keys.DesiredPart(kv.key)
		if !ok {
			return
		}
		e := &kvEntry{val: kv.val, modRev: kv.modRev}
		switch part {
		case "schedule":
			scheds[guid] = e
			order = append(order, guid)
		case "run":
			runs[guid] = e
		}
	}); err != nil {
		return nil, err
	}
	out := make([]*basinv1.DesiredLRP, 0, len(order))
	for _, guid := range order {
		d := decodeDesiredEntries(scheds[guid], runs[guid])
		if d == nil || (domain != "" && d.GetSchedule().GetDomain() != domain) {
			continue
		}
		out = append(out, d)
	}
	return out, nil
}

// ListDesiredLRPSchedules reads only the schedule parts, which is what the
// auctioneer and converger need.
func (s *Store) ListDesiredLRPSchedules(ctx context.Context, domain string) ([]*basinv1.DesiredLRPSchedule, error) {
	var out []*basinv1.DesiredLRPSchedule
	var decodeErr error
	if _, err := listPrefix(ctx, s.cli, s.keys.DesiredSchedulePrefix(), 0, func(kv kvPair) {
		sc := &basinv1.DesiredLRPSchedule{}
		if err := proto.Unmarshal(kv.val, sc); err != nil {
			decodeErr = fmt.Errorf("decode %s: %w", kv.key, err)
			return
		}
		if domain == "" || sc.GetDomain() == domain {
			out = append(out, sc)
		}
	}); err != nil {
		return nil, err
	}
	return out, decodeErr
}

// CreateMissingActualLRPs creates the UNCLAIMED instances of guid that are
// missing below its desired count, and returns their indices. Each creation
// is guarded by the desired schedule's revision (a concurrent scale-down
// wins) and by the caller's fence.
func (s *Store) CreateMissingActualLRPs(ctx context.Context, guid string, fence *basinv1.Fence) ([]int32, error) {
	d, schedRev, _, err := s.getDesired(ctx, guid)
	if err != nil {
		return nil, err
	}
	actuals, err := s.ListActualLRPs(ctx, ActualFilter{ProcessGUID: guid})
	if err != nil {
		return nil, err
	}
	have := make(map[int32]bool, len(actuals))
	for _, a := range actuals {
		have[a.GetKey().GetIndex()] = true
	}
	var created []int32
	sk := s.keys.DesiredSchedule(guid)
	for i := range d.GetSchedule().GetInstances() {
		if have[i] {
			continue
		}
		ops, writes, cmps, vals := s.actualCreateOps(guid, d.GetSchedule().GetDomain(), i, i+1)
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(sk), "=", schedRev))
		if fence != nil {
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(fence.GetKey()), "=", fence.GetCreateRevision()))
		}
		res := s.commit.do(ctx, &txnItem{cmps: cmps, ops: ops, writes: writes})
		if res.err != nil {
			return created, fmt.Errorf("create missing instance %d of %s: %w", i, guid, res.err)
		}
		if !res.succeeded {
			// Created meanwhile, scaled, or the fence is gone: the caller
			// sees the state on its next pass; a lost fence shows here.
			if fence != nil {
				if r, err := s.cli.Get(ctx, fence.GetKey(), clientv3.WithKeysOnly()); err == nil &&
					(len(r.Kvs) == 0 || r.Kvs[0].CreateRevision != fence.GetCreateRevision()) {
					return created, fmt.Errorf("create missing instances of %s: %w: %s is no longer held at create revision %d", guid, ErrFenceLost, fence.GetKey(), fence.GetCreateRevision())
				}
			}
			continue
		}
		s.noteCreated(guid, i, vals, res.rev)
		created = append(created, i)
	}
	return created, nil
}

// maxDesiredPerTxn keeps a batched read within etcd's per-txn op limit
// (two gets per LRP).
const maxDesiredPerTxn = 64

// GetDesiredLRPs reads the named desired LRPs, in batched transactions run
// concurrently; unknown guids are left out. A cell uses it to read every LRP
// of one Perform at once.
func (s *Store) GetDesiredLRPs(ctx context.Context, guids []string) ([]*basinv1.DesiredLRP, error) {
	chunks := slices.Collect(slices.Chunk(guids, maxDesiredPerTxn))
	found := make([][]*basinv1.DesiredLRP, len(chunks))
	g, gctx := errgroup.WithContext(ctx)
	for i, chunk := range chunks {
		g.Go(func() error {
			ops := make([]clientv3.Op, 0, 2*len(chunk))
			for _, guid := range chunk {
				ops = append(ops, clientv3.OpGet(s.keys.DesiredSchedule(guid)), clientv3.OpGet(s.keys.DesiredRun(guid)))
			}
			resp, err := s.cli.Txn(gctx).Then(ops...).Commit()
			if err != nil {
				return fmt.Errorf("get %d desired LRPs: %w", len(chunk), err)
			}
			for j := range chunk {
				sr, rr := resp.Responses[2*j].GetResponseRange(), resp.Responses[2*j+1].GetResponseRange()
				if len(sr.Kvs) == 0 || len(rr.Kvs) == 0 {
					continue
				}
				d := decodeDesiredEntries(&kvEntry{val: sr.Kvs[0].Value, modRev: sr.Kvs[0].ModRevision}, &kvEntry{val: rr.Kvs[0].Value, modRev: rr.Kvs[0].ModRevision})
				if d != nil {
					found[i] = append(found[i], d)
				}
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	return slices.Concat(found...), nil
}

// viewReadWait bounds how long a read at a minimum revision waits for the
// desired view to get there before it reads etcd instead.
const viewReadWait = time.Second

// GetDesiredLRPsAt is GetDesiredLRPs as of some revision >= minRev: from the
// watch-fed view once it holds every change up to minRev (a snapshot at the
// view's revision, so an LRP absent there is absent), or from etcd when the
// view does not get there within viewReadWait. minRev 0 reads etcd.
//
// The view's overlay of this process's own writes is left out. A DesireLRP
// through this process is in it before the watch delivers it, but a reader
// passing that write's revision (or a later one) waits for the watch
// anyway, and one passing an earlier revision may see the LRP or not.
// Mixed in, the overlay would show some LRPs at revisions others have not
// reached, and once it overflows and forgets keys at random, a schedule and
// a run of different writes.
func (s *Store) GetDesiredLRPsAt(ctx context.Context, guids []string, minRev int64) ([]*basinv1.DesiredLRP, error) {
	if minRev <= 0 || !s.desired.waitRevision(ctx, minRev, viewReadWait) {
		if minRev > 0 {
			s.metrics.desiredReads.WithLabelValues("etcd").Inc()
		}
		return s.GetDesiredLRPs(ctx, guids)
	}
	s.metrics.desiredReads.WithLabelValues("view").Inc()
	keys := make([]string, 0, 2*len(guids))
	for _, guid := range guids {
		keys = append(keys, s.keys.DesiredSchedule(guid), s.keys.DesiredRun(guid))
	}
	entries := s.desired.snapshot(keys)
	out := make([]*basinv1.DesiredLRP, 0, len(guids))
	for i := range guids {
		if d := decodeDesiredEntries(entries[2*i], entries[2*i+1]); d != nil {
			out = append(out, d)
		}
	}
	return out, nil
}
