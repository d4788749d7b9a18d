// Package converger keeps actual state equal to desired state: it creates
// missing instances, retires extra ones, requeues instances no auction took,
// restarts crashed ones by the restart policy, requeues the instances of lost
// cells and fails their tasks, and deletes completed tasks nobody resolved.
// One replica leads (elected through etcd); every write carries its fence.
// It reacts to BBS events and to the cells' presence keys, with a full pass
// on an interval as a safety net.
package converger

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/basinpaas/basin/bbs"
	"github.com/basinpaas/basin/bbs/leader"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Config configures a converger replica. Zero values take the defaults.
type Config struct {
	// Prefix of basin's etcd keys; bbs.DefaultPrefix when empty.
	Prefix string
	// ID is this replica's election value.
	ID string
	// LeaseTTL of the election session; 3 s.
	LeaseTTL time.Duration
	// Interval between full passes; 30 s.
	Interval time.Duration
	// UnclaimedTimeout: an UNCLAIMED instance off the auction queue this
	// long is queued again; 30 s.
	UnclaimedTimeout time.Duration
	// ResolveTaskTimeout: a COMPLETED task unresolved this long is deleted; 2 min.
	ResolveTaskTimeout time.Duration
	// Restart is the crash restart policy; Diego's when zero.
	Restart RestartPolicy
	// DebugAddress serves /metrics and pprof; empty disables it.
	DebugAddress string
	// Now is the clock; time.Now when nil.
	Now func() time.Time
}

func (c *Config) defaults() {
	if c.Prefix == "" {
		c.Prefix = bbs.DefaultPrefix
	}
	if c.LeaseTTL <= 0 {
		c.LeaseTTL = 3 * time.Second
	}
	if c.Interval <= 0 {
		c.Interval = 30 * time.Second
	}
	if c.UnclaimedTimeout <= 0 {
		c.UnclaimedTimeout = 30 * time.Second
	}
	if c.ResolveTaskTimeout <= 0 {
		c.ResolveTaskTimeout = 2 * time.Minute
	}
	if c.Restart == (RestartPolicy{}) {
		c.Restart = DefaultRestartPolicy()
	}
	if c.Now == nil {
		c.Now = time.Now
	}
}

// BBS is what the converger asks of the BBS.
type BBS interface {
	ListDesiredLRPSchedules(ctx context.Context, in *basinv1.ListDesiredLRPSchedulesRequest, opts ...grpc.CallOption) (*basinv1.ListDesiredLRPSchedulesResponse, error)
	GetDesiredLRP(ctx context.Context, in *basinv1.GetDesiredLRPRequest, opts ...grpc.CallOption) (*basinv1.GetDesiredLRPResponse, error)
	ListActualLRPs(ctx context.Context, in *basinv1.ListActualLRPsRequest, opts ...grpc.CallOption) (*basinv1.ListActualLRPsResponse, error)
	ListTasks(ctx context.Context, in *basinv1.ListTasksRequest, opts ...grpc.CallOption) (*basinv1.ListTasksResponse, error)
	UnclaimActualLRP(ctx context.Context, in *basinv1.UnclaimActualLRPRequest, opts ...grpc.CallOption) (*basinv1.UnclaimActualLRPResponse, error)
	RetireActualLRP(ctx context.Context, in *basinv1.RetireActualLRPRequest, opts ...grpc.CallOption) (*basinv1.RetireActualLRPResponse, error)
	FailTask(ctx context.Context, in *basinv1.FailTaskRequest, opts ...grpc.CallOption) (*basinv1.FailTaskResponse, error)
	ResolveTask(ctx context.Context, in *basinv1.ResolveTaskRequest, opts ...grpc.CallOption) (*basinv1.ResolveTaskResponse, error)
	CreateMissingActualLRPs(ctx context.Context, in *basinv1.CreateMissingActualLRPsRequest, opts ...grpc.CallOption) (*basinv1.CreateMissingActualLRPsResponse, error)
	SubscribeToEvents(ctx context.Context, in *basinv1.SubscribeToEventsRequest, opts ...grpc.CallOption) (grpc.ServerStreamingClient[basinv1.SubscribeToEventsResponse], error)
}

var _ BBS = (basinv1.BBSServiceClient)(nil)

