package bbs

import (
	"context"
	"fmt"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"
)

const (
	stateUnclaimed = basinv1.ActualLRPState_ACTUAL_LRP_STATE_UNCLAIMED
	stateClaimed   = basinv1.ActualLRPState_ACTUAL_LRP_STATE_CLAIMED
	stateRunning   = basinv1.ActualLRPState_ACTUAL_LRP_STATE_RUNNING
	stateCrashed   = basinv1.ActualLRPState_ACTUAL_LRP_STATE_CRASHED
)

func stateName(s basinv1.ActualLRPState) string {
	switch s {
	case stateUnclaimed:
		return "UNCLAIMED"
	case stateClaimed:
		return "CLAIMED"
	case stateRunning:
		return "RUNNING"
	case stateCrashed:
		return "CRASHED"
	}
	return s.String()
}

func decodeActual(key string, cur record) (*basinv1.ActualLRP, error) {
	if !cur.exists {
		return nil, fmt.Errorf("actual LRP %s: %w", key, ErrNotFound)
	}
	a := &basinv1.ActualLRP{}
	if err := proto.Unmarshal(cur.val, a); err != nil {
		return nil, fmt.Errorf("decode actual LRP %s: %w", key, err)
	}
	a.Revision = cur.modRev
	return a, nil
}

func sameInstance(a *basinv1.ActualLRP, ik *basinv1.ActualLRPInstanceKey) bool {
	return a.GetInstanceKey().GetInstanceGuid() == ik.GetInstanceGuid() && a.GetInstanceKey().GetCellId() == ik.GetCellId()
}

func describe(a *basinv1.ActualLRP) string {
	if cell := a.GetInstanceKey().GetCellId(); cell != "" {
		return fmt.Sprintf("%s on cell %s (instance %s)", stateName(a.GetState()), cell, a.GetInstanceKey().GetInstanceGuid())
	}
	return stateName(a.GetState())
}

// stepFunc changes a decoded record and adds the index-key writes that go
// with it to e; noop=true writes nothing.
type stepFunc[T proto.Message] func(rec T, e *edits) (noop bool, err error)

// recordStep is the transition that decodes the record at key, lets fn
// change it, and puts it back with the writes fn adds. setRev sets the
// record's Revision field, which is filled from etcd and never stored.
func recordStep[T proto.Message](key string, decode func(string, record) (T, error), setRev func(T, int64), fn stepFunc[T]) transition {
	return func(cur record, p *plan) error {
		r, err := decode(key, cur)
		if err != nil {
			return err
		}
		// The record's put goes first, ahead of its index keys as before;
		// it is filled in once fn has changed the record.
		p.ops = append(p.ops, clientv3.Op{})
		p.writes = append(p.writes, key)
		noop, err := fn(r, &p.edits)
		if err != nil {
			return err
		}
		p.rec = r
		if noop {
			p.noop = true
			return nil
		}
		setRev(r, 0)
		p.val = marshal(r)
		p.ops[0] = clientv3.OpPut(key, string(p.val))
		return nil
	}
}

// recordTransition changes the record at key with fn in one guarded
// transaction (recordStep, mutate) and returns it as written.
func recordTransition[T proto.Message](ctx context.Context, s *Store, key string, fence *basinv1.Fence,
	decode func(string, record) (T, error), setRev func(T, int64), fn stepFunc[T]) (T, error) {
	var m mutation
	s.begin(&m, key, fence, recordStep(key, decode, setRev, fn))
	if err := s.finish(ctx, &m); err != nil {
		var zero T
		return zero, err
	}
	return recordOf(&m, setRev), nil
}

// recordOf is the record m's step decided on, at the revision m left it.
func recordOf[T proto.Message](m *mutation, setRev func(T, int64)) T {
	out := m.p.rec.(T)
	setRev(out, m.cur.modRev)
	return out
}

func setActualRev(a *basinv1.ActualLRP, rev int64) { a.Revision = rev }

// actualTransition is recordTransition for the instance guid/index.
func (s *Store) actualTransition(ctx context.Context, guid string, index int32, fence *basinv1.Fence, fn stepFunc[*basinv1.ActualLRP]) (*basinv1.ActualLRP, error) {
	return recordTransition(ctx, s, s.keys.Actual(guid, index), fence, decodeActual, setActualRev, fn)
}

// actualChange is one instance transition of a batch: its step comes from
// claimStep, startStep or crashStep, as the single calls' do.
type actualChange struct {
	key   *basinv1.ActualLRPKey
	fence *basinv1.Fence
	step  stepFunc[*basinv1.ActualLRP]
}

