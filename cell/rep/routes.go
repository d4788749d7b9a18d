package rep

import (
	"context"
	"errors"
	"fmt"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

// applySchedule records a newer schedule on guid's instances and re-routes
// the running ones whose routes changed.
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