// Converger is one replica.
type Converger struct {
	cfg     Config
	keys    bbs.Keys
	etcd    *clientv3.Client
	bbs     BBS
	log     *slog.Logger
	reg     *prometheus.Registry
	metrics *metrics
}

// New returns a converger replica.
func New(cfg Config, etcd *clientv3.Client, b BBS, logger *slog.Logger) *Converger {
	cfg.defaults()
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return &Converger{cfg: cfg, keys: bbs.NewKeys(cfg.Prefix), etcd: etcd, bbs: b,
		log: logger, reg: reg, metrics: newMetrics(reg)}
}

// Registry holds the converger's metrics, for a shared debug server.
func (c *Converger) Registry() *prometheus.Registry { return c.reg }

// Run campaigns for leadership and converges while leading, until ctx ends.
func (c *Converger) Run(ctx context.Context) error {
	g, gctx := errgroup.WithContext(ctx)
	if c.cfg.DebugAddress != "" {
		lis, err := bbs.ListenDebug(c.cfg.DebugAddress)
		if err != nil {
			return err
		}
		g.Go(func() error { return bbs.ServeDebug(gctx, lis, c.reg) })
	}
	g.Go(func() error {
		return leader.Run(gctx, c.etcd, leader.Config{
			Component: "converger", Keys: c.keys, ID: c.cfg.ID, TTL: c.cfg.LeaseTTL, Logger: c.log,
		}, c.lead)
	})
	return g.Wait()
}

// errFenced ends a term: this replica no longer holds its election key.
var errFenced = errors.New("converger is no longer leader")

// term is one leadership term's state.
type term struct {
	c     *Converger
	fence *basinv1.Fence

	mu    sync.Mutex
	cells map[string]bool
	dirty map[string]bool
	full  bool
	wake  chan struct{}
}

func (t *term) poke() {
	select {
	case t.wake <- struct{}{}:
	default:
	}
}

func (c *Converger) lead(ctx context.Context, fence *basinv1.Fence) error {
	c.metrics.leader.Set(1)
	defer c.metrics.leader.Set(0)
	t := &term{c: c, fence: fence, cells: make(map[string]bool), dirty: make(map[string]bool), full: true, wake: make(chan struct{}, 1)}
	g, gctx := errgroup.WithContext(ctx)
	listed := make(chan struct{})
	subscribed := make(chan struct{})
	g.Go(func() error { return t.watchCells(gctx, listed) })
	g.Go(func() error { return t.events(gctx, subscribed) })
	g.Go(func() error {
		// The first full pass needs the cells and must not miss events.
		for _, ch := range []chan struct{}{listed, subscribed} {
			select {
			case <-ch:
			case <-gctx.Done():
				return nil
			}
		}
		return t.loop(gctx)
	})
	return g.Wait()
}

// watchCells keeps the set of live cells from their presence keys; a deleted
// key (the lease expired) is a lost cell, handled at once.
func (t *term) watchCells(ctx context.Context, listed chan struct{}) error {
	prefix := t.c.keys.CellPrefix()
	first := true
	for {
		resp, err := t.c.etcd.Get(ctx, prefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("list cells: %w", err)
		}
		cells := make(map[string]bool)
		for _, kv := range resp.Kvs {
			cells[strings.TrimPrefix(string(kv.Key), prefix)] = true
		}
		t.mu.Lock()
		t.cells = cells
		t.full = true
		t.mu.Unlock()
		t.poke()
		if first {
			close(listed)
			first = false
		}
		wch := t.c.etcd.Watch(clientv3.WithRequireLeader(ctx), prefix, clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1))
		for wr := range wch {
			if err := wr.Err(); err != nil {
				if errors.Is(err, rpctypes.ErrCompacted) {
					break
				}
				return fmt.Errorf("watch cells: %w", err)
			}
			for _, ev := range wr.Events {
				id := strings.TrimPrefix(string(ev.Kv.Key), prefix)
				t.mu.Lock()
				if ev.Type == clientv3.EventTypeDelete {
					delete(t.cells, id)
				} else {
					t.cells[id] = true
				}
				t.mu.Unlock()
				if ev.Type == clientv3.EventTypeDelete {
					if err := t.cellLost(ctx, id); err != nil {
						return err
					}
				}
			}
		}
		if ctx.Err() != nil {
			return nil
		}
	}
}