// applyActualChanges runs each change as its single call would (same guard,
// fence, retries and errors) but together (mutateAll): a cell's batch of
// claims and starts costs no goroutine per instance. Results are in order;
// out[i] is nil when errs[i] is set.
func (s *Store) applyActualChanges(ctx context.Context, cs []actualChange) (out []*basinv1.ActualLRP, errs []error) {
	ms := make([]mutation, len(cs))
	for i, c := range cs {
		key := s.keys.Actual(c.key.GetProcessGuid(), c.key.GetIndex())
		s.begin(&ms[i], key, c.fence, recordStep(key, decodeActual, setActualRev, c.step))
	}
	errs = s.mutateAll(ctx, ms)
	out = make([]*basinv1.ActualLRP, len(cs))
	for i := range ms {
		if errs[i] == nil {
			out[i] = recordOf(&ms[i], setActualRev)
		}
	}
	return out, errs
}

// ClaimActualLRP moves an UNCLAIMED instance to CLAIMED on the calling cell,
// taking it off the auction queue. Claiming again with the same instance key
// is a no-op, so a cell may retry.
func (s *Store) ClaimActualLRP(ctx context.Context, key *basinv1.ActualLRPKey, ik *basinv1.ActualLRPInstanceKey, fence *basinv1.Fence) (*basinv1.ActualLRP, error) {
	return s.actualTransition(ctx, key.GetProcessGuid(), key.GetIndex(), fence, s.claimStep(key, ik))
}

func (s *Store) claimStep(key *basinv1.ActualLRPKey, ik *basinv1.ActualLRPInstanceKey) stepFunc[*basinv1.ActualLRP] {
	guid, idx := key.GetProcessGuid(), key.GetIndex()
	return func(a *basinv1.ActualLRP, e *edits) (bool, error) {
		switch {
		case a.GetState() == stateUnclaimed:
		case (a.GetState() == stateClaimed || a.GetState() == stateRunning) && sameInstance(a, ik):
			return true, nil
		default:
			return false, fmt.Errorf("claim %s/%d for cell %s: %w: it is %s", guid, idx, ik.GetCellId(), ErrTransition, describe(a))
		}
		a.State = stateClaimed
		a.InstanceKey = proto.Clone(ik).(*basinv1.ActualLRPInstanceKey)
		a.NetInfo = nil
		a.SinceUnixNano = s.now().UnixNano()
		a.PlacementError = ""
		e.del(s.keys.Unclaimed(guid, idx))
		e.put(s.keys.CellIndex(ik.GetCellId(), guid, idx), "")
		return false, nil
	}
}

// StartActualLRP marks an instance RUNNING with its network address. Only the
// cell that claimed it may start it; a cell may also start an UNCLAIMED
// instance directly, claiming it in the same transaction.
func (s *Store) StartActualLRP(ctx context.Context, key *basinv1.ActualLRPKey, ik *basinv1.ActualLRPInstanceKey, net *basinv1.ActualLRPNetInfo, fence *basinv1.Fence) (*basinv1.ActualLRP, error) {
	return s.actualTransition(ctx, key.GetProcessGuid(), key.GetIndex(), fence, s.startStep(key, ik, net))
}

func (s *Store) startStep(key *basinv1.ActualLRPKey, ik *basinv1.ActualLRPInstanceKey, net *basinv1.ActualLRPNetInfo) stepFunc[*basinv1.ActualLRP] {
	guid, idx := key.GetProcessGuid(), key.GetIndex()
	return func(a *basinv1.ActualLRP, e *edits) (bool, error) {
		switch {
		case a.GetState() == stateRunning && sameInstance(a, ik):
			if proto.Equal(a.GetNetInfo(), net) {
				return true, nil
			}
		case a.GetState() == stateClaimed && sameInstance(a, ik):
			a.SinceUnixNano = s.now().UnixNano()
		case a.GetState() == stateUnclaimed:
			a.SinceUnixNano = s.now().UnixNano()
			a.PlacementError = ""
			e.del(s.keys.Unclaimed(guid, idx))
			e.put(s.keys.CellIndex(ik.GetCellId(), guid, idx), "")
		default:
			return false, fmt.Errorf("start %s/%d on cell %s: %w: it is %s", guid, idx, ik.GetCellId(), ErrTransition, describe(a))
		}
		a.State = stateRunning
		a.InstanceKey = proto.Clone(ik).(*basinv1.ActualLRPInstanceKey)
		a.NetInfo = proto.Clone(net).(*basinv1.ActualLRPNetInfo)
		return false, nil
	}
}

