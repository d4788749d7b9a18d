package rep

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/basinpaas/basin/cell/executor"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

// lrpPhase is where an instance is in the rep's hands.
type lrpPhase int

const (
	phaseReserved lrpPhase = iota // accepted by Perform, not yet claimed
	phaseClaimed                  // claimed in the BBS; container starting
	phaseRunning                  // healthy, RUNNING in the BBS, routed
	phaseStopping                 // being stopped (retired, lost, evacuated)
)

// lrp is the rep's record of one instance it holds resources for. Fields
// after mu-protected access are guarded by Rep.mu.
type lrp struct {
	key       *basinv1.ActualLRPKey
	guid      string // instance guid
	memoryMB  int64
	diskMB    int64
	phase     lrpPhase
	claimRev  int64 // etcd revision of the claim: index-key deletions before it are old news
	started   bool  // the executor has (or had) a container for it
	evacuated bool  // unclaimed by evacuation: its index key going is expected
	routes    []routeKV
	// routeDefs are the desired LRP's routes as of schedule revision
	// schedRev; info is the running container's (its host ports).
	routeDefs []*basinv1.Route
	schedRev  int64
	info      executor.Info
	cancel    context.CancelFunc // ends the start goroutine's work
	// routeMu orders route writes and deletes of this instance, so a
	// delete can never be overtaken by a late write.
	routeMu sync.Mutex
}

type routeKV struct {
	key string
	val string
}

func (l *lrp) isRunning() bool { return l.phase == phaseRunning }

func (l *lrp) name() string {
	return fmt.Sprintf("%s/%d", l.key.GetProcessGuid(), l.key.GetIndex())
}

// lrpName logs as the instance's name, formatted only when a line is
// written: logging per instance start must cost nothing at a level that
// hides it.
type lrpName struct{ l *lrp }

func (n lrpName) LogValue() slog.Value { return slog.StringValue(n.l.name()) }

func (r *Rep) snapshotLRPs() []*lrp {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]*lrp, 0, len(r.lrps))
	for _, l := range r.lrps {
		out = append(out, l)
	}
	return out
}

// lrpByKey finds the instance of guid/index this cell holds.
func (r *Rep) lrpByKey(guid string, index int32) *lrp {
	for _, l := range r.lrps {
		if l.key.GetProcessGuid() == guid && l.key.GetIndex() == index {
			return l
		}
	}
	return nil
}

// allocated sums the resources of everything the cell holds; r.mu held.
func (r *Rep) allocatedLocked() (mem, disk int64, containers int32) {
	for _, l := range r.lrps {
		mem += l.memoryMB
		disk += l.diskMB
		containers++
	}
	for _, t := range r.tasks {
		mem += t.memoryMB
		disk += t.diskMB
		containers++
	}
	return mem, disk, containers
}

// fits says why a reservation does not fit, or "" when it does; r.mu held.
func (r *Rep) fitsLocked(stack string, res *basinv1.ResourceLimits) string {
	if !containsString(r.cfg.Stacks, stack) {
		return fmt.Sprintf("stack %s not on this cell", stack)
	}
	mem, disk, n := r.allocatedLocked()
	c := r.cfg.Capacity
	switch {
	case mem+res.GetMemoryMb() > c.GetMemoryMb():
		return "insufficient resources: memory"
	case disk+res.GetDiskMb() > c.GetDiskMb():
		return "insufficient resources: disk"
	case n+1 > c.GetContainers():
		return "insufficient resources: containers"
	}
	return ""
}