// cellLost requeues every instance the cell claimed or ran and fails its
// running tasks.
func (t *term) cellLost(ctx context.Context, cellID string) error {
	start := time.Now()
	t.c.metrics.cellsLost.Inc()
	resp, err := t.c.bbs.ListActualLRPs(ctx, &basinv1.ListActualLRPsRequest{CellId: cellID})
	if err != nil {
		t.c.log.Warn("list instances of lost cell", "cell", cellID, "err", err)
		t.markFull()
		return nil
	}
	var act Actions
	for _, a := range resp.GetActualLrps() {
		switch a.GetState() {
		case basinv1.ActualLRPState_ACTUAL_LRP_STATE_CLAIMED, basinv1.ActualLRPState_ACTUAL_LRP_STATE_RUNNING:
			act.Unclaim = append(act.Unclaim, Unclaim{Key: a.GetKey(), Instance: a.GetInstanceKey(), Reason: fmt.Sprintf("cell %s is gone", cellID)})
		}
	}
	tasks, err := t.c.bbs.ListTasks(ctx, &basinv1.ListTasksRequest{CellId: cellID})
	if err != nil {
		t.c.log.Warn("list tasks of lost cell", "cell", cellID, "err", err)
		t.markFull()
	}
	for _, tk := range tasks.GetTasks() {
		if tk.GetState() == basinv1.TaskState_TASK_STATE_RUNNING {
			act.FailTasks = append(act.FailTasks, TaskFailure{TaskGUID: tk.GetTaskGuid(), Reason: fmt.Sprintf("cell %s disappeared before the task completed", cellID)})
		}
	}
	err = t.apply(ctx, act)
	t.c.log.Info("cell lost", "cell", cellID, "requeued", len(act.Unclaim), "tasks_failed", len(act.FailTasks), "took", time.Since(start))
	return err
}

func (t *term) markFull() {
	t.mu.Lock()
	t.full = true
	t.mu.Unlock()
	t.poke()
}

// events marks the LRPs that BBS events concern for a pass of their own. A
// broken or overrun stream is re-subscribed and followed by a full pass, as
// events may have been missed.
func (t *term) events(ctx context.Context, subscribed chan struct{}) error {
	first := true
	for ctx.Err() == nil {
		stream, err := t.c.bbs.SubscribeToEvents(ctx, &basinv1.SubscribeToEventsRequest{})
		if err == nil {
			// Headers come once the BBS has registered the subscription.
			_, err = stream.Header()
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			t.c.log.Warn("subscribe to events", "err", err)
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(500 * time.Millisecond):
			}
			continue
		}
		if first {
			close(subscribed)
			first = false
		} else {
			t.markFull()
		}
		for {
			resp, err := stream.Recv()
			if err != nil {
				if ctx.Err() == nil {
					t.c.log.Warn("events stream ended", "err", err)
				}
				break
			}
			if guid := eventGUID(resp.GetEvent()); guid != "" {
				t.mu.Lock()
				t.dirty[guid] = true
				t.mu.Unlock()
				t.poke()
			}
		}
	}
	return nil
}

// eventGUID returns the process guid of an LRP event that may need repair.
func eventGUID(ev *basinv1.Event) string {
	switch e := ev.GetEvent().(type) {
	case *basinv1.Event_DesiredLrpCreated:
		return e.DesiredLrpCreated.GetDesiredLrp().GetSchedule().GetProcessGuid()
	case *basinv1.Event_DesiredLrpChanged:
		return e.DesiredLrpChanged.GetAfter().GetSchedule().GetProcessGuid()
	case *basinv1.Event_ActualLrpCrashed:
		return e.ActualLrpCrashed.GetKey().GetProcessGuid()
	case *basinv1.Event_ActualLrpChanged:
		a := e.ActualLrpChanged.GetAfter()
		if a.GetState() == basinv1.ActualLRPState_ACTUAL_LRP_STATE_CRASHED || a.GetPlacementError() != "" {
			return a.GetKey().GetProcessGuid()
		}
	case *basinv1.Event_ActualLrpRemoved:
		return e.ActualLrpRemoved.GetActualLrp().GetKey().GetProcessGuid()
	}
	return ""
}

