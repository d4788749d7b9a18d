package rep

import (
	"context"
	"fmt"
	"sync"
	"time"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

// Evacuate moves this cell's work away and then stops it here:
//
//  1. presence says evacuating, and Perform refuses new work;
//  2. each instance is unclaimed through the BBS (UNCLAIMED, back on the
//     auction queue). That deletes its index key; the rep marks the instance
//     evacuated first, so its own watch does not stop it;
//  3. the container keeps serving (its route stays) until the BBS shows the
//     slot RUNNING on another cell, or removed, or timeout passes;
//  4. then route first, container second, as for any stop.
//
// Tasks get until timeout to finish, then are stopped and reported failed.
// Evacuate returns when everything is stopped or ctx ends; calling it again
// waits for the same evacuation.
func (r *Rep) Evacuate(ctx context.Context, timeout time.Duration) error {
	if timeout <= 0 {
		timeout = r.cfg.EvacuationTimeout
	}
	r.mu.Lock()
	if r.evacDone != nil {
		done := r.evacDone
		r.mu.Unlock()
		select {
		case <-done:
			return nil
		case <-ctx.Done():
			return fmt.Errorf("wait for evacuation: %w", ctx.Err())
		}
	}
	r.evacuating = true
	r.evacDone = make(chan struct{})
	done := r.evacDone
	r.mu.Unlock()
	defer close(done)
	r.m.evacuating.Set(1)
	t0 := time.Now()
	if err := r.updatePresence(ctx); err != nil {
		r.log.Warn("mark presence evacuating", "err", err)
	}
	deadline := time.Now().Add(timeout)
	dctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()

	var wg sync.WaitGroup
	for _, l := range r.snapshotLRPs() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r.evacuateLRP(ctx, dctx, l)
		}()
	}
	wg.Wait()
	r.mu.Lock()
	var tasks []*task
	for _, t := range r.tasks {
		tasks = append(tasks, t)
	}
	r.mu.Unlock()
	for _, t := range tasks {
		select {
		case <-t.exited:
			continue
		case <-dctx.Done():
		}
		r.mu.Lock()
		inst := t.instance
		r.mu.Unlock()
		if inst != "" {
			if err := r.exec.Stop(ctx, inst, r.cfg.StopGrace); err != nil {
				r.log.Warn("stop task for evacuation", "task", t.guid, "err", err)
			}
		}
	}
	r.log.Info("cell evacuated", "took", time.Since(t0).Round(time.Millisecond))
	return ctx.Err()
}

// evacuateLRP unclaims one instance, waits (until dctx ends) for its
// replacement to run elsewhere, then stops it.
func (r *Rep) evacuateLRP(ctx, dctx context.Context, l *lrp) {
	r.mu.Lock()
	phase := l.phase
	claimed := phase == phaseClaimed || phase == phaseRunning
	if claimed {
		l.evacuated = true
	}
	r.mu.Unlock()
	if phase == phaseStopping {
		return
	}
	if claimed {
		_, err := retry(ctx, func(ctx context.Context) (*basinv1.UnclaimActualLRPResponse, error) {
			return r.bbs.UnclaimActualLRP(ctx, &basinv1.UnclaimActualLRPRequest{
				Key: l.key, InstanceKey: r.instanceKey(l.guid), Fence: r.currentFence()})
		})
		if err != nil {
			r.log.Warn("unclaim for evacuation", "lrp", lrpName{l}, "err", err)
		} else if phase == phaseRunning {
			r.waitReplacement(dctx, l)
		}
	}
	r.stopLRP(ctx, l, "evacuation")
	// Wait for the container to go, so the process may exit after.
	for {
		r.mu.Lock()
		_, still := r.lrps[l.guid]
		r.mu.Unlock()
		if !still {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// waitReplacement polls the slot until another cell runs it, it is gone, or
// ctx ends.
func (r *Rep) waitReplacement(ctx context.Context, l *lrp) {
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		resp, err := r.bbs.GetActualLRP(ctx, &basinv1.GetActualLRPRequest{ProcessGuid: l.key.GetProcessGuid(), Index: l.key.GetIndex()})
		switch {
		case err != nil && isGone(err):
			return
		case err == nil:
			a := resp.GetActualLrp()
			if a.GetState() == basinv1.ActualLRPState_ACTUAL_LRP_STATE_RUNNING && a.GetInstanceKey().GetCellId() != r.cfg.CellID {
				r.log.Info("replacement running; stopping the evacuated instance", "lrp", lrpName{l}, "on", a.GetInstanceKey().GetCellId())
				return
			}
		}
		select {
		case <-ctx.Done():
			r.log.Warn("no replacement before the evacuation timeout; stopping anyway", "lrp", lrpName{l})
			return
		case <-tick.C:
		}
	}
}
