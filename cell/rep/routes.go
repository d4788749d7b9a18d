package rep

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

// watchSchedules keeps the routes of running instances in step with their
// desired LRP: a route mapped or unmapped through UpdateDesiredLRP is written
// or removed at once, without restarting anything. It watches from the
// revision Run noted before any instance read its schedule (lrpSpec reads at
// a claim's revision or later, and every claim comes after it), so no change
// is missed; after a compaction or a broken watch it notes the revision
// again, re-reads every instance's schedule and watches on from there.
func (r *Rep) watchSchedules(ctx context.Context, from int64) error {
	prefix := r.cfg.Keys.DesiredSchedulePrefix()
	for ctx.Err() == nil {
		wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		for wr := range r.etcd.Watch(wctx, prefix, clientv3.WithPrefix(), clientv3.WithRev(from+1)) {
			if err := wr.Err(); err != nil {
				r.log.Info("schedule watch ended; re-reading schedules", "err", err)
				break
			}
			for _, ev := range wr.Events {
				from = ev.Kv.ModRevision
				guid := strings.TrimPrefix(string(ev.Kv.Key), prefix)
				if ev.Type != clientv3.EventTypePut || guid == "" || strings.Contains(guid, "/") || !r.runsLRP(guid) {
					continue
				}
				sched := &basinv1.DesiredLRPSchedule{}
				if err := proto.Unmarshal(ev.Kv.Value, sched); err != nil {
					r.log.Warn("undecodable schedule", "key", string(ev.Kv.Key), "err", err)
					continue
				}
				r.applySchedule(ctx, guid, sched, ev.Kv.ModRevision)
			}
		}
		cancel()
		for ctx.Err() == nil {
			rev, err := r.currentRevision(ctx)
			if err == nil {
				from = rev
				r.resyncSchedules(ctx)
				break
			}
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
	}
	return nil
}

// currentRevision is etcd's revision now.
func (r *Rep) currentRevision(ctx context.Context) (int64, error) {
	resp, err := r.etcd.Get(ctx, r.cfg.Keys.DesiredPrefix(), clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		return 0, fmt.Errorf("read etcd revision: %w", err)
	}
	return resp.Header.Revision, nil
}

// resyncSchedules reads the schedule of every LRP this cell runs.
func (r *Rep) resyncSchedules(ctx context.Context) {
	guids := map[string]bool{}
	for _, l := range r.snapshotLRPs() {
		guids[l.key.GetProcessGuid()] = true
	}
	for guid := range guids {
		d, err := r.bbs.GetDesiredLRP(ctx, &basinv1.GetDesiredLRPRequest{ProcessGuid: guid})
		if err != nil {
			continue // removed: its instances are being retired
		}
		r.applySchedule(ctx, guid, d.GetDesiredLrp().GetSchedule(), d.GetDesiredLrp().GetRevision())
	}
}

// applySchedule records a newer schedule on guid's instances and re-routes
// the running ones whose routes changed.
// runsLRP reports whether this cell holds an instance of the LRP: every
// cell sees every schedule change, and most are for LRPs it does not run.
func (r *Rep) runsLRP(guid string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, l := range r.lrps {
		if l.key.GetProcessGuid() == guid {
			return true
		}
	}
	return false
}

func (r *Rep) applySchedule(ctx context.Context, guid string, sched *basinv1.DesiredLRPSchedule, rev int64) {
	var changed []*lrp
	r.mu.Lock()
	for _, l := range r.lrps {
		if l.key.GetProcessGuid() != guid || rev <= l.schedRev {
			continue
		}
		same := len(l.routeDefs) == len(sched.GetRoutes())
		for i := 0; same && i < len(l.routeDefs); i++ {
			same = proto.Equal(l.routeDefs[i], sched.GetRoutes()[i])
		}
		l.schedRev, l.routeDefs = rev, sched.GetRoutes()
		if !same && l.phase == phaseRunning {
			changed = append(changed, l)
		}
	}
	r.mu.Unlock()
	for _, l := range changed {
		if err := r.reroute(ctx, l); err != nil {
			r.log.Error("update routes", "lrp", lrpName{l}, "err", err)
		}
	}
}

// reroute replaces a running instance's route keys with those of its
// current route definitions: new ones written, dropped ones deleted (only
// while they still hold this instance's value).
func (r *Rep) reroute(ctx context.Context, l *lrp) error {
	l.routeMu.Lock()
	defer l.routeMu.Unlock()
	r.mu.Lock()
	if l.phase != phaseRunning {
		r.mu.Unlock()
		return nil
	}
	old := l.routes
	next := routeKVs(r, l, l.routeDefs, l.info)
	l.routes = next
	lease := r.lease
	r.mu.Unlock()
	keep := map[string]bool{}
	var errs []error
	for _, rt := range next {
		keep[rt.key] = true
		if _, err := r.etcd.Put(ctx, rt.key, rt.val, clientv3.WithLease(lease)); err != nil {
			errs = append(errs, fmt.Errorf("write route %s: %w", rt.key, err))
		}
	}
	for _, rt := range old {
		if keep[rt.key] {
			continue
		}
		if _, err := r.etcd.Txn(ctx).If(clientv3.Compare(clientv3.Value(rt.key), "=", rt.val)).
			Then(clientv3.OpDelete(rt.key)).Commit(); err != nil {
			errs = append(errs, fmt.Errorf("delete route %s: %w", rt.key, err))
		}
	}
	return errors.Join(errs...)
}