// loop runs full passes on the interval and when a deadline falls due, and
// passes over single LRPs as events mark them.
func (t *term) loop(ctx context.Context) error {
	cfg := t.c.cfg
	nextFull := cfg.Now()
	var deadline time.Time
	for {
		now := cfg.Now()
		t.mu.Lock()
		full := t.full || !now.Before(nextFull) || (!deadline.IsZero() && !now.Before(deadline))
		t.full = false
		var dirty []string
		if !full {
			for g := range t.dirty {
				dirty = append(dirty, g)
			}
		}
		t.dirty = make(map[string]bool)
		t.mu.Unlock()

		var next time.Time
		var err error
		switch {
		case full:
			next, err = t.fullPass(ctx)
			nextFull = cfg.Now().Add(cfg.Interval)
			deadline = next
		case len(dirty) > 0:
			next, err = t.lrpPass(ctx, dirty)
			if !next.IsZero() && (deadline.IsZero() || next.Before(deadline)) {
				deadline = next
			}
		}
		if err != nil {
			return err
		}
		wakeAt := nextFull
		if !deadline.IsZero() && deadline.Before(wakeAt) {
			wakeAt = deadline
		}
		tm := time.NewTimer(max(wakeAt.Sub(cfg.Now()), time.Millisecond))
		select {
		case <-ctx.Done():
			tm.Stop()
			return nil
		case <-t.wake:
		case <-tm.C:
		}
		tm.Stop()
	}
}

func (t *term) cellSet() map[string]bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make(map[string]bool, len(t.cells))
	for k := range t.cells {
		out[k] = true
	}
	return out
}

// queued reads the auction queue keys under prefix as "guid/index".
func (t *term) queued(ctx context.Context, prefix string) (map[string]bool, error) {
	resp, err := t.c.etcd.Get(ctx, prefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return nil, fmt.Errorf("list auction queue: %w", err)
	}
	out := make(map[string]bool, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		out[strings.TrimPrefix(string(kv.Key), t.c.keys.UnclaimedPrefix())] = true
	}
	return out, nil
}

func (t *term) timeouts() Timeouts {
	return Timeouts{Unclaimed: t.c.cfg.UnclaimedTimeout, ResolveTask: t.c.cfg.ResolveTaskTimeout}
}

// fullPass compares everything.
func (t *term) fullPass(ctx context.Context) (time.Time, error) {
	start := time.Now()
	defer func() { t.c.metrics.passSeconds.Observe(time.Since(start).Seconds()) }()
	in := Input{Complete: true, Cells: t.cellSet()}
	// The queue is read before the actuals: an instance claimed in between
	// then shows CLAIMED, never UNCLAIMED without its (old) queue key.
	var err error
	if in.Queued, err = t.queued(ctx, t.c.keys.UnclaimedPrefix()); err != nil {
		return t.retrySoon(err)
	}
	// Actuals before desired: an LRP desired in between then has its
	// instances missing from this pass (creating them is a guarded no-op),
	// never instances without their LRP, which would be retired as extra.
	as, err := t.c.bbs.ListActualLRPs(ctx, &basinv1.ListActualLRPsRequest{})
	if err != nil {
		return t.retrySoon(err)
	}
	ds, err := t.c.bbs.ListDesiredLRPSchedules(ctx, &basinv1.ListDesiredLRPSchedulesRequest{})
	if err != nil {
		return t.retrySoon(err)
	}
	ts, err := t.c.bbs.ListTasks(ctx, &basinv1.ListTasksRequest{})
	if err != nil {
		return t.retrySoon(err)
	}
	in.Desired, in.Actuals, in.Tasks = ds.GetSchedules(), as.GetActualLrps(), ts.GetTasks()
	in.Now = t.c.cfg.Now()
	act := Plan(in, t.c.cfg.Restart, t.timeouts())
	return act.Next, t.apply(ctx, act)
}