func containsString(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// Perform accepts what fits and reserves it at once, so concurrent calls
// never over-commit, then starts each accepted piece of work on its own.
func (r *Rep) Perform(ctx context.Context, req *basinv1.PerformRequest) (*basinv1.PerformResponse, error) {
	resp := &basinv1.PerformResponse{}
	var startLRPs []*lrp
	var startTasks []*task
	r.mu.Lock()
	ready := r.runCtx != nil && isClosed(r.ready)
	for _, s := range req.GetLrps() {
		reason := ""
		switch {
		case !ready:
			reason = "cell is not ready"
		case r.evacuating:
			reason = "cell is evacuating"
		case s.GetKey().GetProcessGuid() == "":
			reason = "key.process_guid: must be set"
		case r.lrpByKey(s.GetKey().GetProcessGuid(), s.GetKey().GetIndex()) != nil:
			reason = "instance already on this cell"
		default:
			reason = r.fitsLocked(s.GetStack(), s.GetResources())
		}
		if reason != "" {
			resp.RejectedLrps = append(resp.RejectedLrps, &basinv1.RejectedLRP{Key: s.GetKey(), Reason: reason})
			r.m.rejected.WithLabelValues("lrp").Inc()
			continue
		}
		l := &lrp{key: proto.Clone(s.GetKey()).(*basinv1.ActualLRPKey), guid: newGUID(),
			memoryMB: s.GetResources().GetMemoryMb(), diskMB: s.GetResources().GetDiskMb()}
		r.lrps[l.guid] = l
		startLRPs = append(startLRPs, l)
	}
	for _, s := range req.GetTasks() {
		reason := ""
		switch {
		case !ready:
			reason = "cell is not ready"
		case r.evacuating:
			reason = "cell is evacuating"
		case s.GetTaskGuid() == "":
			reason = "task_guid: must be set"
		case r.tasks[s.GetTaskGuid()] != nil:
			reason = "task already on this cell"
		default:
			reason = r.fitsLocked(s.GetStack(), s.GetResources())
		}
		if reason != "" {
			resp.RejectedTasks = append(resp.RejectedTasks, &basinv1.RejectedTask{TaskGuid: s.GetTaskGuid(), Reason: reason})
			r.m.rejected.WithLabelValues("task").Inc()
			continue
		}
		t := &task{guid: s.GetTaskGuid(), stack: s.GetStack(), memoryMB: s.GetResources().GetMemoryMb(),
			diskMB: s.GetResources().GetDiskMb(), exited: make(chan struct{})}
		r.tasks[t.guid] = t
		startTasks = append(startTasks, t)
	}
	r.mu.Unlock()
	for _, l := range startLRPs {
		sctx, cancel := context.WithCancel(context.Background())
		r.mu.Lock()
		l.cancel = cancel
		r.mu.Unlock()
		if !r.goAttach(func(ctx context.Context) {
			defer cancel()
			stop := context.AfterFunc(ctx, cancel)
			defer stop()
			r.startLRP(sctx, l)
		}) {
			cancel()
			r.release(l)
		}
	}
	for _, t := range startTasks {
		if !r.goAttach(func(ctx context.Context) { r.runTask(ctx, t) }) {
			r.releaseTask(t)
		}
	}
	return resp, nil
}

func isClosed(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// release forgets an instance and frees its resources.
func (r *Rep) release(l *lrp) {
	r.mu.Lock()
	if r.lrps[l.guid] == l {
		delete(r.lrps, l.guid)
		r.gone = append(r.gone, goneInstance{process: l.key.GetProcessGuid(), meta: logMeta{instance: l.guid, index: l.key.GetIndex()}})
		if len(r.gone) > 256 {
			r.gone = r.gone[1:]
		}
	}
	r.mu.Unlock()
}

// startLRP claims, fetches, starts, waits for health, marks RUNNING, and only
// then routes. A failure after the claim is reported as a crash, so the
// converger's restart policy applies.
func (r *Rep) startLRP(ctx context.Context, l *lrp) {
	t0 := time.Now()
	claimed, err := retry(ctx, func(ctx context.Context) (*basinv1.ActualLRP, error) {
		return r.transitions.do(ctx, &basinv1.ActualLRPTransition{Transition: &basinv1.ActualLRPTransition_Claim{
			Claim: &basinv1.ClaimActualLRPRequest{Key: l.key, InstanceKey: r.instanceKey(l.guid), Fence: r.currentFence()}}})
	})
	if err != nil {
		r.log.Info("claim refused; releasing the reservation", "lrp", lrpName{l}, "instance", l.guid, "err", err)
		r.release(l)
		return
	}
	r.mu.Lock()
	if l.phase == phaseReserved {
		l.phase = phaseClaimed
	}
	l.claimRev = claimed.GetRevision()
	evacuating := r.evacuating
	r.mu.Unlock()
	if evacuating {
		// Evacuation began while the claim was in flight: give it back.
		if _, err := retry(context.WithoutCancel(ctx), func(ctx context.Context) (*basinv1.UnclaimActualLRPResponse, error) {
			return r.bbs.UnclaimActualLRP(ctx, &basinv1.UnclaimActualLRPRequest{
				Key: l.key, InstanceKey: r.instanceKey(l.guid), Fence: r.currentFence()})
		}); err != nil {
			r.log.Warn("unclaim after evacuation began", "lrp", lrpName{l}, "instance", l.guid, "err", err)
		}
		r.release(l)
		return
	}

	spec, err := r.lrpSpec(ctx, l)
	if err != nil {
		r.failStart(ctx, l, err)
		return
	}
	r.mu.Lock()
	if l.phase == phaseStopping {
		r.mu.Unlock()
		r.release(l)
		return
	}
	l.started = true
	r.mu.Unlock()
	info, err := r.exec.Start(ctx, spec)
	if err != nil {
		r.drops.forgetMissing(spec.Droplet.Digest, err)
		r.mu.Lock()
		l.started = false
		r.mu.Unlock()
		r.failStart(ctx, l, err)
		return
	}
	r.mu.Lock()
	stopping := l.phase == phaseStopping
	r.mu.Unlock()
	if stopping {
		// Retired while the container was created: whoever set the phase
		// saw started and stops it.
		return
	}
	info, err = r.exec.WaitHealthy(ctx, l.guid)
	if err != nil {
		// The exit event reports the crash (or the stop, if one came).
		r.log.Debug("not healthy", "lrp", lrpName{l}, "instance", l.guid, "err", err)
		return
	}
	net := &basinv1.ActualLRPNetInfo{Address: r.cfg.AdvertiseAddress, InstanceAddress: info.ContainerIP}
	for _, p := range info.Ports {
		net.Ports = append(net.Ports, &basinv1.PortMapping{ContainerPort: uint32(p.ContainerPort), HostPort: uint32(p.HostPort)})
	}
	if err := r.whileOurs(ctx, l, func(ctx context.Context) error {
		_, err := r.transitions.do(ctx, &basinv1.ActualLRPTransition{Transition: &basinv1.ActualLRPTransition_Start{
			Start: &basinv1.StartActualLRPRequest{Key: l.key, InstanceKey: r.instanceKey(l.guid), NetInfo: net, Fence: r.currentFence()}}})
		return err
	}); err != nil {
		if ctx.Err() != nil {
			// Shutting down: the next cell process adopts the container
			// and marks it RUNNING itself.
			return
		}
		// Not ours any more (retired, moved after a lost lease), or the
		// BBS kept refusing: stop it; if it is still ours, say it crashed
		// so it is restarted rather than left CLAIMED here.
		r.log.Warn("mark running refused; stopping the instance", "lrp", lrpName{l}, "instance", l.guid, "err", err)
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
		r.log.Error("write routes", "lrp", lrpName{l}, "instance", l.guid, "err", err)
	}
	r.m.starts.Inc()
	r.m.startSeconds.Observe(time.Since(t0).Seconds())
	r.log.Info("instance running", "lrp", lrpName{l}, "instance", l.guid, "took", time.Since(t0).Round(time.Millisecond), "ports", net.GetPorts())
}

// failStart reports a start that failed after the claim as a crash.
func (r *Rep) failStart(ctx context.Context, l *lrp, cause error) {
	r.log.Warn("start failed", "lrp", lrpName{l}, "instance", l.guid, "err", cause)
	r.mu.Lock()
	stopping := l.phase == phaseStopping
	r.mu.Unlock()
	if !stopping && ctx.Err() == nil {
		r.reportCrash(context.WithoutCancel(ctx), l, "failed to start: "+cause.Error())
	}
	r.release(l)
}

// lrpSpec reads the desired LRP (noting its routes) and fetches its droplet.
//
// The read is as of the claim's revision or later, which lets the BBS answer
// from its watch-fed view. followSchedules then follows the LRP from the
// revision read, so the BBS sends any newer schedule.
func (r *Rep) lrpSpec(ctx context.Context, l *lrp) (executor.Spec, error) {
	r.mu.Lock()
	claimRev := l.claimRev
	r.mu.Unlock()
	d, err := retry(ctx, func(ctx context.Context) (*basinv1.DesiredLRP, error) {
		return r.desired.do(ctx, desiredRead{guid: l.key.GetProcessGuid(), minRev: claimRev})
	})
	if err != nil {
		return executor.Spec{}, fmt.Errorf("get desired LRP %s: %w", l.key.GetProcessGuid(), err)
	}
	sched, run := d.GetSchedule(), d.GetRun()
	r.noteSchedule(l, sched, d.GetRevision())
	path, err := r.drops.get(ctx, run.GetDroplet())
	if err != nil {
		return executor.Spec{}, err
	}
	spec := executor.Spec{
		InstanceGUID: l.guid, ProcessGUID: l.key.GetProcessGuid(), Index: int(l.key.GetIndex()),
		Stack:        sched.GetStack(),
		Droplet:      executor.Droplet{Digest: run.GetDroplet().GetDigest(), Path: path},
		StartCommand: run.GetStartCommand(),
		MemoryMB:     sched.GetResources().GetMemoryMb(), DiskMB: sched.GetResources().GetDiskMb(),
		CPUShares: uint64(max(sched.GetResources().GetCpuWeight(), 0)),
		PidsLimit: sched.GetResources().GetPids(),
		Labels:    map[string]string{LabelCellID: r.cfg.CellID},
		App:       executor.AppInfo{GUID: l.key.GetProcessGuid(), Name: run.GetAppName(), Version: l.key.GetProcessGuid()},
	}
	if run.GetAppGuid() != "" {
		spec.App.GUID, spec.App.Version = run.GetAppGuid(), run.GetAppVersion()
	}
	for _, e := range run.GetEnv() {
		spec.Env = append(spec.Env, e.GetName()+"="+e.GetValue())
	}
	for _, p := range run.GetPorts() {
		spec.Ports = append(spec.Ports, uint16(p))
	}
	for _, rt := range sched.GetRoutes() {
		spec.App.URIs = append(spec.App.URIs, rt.GetHost()+rt.GetPath())
	}
	hc := run.GetHealthCheck()
	switch hc.GetType() {
	case basinv1.HealthCheckType_HEALTH_CHECK_TYPE_HTTP:
		spec.HealthCheck.Type = executor.HealthHTTP
	case basinv1.HealthCheckType_HEALTH_CHECK_TYPE_PROCESS:
		spec.HealthCheck.Type = executor.HealthProcess
	default:
		spec.HealthCheck.Type = executor.HealthPort
	}
	spec.HealthCheck.Path = hc.GetHttpEndpoint()
	spec.HealthCheck.StartTimeout = time.Duration(hc.GetStartTimeoutMs()) * time.Millisecond
	spec.HealthCheck.Interval = time.Duration(hc.GetIntervalMs()) * time.Millisecond
	return spec, nil
}

// noteSchedule records the desired routes when rev is newer than what the
// instance has (the schedule watch may have delivered a later one first).
func (r *Rep) noteSchedule(l *lrp, sched *basinv1.DesiredLRPSchedule, rev int64) {
	r.mu.Lock()
	if rev > l.schedRev {
		l.schedRev = rev
		l.routeDefs = sched.GetRoutes()
	}
	rev = l.schedRev
	r.mu.Unlock()
	r.notedSchedule(l.key.GetProcessGuid(), rev)
}

// routeKVs builds the route keys and values of a running instance.
func routeKVs(r *Rep, l *lrp, routes []*basinv1.Route, info executor.Info) []routeKV {
	var out []routeKV
	for _, rt := range routes {
		var port uint16
		for i, p := range info.Ports {
			if (rt.GetPort() == 0 && i == 0) || uint32(p.ContainerPort) == rt.GetPort() {
				port = p.HostPort
				break
			}
		}
		if port == 0 {
			r.log.Warn("route targets a port the instance does not expose", "lrp", lrpName{l}, "host", rt.GetHost(), "port", rt.GetPort())
			continue
		}
		ep := &basinv1.RouteEndpoint{
			Host: rt.GetHost(), Path: rt.GetPath(), ProcessGuid: l.key.GetProcessGuid(), Index: l.key.GetIndex(),
			InstanceGuid: l.guid, Address: r.cfg.AdvertiseAddress, Port: uint32(port),
			Tags: map[string]string{"cell_id": r.cfg.CellID},
		}
		val, _ := proto.MarshalOptions{Deterministic: true}.Marshal(ep)
		out = append(out, routeKV{key: r.cfg.Keys.Route(rt.GetHost(), rt.GetPath(), l.key.GetProcessGuid(), l.key.GetIndex()), val: string(val)})
	}
	return out
}

// writeRoutes puts the instance's routes under the current lease.
func (r *Rep) writeRoutes(ctx context.Context, l *lrp) error {
	l.routeMu.Lock()
	defer l.routeMu.Unlock()
	r.mu.Lock()
	routes, lease := l.routes, r.lease
	r.mu.Unlock()
	for _, rt := range routes {
		if _, err := r.etcd.Put(ctx, rt.key, rt.val, clientv3.WithLease(lease)); err != nil {
			return fmt.Errorf("write route %s: %w", rt.key, err)
		}
	}
	return nil
}

// deleteRoutes removes the instance's routes, each only while it still holds
// this instance's value: a replacement elsewhere writes the same key.
func (r *Rep) deleteRoutes(ctx context.Context, l *lrp) error {
	l.routeMu.Lock()
	defer l.routeMu.Unlock()
	r.mu.Lock()
	routes := l.routes
	l.routes = nil
	r.mu.Unlock()
	var errs []error
	for _, rt := range routes {
		_, err := r.etcd.Txn(ctx).If(clientv3.Compare(clientv3.Value(rt.key), "=", rt.val)).
			Then(clientv3.OpDelete(rt.key)).Commit()
		if err != nil {
			errs = append(errs, fmt.Errorf("delete route %s: %w", rt.key, err))
		}
	}
	return errors.Join(errs...)
}

// reportCrash tells the BBS an instance of this cell ended.
func (r *Rep) reportCrash(ctx context.Context, l *lrp, reason string) {
	if len(reason) > maxReasonBytes {
		reason = reason[:maxReasonBytes-3] + "..."
	}
	err := r.whileOurs(ctx, l, func(ctx context.Context) error {
		_, err := r.bbs.CrashActualLRP(ctx, &basinv1.CrashActualLRPRequest{
			Key: l.key, InstanceKey: r.instanceKey(l.guid), Reason: reason, Fence: r.currentFence()})
		return err
	})
	switch {
	case err == nil:
		r.m.crashes.Inc()
	case !errors.Is(err, errNotOurs):
		r.log.Error("report crash", "lrp", lrpName{l}, "instance", l.guid, "err", err)
	}
}

// errNotOurs: the BBS no longer gives the instance to this cell.
var errNotOurs = errors.New("instance is no longer this cell's")

// whileOurs calls fn (with retry) until it succeeds, the BBS no longer gives
// the instance to this cell (errNotOurs), or crashReportPatience passes. A
// refusal while the instance is still ours comes from a fence gone stale
// during lease renewal: such a report must not be lost, since the converger
// cannot tell a dead instance on a live cell from a running one.
func (r *Rep) whileOurs(ctx context.Context, l *lrp, fn func(context.Context) error) error {
	deadline := time.Now().Add(crashReportPatience)
	for {
		_, err := retry(ctx, func(ctx context.Context) (struct{}, error) { return struct{}{}, fn(ctx) })
		if err == nil {
			return nil
		}
		resp, gerr := r.bbs.GetActualLRP(ctx, &basinv1.GetActualLRPRequest{ProcessGuid: l.key.GetProcessGuid(), Index: l.key.GetIndex()})
		if (gerr == nil && !owns(resp.GetActualLrp(), r.cfg.CellID, l.guid)) || isGone(gerr) {
			return fmt.Errorf("%w: %v", errNotOurs, err)
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return err
		}
		select {
		case <-ctx.Done():
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// crashReportPatience bounds how long a report is retried.
const crashReportPatience = time.Minute

// maxReasonBytes keeps a crash reason under the BBS's 10 KiB result limit.
const maxReasonBytes = 8 << 10

// OnEvent takes the executor's events; it hands the work to a goroutine so
// the executor is never blocked by the BBS.
func (r *Rep) OnEvent(ev executor.Event) {
	if ev.Type != executor.EventExited {
		return
	}
	r.goAttach(func(ctx context.Context) { r.handleExit(ctx, ev) })
}

func (r *Rep) handleExit(ctx context.Context, ev executor.Event) {
	r.mu.Lock()
	l := r.lrps[ev.InstanceGUID]
	t := r.taskByInstanceLocked(ev.InstanceGUID)
	r.mu.Unlock()
	if l == nil {
		if t != nil {
			r.completeTask(ctx, t, ev.Exit)
		}
		return
	}
	r.mu.Lock()
	crashed := !ev.Exit.Stopped && l.phase != phaseStopping && !l.evacuated
	l.phase = phaseStopping
	l.started = false
	r.mu.Unlock()
	// Route first: the router must stop sending before anyone is told.
	if err := r.deleteRoutes(ctx, l); err != nil {
		r.log.Error("delete routes of exited instance", "lrp", lrpName{l}, "err", err)
	}
	if crashed {
		r.reportCrash(ctx, l, crashReason(ev.Exit))
	}
	r.release(l)
}

// crashReason is the exit reason and the last lines of output.
func crashReason(x *executor.ExitInfo) string {
	var b strings.Builder
	b.WriteString(x.Reason)
	if len(x.LastLines) > 0 {
		b.WriteString("; last output:")
		for _, ln := range x.LastLines {
			if ln.Source != executor.SourceApp {
				continue
			}
			b.WriteString("\n")
			b.WriteString(ln.Text)
		}
	}
	return b.String()
}

// stopLRP takes an instance off the router, then stops its container. It is
// safe to call more than once; the exit event releases the resources.
func (r *Rep) stopLRP(ctx context.Context, l *lrp, why string) {
	r.mu.Lock()
	if l.phase == phaseStopping {
		r.mu.Unlock()
		return
	}
	l.phase = phaseStopping
	started := l.started
	cancel := l.cancel
	r.mu.Unlock()
	r.log.Info("stopping instance", "lrp", lrpName{l}, "instance", l.guid, "why", why)
	// Bounded: a container whose creation failed never reports its end.
	ctx, cancelStop := context.WithTimeout(ctx, r.cfg.StopGrace+30*time.Second)
	defer cancelStop()
	r.mu.Lock()
	routed := len(l.routes) > 0
	r.mu.Unlock()
	if err := r.deleteRoutes(ctx, l); err != nil {
		r.log.Error("delete routes", "lrp", lrpName{l}, "err", err)
	}
	if started && routed && r.cfg.RouteDrain > 0 {
		// Routers learn of the deletion through their watch a moment
		// later: until then they may still send here.
		select {
		case <-ctx.Done():
		case <-time.After(r.cfg.RouteDrain):
		}
	}
	if !started {
		// Still claiming or fetching: the start goroutine sees the phase
		// and releases the reservation; cancel ends its waiting.
		if cancel != nil {
			cancel()
		}
		return
	}
	if err := r.exec.Stop(ctx, l.guid, r.cfg.StopGrace); err != nil {
		switch {
		case errors.Is(err, executor.ErrNotFound):
			r.release(l)
		case errors.Is(err, context.Canceled):
			// The cell is shutting down; the container stays for the next
			// process, which will find its index key gone and destroy it.
		default:
			r.log.Error("stop instance", "lrp", lrpName{l}, "instance", l.guid, "err", err)
		}
	}
}

// isGone reports whether the BBS said the record or transition is no
// longer there for this cell.
func isGone(err error) bool {
	c := status.Code(err)
	return c == codes.NotFound || c == codes.FailedPrecondition
}

// retry calls fn until it succeeds, fails for good, or five attempts are
// spent: the BBS may be restarting, or a transaction may have lost a race.
// Every call retried here is idempotent for the same instance key.
func retry[T any](ctx context.Context, fn func(context.Context) (T, error)) (T, error) {
	backoff := 50 * time.Millisecond
	for attempt := 1; ; attempt++ {
		v, err := fn(ctx)
		if err == nil || attempt == 5 || !transient(err) {
			return v, err
		}
		select {
		case <-ctx.Done():
			return v, err
		case <-time.After(backoff):
		}
		backoff *= 2
	}
}

func transient(err error) bool {
	switch status.Code(err) {
	case codes.Unavailable, codes.Aborted, codes.ResourceExhausted:
		return true
	}
	return false
}