// CrashActualLRP records that the calling cell's instance exited. The crash
// count restarts when the instance had been running for CrashResetAfter.
func (s *Store) CrashActualLRP(ctx context.Context, key *basinv1.ActualLRPKey, ik *basinv1.ActualLRPInstanceKey, reason string, fence *basinv1.Fence) (*basinv1.ActualLRP, error) {
	return s.actualTransition(ctx, key.GetProcessGuid(), key.GetIndex(), fence, s.crashStep(key, ik, reason))
}

func (s *Store) crashStep(key *basinv1.ActualLRPKey, ik *basinv1.ActualLRPInstanceKey, reason string) stepFunc[*basinv1.ActualLRP] {
	guid, idx := key.GetProcessGuid(), key.GetIndex()
	return func(a *basinv1.ActualLRP, e *edits) (bool, error) {
		if (a.GetState() != stateClaimed && a.GetState() != stateRunning) || !sameInstance(a, ik) {
			return false, fmt.Errorf("crash %s/%d on cell %s: %w: it is %s", guid, idx, ik.GetCellId(), ErrTransition, describe(a))
		}
		now := s.now()
		if a.GetState() == stateRunning && now.UnixNano()-a.GetSinceUnixNano() >= s.reset.Nanoseconds() {
			a.CrashCount = 0
		}
		a.CrashCount++
		a.CrashReason = reason
		a.State = stateCrashed
		a.SinceUnixNano = now.UnixNano()
		a.InstanceKey = nil
		a.NetInfo = nil
		e.del(s.keys.CellIndex(ik.GetCellId(), guid, idx))
		return false, nil
	}
}

// FailActualLRP records why no cell could take an UNCLAIMED instance and takes
// it off the auction queue; the converger puts it back later.
func (s *Store) FailActualLRP(ctx context.Context, key *basinv1.ActualLRPKey, placementError string, fence *basinv1.Fence) (*basinv1.ActualLRP, error) {
	guid, idx := key.GetProcessGuid(), key.GetIndex()
	return s.actualTransition(ctx, guid, idx, fence, func(a *basinv1.ActualLRP, e *edits) (bool, error) {
		if a.GetState() != stateUnclaimed {
			return false, fmt.Errorf("fail placement of %s/%d: %w: it is %s", guid, idx, ErrTransition, describe(a))
		}
		a.PlacementError = placementError
		e.del(s.keys.Unclaimed(guid, idx))
		return false, nil
	})
}

// UnclaimActualLRP puts an instance back on the auction queue, whatever its
// state: a lost cell's instance, a crashed one being restarted, or an
// unclaimed one no auction took. With ik set it applies only to that
// incarnation.
func (s *Store) UnclaimActualLRP(ctx context.Context, key *basinv1.ActualLRPKey, ik *basinv1.ActualLRPInstanceKey, fence *basinv1.Fence) (*basinv1.ActualLRP, error) {
	guid, idx := key.GetProcessGuid(), key.GetIndex()
	return s.actualTransition(ctx, guid, idx, fence, func(a *basinv1.ActualLRP, e *edits) (bool, error) {
		if ik != nil && !sameInstance(a, ik) {
			return false, fmt.Errorf("unclaim %s/%d: %w: it is %s, not instance %s", guid, idx, ErrTransition, describe(a), ik.GetInstanceGuid())
		}
		e.put(s.keys.Unclaimed(guid, idx), "")
		if cell := a.GetInstanceKey().GetCellId(); cell != "" {
			e.del(s.keys.CellIndex(cell, guid, idx))
		}
		a.State = stateUnclaimed
		a.InstanceKey = nil
		a.NetInfo = nil
		a.SinceUnixNano = s.now().UnixNano()
		return false, nil
	})
}

// removeActual deletes an instance slot with its index keys.
func (s *Store) removeActual(ctx context.Context, guid string, idx int32, ik *basinv1.ActualLRPInstanceKey, fence *basinv1.Fence, what string) error {
	key := s.keys.Actual(guid, idx)
	_, err := s.mutate(ctx, key, fence, func(cur record, p *plan) error {
		a, err := decodeActual(key, cur)
		if err != nil {
			return err
		}
		if ik != nil && !sameInstance(a, ik) {
			return fmt.Errorf("%s %s/%d: %w: it is %s, not instance %s", what, guid, idx, ErrTransition, describe(a), ik.GetInstanceGuid())
		}
		p.del(key)
		p.del(s.keys.Unclaimed(guid, idx))
		if cell := a.GetInstanceKey().GetCellId(); cell != "" {
			p.del(s.keys.CellIndex(cell, guid, idx))
		}
		p.deleted = true
		return nil
	})
	return err
}