// lrpPass compares the given LRPs only.
func (t *term) lrpPass(ctx context.Context, guids []string) (time.Time, error) {
	var next time.Time
	cells := t.cellSet()
	for _, guid := range guids {
		in := Input{Cells: cells}
		var err error
		if in.Queued, err = t.queued(ctx, t.c.keys.UnclaimedPrefix()+guid+"/"); err != nil {
			return t.retrySoon(err)
		}
		// Actuals before desired, as in the full pass: a scale-up in
		// between must not make its new instances look extra.
		as, err := t.c.bbs.ListActualLRPs(ctx, &basinv1.ListActualLRPsRequest{ProcessGuid: guid})
		if err != nil {
			return t.retrySoon(err)
		}
		d, err := t.c.bbs.GetDesiredLRP(ctx, &basinv1.GetDesiredLRPRequest{ProcessGuid: guid})
		if status.Code(err) == codes.NotFound {
			continue
		}
		if err != nil {
			return t.retrySoon(err)
		}
		in.Desired = []*basinv1.DesiredLRPSchedule{d.GetDesiredLrp().GetSchedule()}
		in.Actuals = as.GetActualLrps()
		in.Now = t.c.cfg.Now()
		act := Plan(in, t.c.cfg.Restart, t.timeouts())
		if !act.Next.IsZero() && (next.IsZero() || act.Next.Before(next)) {
			next = act.Next
		}
		if err := t.apply(ctx, act); err != nil {
			return next, err
		}
	}
	return next, nil
}

// retrySoon logs a read error and asks for another pass in a second;
// reads failing is no reason to give up leadership.
func (t *term) retrySoon(err error) (time.Time, error) {
	t.c.log.Warn("converge", "err", err)
	t.c.metrics.errors.Inc()
	return t.c.cfg.Now().Add(time.Second), nil
}

// apply makes the BBS writes, each with the fence. A refusal for lost
// leadership ends the term; other refusals mean the record moved on.
func (t *term) apply(ctx context.Context, act Actions) error {
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(32)
	var fenced error
	var once sync.Once
	check := func(what string, err error) {
		if err == nil {
			return
		}
		if isFenceLost(err) {
			once.Do(func() { fenced = fmt.Errorf("%s: %w: %v", what, errFenced, err) })
			return
		}
		t.c.log.Debug("repair refused", "what", what, "err", err)
	}
	m := t.c.metrics
	for _, u := range act.Unclaim {
		g.Go(func() error {
			_, err := t.c.bbs.UnclaimActualLRP(gctx, &basinv1.UnclaimActualLRPRequest{Key: u.Key, InstanceKey: u.Instance, Fence: t.fence})
			if err == nil {
				m.repairs.WithLabelValues("unclaim").Inc()
				t.c.log.Info("requeued instance", "guid", u.Key.GetProcessGuid(), "index", u.Key.GetIndex(), "reason", u.Reason)
			}
			check("unclaim", err)
			return nil
		})
	}
	for _, k := range act.Retire {
		g.Go(func() error {
			_, err := t.c.bbs.RetireActualLRP(gctx, &basinv1.RetireActualLRPRequest{Key: k, Fence: t.fence})
			if err == nil {
				m.repairs.WithLabelValues("retire").Inc()
			}
			check("retire", err)
			return nil
		})
	}
	for _, f := range act.FailTasks {
		g.Go(func() error {
			_, err := t.c.bbs.FailTask(gctx, &basinv1.FailTaskRequest{TaskGuid: f.TaskGUID, FailureReason: f.Reason, Fence: t.fence})
			if err == nil {
				m.repairs.WithLabelValues("fail_task").Inc()
			}
			check("fail task", err)
			return nil
		})
	}
	for _, guid := range act.ResolveTasks {
		g.Go(func() error {
			_, err := t.c.bbs.ResolveTask(gctx, &basinv1.ResolveTaskRequest{TaskGuid: guid, Fence: t.fence})
			if err == nil {
				m.repairs.WithLabelValues("resolve_task").Inc()
			}
			check("resolve task", err)
			return nil
		})
	}
	for _, guid := range act.Missing {
		g.Go(func() error {
			resp, err := t.c.bbs.CreateMissingActualLRPs(gctx, &basinv1.CreateMissingActualLRPsRequest{ProcessGuid: guid, Fence: t.fence})
			if n := len(resp.GetCreated()); n > 0 {
				m.repairs.WithLabelValues("create").Add(float64(n))
				t.c.log.Info("created missing instances", "guid", guid, "indices", resp.GetCreated())
			}
			check("create missing", err)
			return nil
		})
	}
	g.Wait()
	return fenced
}

// isFenceLost tells a deposed leader's refused write from the state
// machine's refusals, which share FAILED_PRECONDITION.
func isFenceLost(err error) bool {
	s, ok := status.FromError(err)
	return ok && s.Code() == codes.FailedPrecondition && strings.Contains(s.Message(), bbs.ErrFenceLost.Error())
}
