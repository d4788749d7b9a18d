package rep

import (
	"context"
	"errors"
	"fmt"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/basinpaas/basin/cell/executor"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

// adoptPlan is what a starting rep found: containers it still owns and
// instances the BBS gives it that have no container any more.
type adoptPlan struct {
	owned []ownedInstance
	lost  []*basinv1.ActualLRP
}

type ownedInstance struct {
	actual *basinv1.ActualLRP
	info   executor.Info
}

func owns(a *basinv1.ActualLRP, cellID, instanceGUID string) bool {
	s := a.GetState()
	return (s == basinv1.ActualLRPState_ACTUAL_LRP_STATE_CLAIMED || s == basinv1.ActualLRPState_ACTUAL_LRP_STATE_RUNNING) &&
		a.GetInstanceKey().GetCellId() == cellID && a.GetInstanceKey().GetInstanceGuid() == instanceGUID
}

// reconcileContainers compares this cell's containers with what the BBS says
// it runs, destroys those it no longer owns, and returns the rest. It needs
// no fence: destroying is local.
func (r *Rep) reconcileContainers(ctx context.Context) (adoptPlan, error) {
	infos, err := r.exec.List(ctx)
	if err != nil {
		return adoptPlan{}, fmt.Errorf("reconcile cell %s: %w", r.cfg.CellID, err)
	}
	resp, err := r.bbs.ListActualLRPs(ctx, &basinv1.ListActualLRPsRequest{CellId: r.cfg.CellID})
	if err != nil {
		return adoptPlan{}, fmt.Errorf("reconcile cell %s: list its actual LRPs: %w", r.cfg.CellID, err)
	}
	byGUID := map[string]*basinv1.ActualLRP{}
	for _, a := range resp.GetActualLrps() {
		byGUID[a.GetInstanceKey().GetInstanceGuid()] = a
	}
	var plan adoptPlan
	seen := map[string]bool{}
	for _, in := range infos {
		if in.Labels[LabelCellID] != r.cfg.CellID {
			continue // another cell's, on a shared containerd
		}
		a := byGUID[in.InstanceGUID]
		if a != nil && owns(a, r.cfg.CellID, in.InstanceGUID) && in.State == executor.StateRunning {
			plan.owned = append(plan.owned, ownedInstance{actual: a, info: in})
			seen[in.InstanceGUID] = true
			continue
		}
		r.log.Info("destroying a container this cell no longer owns", "instance", in.InstanceGUID,
			"lrp", fmt.Sprintf("%s/%d", in.ProcessGUID, in.Index))
		if err := r.exec.Destroy(ctx, in.InstanceGUID); err != nil && !errors.Is(err, executor.ErrNotFound) {
			return adoptPlan{}, fmt.Errorf("reconcile cell %s: destroy %s: %w", r.cfg.CellID, in.InstanceGUID, err)
		}
	}
	for _, a := range resp.GetActualLrps() {
		if !seen[a.GetInstanceKey().GetInstanceGuid()] && owns(a, r.cfg.CellID, a.GetInstanceKey().GetInstanceGuid()) {
			plan.lost = append(plan.lost, a)
		}
	}
	return plan, nil
}

// adopt takes over the owned containers (registered, so fenced calls work)
// and reports the lost instances as crashed so they are restarted. Tasks are
// not adopted: their containers were destroyed with the rest, and the tasks
// the BBS still shows RUNNING here are completed as failed.
func (r *Rep) adopt(ctx context.Context, plan adoptPlan) {
	if resp, err := r.bbs.ListTasks(ctx, &basinv1.ListTasksRequest{CellId: r.cfg.CellID}); err != nil {
		r.log.Warn("list this cell's tasks", "err", err)
	} else {
		for _, t := range resp.GetTasks() {
			if t.GetState() != basinv1.TaskState_TASK_STATE_RUNNING {
				continue
			}
			if _, err := retry(ctx, func(ctx context.Context) (*basinv1.CompleteTaskResponse, error) {
				return r.bbs.CompleteTask(ctx, &basinv1.CompleteTaskRequest{TaskGuid: t.GetTaskGuid(), CellId: r.cfg.CellID,
					Failed: true, FailureReason: "the cell restarted while the task ran", Fence: r.currentFence()})
			}); err != nil {
				r.log.Warn("fail task of the previous cell process", "task", t.GetTaskGuid(), "err", err)
			}
		}
	}
	for _, a := range plan.lost {
		l := &lrp{key: a.GetKey(), guid: a.GetInstanceKey().GetInstanceGuid()}
		r.reportCrash(ctx, l, "instance lost: its container was gone when the cell restarted")
	}
	for _, o := range plan.owned {
		r.adoptOne(ctx, o)
	}
}

func (r *Rep) adoptOne(ctx context.Context, o ownedInstance) {
	a := o.actual
	l := &lrp{key: a.GetKey(), guid: a.GetInstanceKey().GetInstanceGuid(), phase: phaseClaimed, claimRev: a.GetRevision()}
	log := r.log.With("lrp", l.name(), "instance", l.guid)
	d, err := r.bbs.GetDesiredLRP(ctx, &basinv1.GetDesiredLRPRequest{ProcessGuid: a.GetKey().GetProcessGuid()})
	if err != nil {
		log.Warn("desired LRP unreadable; destroying the adoptable container", "err", err)
		if err := r.exec.Destroy(ctx, l.guid); err != nil {
			log.Error("destroy", "err", err)
		}
		return
	}
	sched := d.GetDesiredLrp().GetSchedule()
	l.memoryMB, l.diskMB = sched.GetResources().GetMemoryMb(), sched.GetResources().GetDiskMb()
	info, err := r.exec.Adopt(ctx, l.guid)
	if err != nil {
		log.Error("adopt failed; destroying the container", "err", err)
		if err := r.exec.Destroy(ctx, l.guid); err != nil {
			log.Error("destroy", "err", err)
		}
		r.reportCrash(ctx, l, "instance lost: the restarted cell could not adopt its container: "+err.Error())
		return
	}
	l.started = true
	running := a.GetState() == basinv1.ActualLRPState_ACTUAL_LRP_STATE_RUNNING
	l.schedRev, l.routeDefs = d.GetDesiredLrp().GetRevision(), sched.GetRoutes()
	if running {
		// Keep it routed across the restart: re-write under the new lease
		// at once; a failing health check ends it through the exit event.
		l.phase = phaseRunning
		l.info = info
		l.routes = routeKVs(r, l, l.routeDefs, info)
	}
	r.mu.Lock()
	r.lrps[l.guid] = l
	r.mu.Unlock()
	r.notedSchedule(l.key.GetProcessGuid(), l.schedRev)
	if running {
		if err := r.writeRoutes(ctx, l); err != nil {
			log.Error("re-write routes of adopted instance", "err", err)
		}
		log.Info("adopted running instance", "pid", info.PID)
		return
	}
	r.goAttach(func(ctx context.Context) {
		info, err := r.exec.WaitHealthy(ctx, l.guid)
		if err != nil {
			return
		}
		net := &basinv1.ActualLRPNetInfo{Address: r.cfg.AdvertiseAddress, InstanceAddress: info.ContainerIP}
		for _, p := range info.Ports {
			net.Ports = append(net.Ports, &basinv1.PortMapping{ContainerPort: uint32(p.ContainerPort), HostPort: uint32(p.HostPort)})
		}
		if err := r.whileOurs(ctx, l, func(ctx context.Context) error {
			_, err := r.bbs.StartActualLRP(ctx, &basinv1.StartActualLRPRequest{
				Key: l.key, InstanceKey: r.instanceKey(l.guid), NetInfo: net, Fence: r.currentFence()})
			return err
		}); err != nil {
			if ctx.Err() != nil {
				return
			}
			r.stopLRP(context.WithoutCancel(ctx), l, "start refused by the BBS")
			if !errors.Is(err, errNotOurs) {
				r.reportCrash(context.WithoutCancel(ctx), l, "could not be marked running: "+err.Error())
			}
			return
		}
		r.mu.Lock()
		if l.phase != phaseClaimed {
			r.mu.Unlock()
			return
		}
		l.phase = phaseRunning
		l.info = info
		l.routes = routeKVs(r, l, l.routeDefs, info)
		r.mu.Unlock()
		if err := r.writeRoutes(ctx, l); err != nil {
			log.Error("write routes", "err", err)
		}
	})
	log.Info("adopted starting instance", "pid", info.PID)
}

// dropForeign stops every instance the BBS no longer gives this cell: run
// after a lost lease, before presence is written again, so no instance runs
// twice once the cell is back.
func (r *Rep) dropForeign(ctx context.Context) error {
	for _, l := range r.snapshotLRPs() {
		r.mu.Lock()
		skip := l.phase == phaseReserved || l.phase == phaseStopping || l.evacuated
		r.mu.Unlock()
		if skip {
			continue
		}
		resp, err := r.bbs.GetActualLRP(ctx, &basinv1.GetActualLRPRequest{ProcessGuid: l.key.GetProcessGuid(), Index: l.key.GetIndex()})
		if err != nil && !isGone(err) {
			return fmt.Errorf("check ownership of %s: %w", l.name(), err)
		}
		if err == nil && owns(resp.GetActualLrp(), r.cfg.CellID, l.guid) {
			continue
		}
		r.stopLRP(ctx, l, "owned by another cell after the lease was lost")
	}
	return nil
}

// watchIndex stops instances whose index key goes (retired, removed, moved
// by the converger): list, watch from the next revision, re-list on
// compaction or a broken watch so no deletion is missed.
func (r *Rep) watchIndex(ctx context.Context) error {
	prefix := r.cfg.Keys.CellIndexPrefix(r.cfg.CellID)
	for ctx.Err() == nil {
		resp, err := r.etcd.Get(ctx, prefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			r.log.Warn("list index keys", "err", err)
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
			continue
		}
		present := map[string]bool{}
		for _, kv := range resp.Kvs {
			present[string(kv.Key)] = true
		}
		rev := resp.Header.Revision
		for _, l := range r.snapshotLRPs() {
			k := r.cfg.Keys.CellIndex(r.cfg.CellID, l.key.GetProcessGuid(), l.key.GetIndex())
			if !present[k] {
				r.indexGone(l.key.GetProcessGuid(), l.key.GetIndex(), rev)
			}
		}
		wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		for wr := range r.etcd.Watch(wctx, prefix, clientv3.WithPrefix(), clientv3.WithRev(rev+1)) {
			if err := wr.Err(); err != nil {
				r.log.Info("index watch ended; re-listing", "err", err)
				break
			}
			for _, ev := range wr.Events {
				if ev.Type != clientv3.EventTypeDelete {
					continue
				}
				if _, guid, idx, ok := r.cfg.Keys.ParseCellIndex(string(ev.Kv.Key)); ok {
					r.indexGone(guid, idx, ev.Kv.ModRevision)
				}
			}
		}
		cancel()
	}
	return nil
}

// indexGone stops this cell's incarnation of guid/index if it was claimed
// before rev and is not being evacuated (evacuation unclaims on purpose and
// stops the container itself once the replacement runs).
func (r *Rep) indexGone(guid string, index int32, rev int64) {
	r.mu.Lock()
	l := r.lrpByKey(guid, index)
	stop := l != nil && (l.phase == phaseClaimed || l.phase == phaseRunning) && !l.evacuated && l.claimRev < rev
	r.mu.Unlock()
	if stop {
		r.goAttach(func(ctx context.Context) { r.stopLRP(ctx, l, "its index key was removed") })
	}
}