// RetireActualLRP removes an instance slot whatever its state; the cell that
// runs it sees its index key go and stops the container.
func (s *Store) RetireActualLRP(ctx context.Context, key *basinv1.ActualLRPKey, fence *basinv1.Fence) error {
	return s.removeActual(ctx, key.GetProcessGuid(), key.GetIndex(), nil, fence, "retire")
}

// RemoveActualLRP removes an instance slot, only if it is still incarnation ik
// when ik is given.
func (s *Store) RemoveActualLRP(ctx context.Context, key *basinv1.ActualLRPKey, ik *basinv1.ActualLRPInstanceKey, fence *basinv1.Fence) error {
	return s.removeActual(ctx, key.GetProcessGuid(), key.GetIndex(), ik, fence, "remove")
}

// GetActualLRP reads one instance from etcd.
func (s *Store) GetActualLRP(ctx context.Context, guid string, idx int32) (*basinv1.ActualLRP, error) {
	key := s.keys.Actual(guid, idx)
	resp, err := s.cli.Get(ctx, key)
	if err != nil {
		return nil, fmt.Errorf("get actual LRP %s/%d: %w", guid, idx, err)
	}
	if len(resp.Kvs) == 0 {
		return nil, fmt.Errorf("actual LRP %s/%d: %w", guid, idx, ErrNotFound)
	}
	return decodeActual(key, record{val: resp.Kvs[0].Value, modRev: resp.Kvs[0].ModRevision, exists: true})
}

// ActualFilter narrows ListActualLRPs; empty fields match everything.
type ActualFilter struct {
	ProcessGUID string
	CellID      string
	Domain      string
}

// ListActualLRPs reads instances from etcd; by cell it goes through the cell
// index so it reads only that cell's records.
func (s *Store) ListActualLRPs(ctx context.Context, f ActualFilter) ([]*basinv1.ActualLRP, error) {
	var out []*basinv1.ActualLRP
	keep := func(kv kvPair) error {
		a, err := decodeActual(kv.key, record{val: kv.val, modRev: kv.modRev, exists: true})
		if err != nil {
			return err
		}
		if f.Domain != "" && a.GetKey().GetDomain() != f.Domain {
			return nil
		}
		if f.CellID != "" && a.GetInstanceKey().GetCellId() != f.CellID {
			return nil
		}
		out = append(out, a)
		return nil
	}
	if f.CellID != "" {
		return out, s.listByCell(ctx, f, keep)
	}
	prefix := s.keys.ActualPrefix()
	if f.ProcessGUID != "" {
		prefix = s.keys.ActualLRPPrefix(f.ProcessGUID)
	}
	var decodeErr error
	if _, err := listPrefix(ctx, s.cli, prefix, 0, func(kv kvPair) {
		if err := keep(kv); err != nil && decodeErr == nil {
			decodeErr = err
		}
	}); err != nil {
		return nil, err
	}
	return out, decodeErr
}

func (s *Store) listByCell(ctx context.Context, f ActualFilter, keep func(kvPair) error) error {
	var keys []string
	_, err := listPrefix(ctx, s.cli, s.keys.CellIndexPrefix(f.CellID), 0, func(kv kvPair) {
		if _, guid, idx, ok := s.keys.ParseCellIndex(kv.key); ok && (f.ProcessGUID == "" || guid == f.ProcessGUID) {
			keys = append(keys, s.keys.Actual(guid, idx))
		}
	})
	if err != nil {
		return err
	}
	// Read the records in transactions of at most maxTxnOps gets; keep
	// re-checks the cell, so a record that moved since the index was read is
	// left out rather than misreported.
	for start := 0; start < len(keys); start += maxTxnOps {
		chunk := keys[start:min(start+maxTxnOps, len(keys))]
		ops := make([]clientv3.Op, len(chunk))
		for i, k := range chunk {
			ops[i] = clientv3.OpGet(k)
		}
		resp, err := s.cli.Txn(ctx).Then(ops...).Commit()
		if err != nil {
			return fmt.Errorf("read actual LRPs of cell %s: %w", f.CellID, err)
		}
		for _, r := range resp.Responses {
			for _, kv := range r.GetResponseRange().Kvs {
				if err := keep(kvPair{key: string(kv.Key), val: kv.Value, modRev: kv.ModRevision}); err != nil {
					return err
				}
			}
		}
	}
	return nil
}
