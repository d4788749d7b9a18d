// Package auctioneer places UNCLAIMED instances and PENDING tasks on cells.
// One replica leads (elected through etcd); it watches the queue keys, batches
// them, asks every cell for its State, computes a plan with the pure
// placement.Place, and sends each cell its share with Perform. Work that
// cannot be placed is retried a few times and then given a placement error.
package auctioneer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/basinpaas/basin/auctioneer/placement"
	"github.com/basinpaas/basin/bbs"
	"github.com/basinpaas/basin/bbs/leader"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// Config configures an auctioneer replica. Zero values take the defaults.
type Config struct {
	// Prefix of basin's etcd keys; bbs.DefaultPrefix when empty.
	Prefix string
	// ID is this replica's election value (e.g. its host and debug address).
	ID string
	// LeaseTTL of the election session; 3 s.
	LeaseTTL time.Duration
	// BatchWindow is how long the leader gathers work after the first item
	// arrives; 50 ms.
	BatchWindow time.Duration
	// BusyWindow bounds the pause under sustained load: when work kept
	// arriving during the last auction, the next waits twice as long as
	// that one took (at most BusyWindow, and no longer once MaxBatch items
	// are due), with what gathered meanwhile. An auction costs a Perform
	// per cell it places on whatever its size, so back-to-back small
	// auctions would spend the fleet's time on those; pacing by the
	// auction's own duration keeps that to a third of the time, and adds
	// nothing when auctions are quick. 1 s.
	BusyWindow time.Duration
	// MaxBatch bounds one auction; 5000.
	MaxBatch int
	// CellStateTimeout bounds each cell's State call; cells that do not answer
	// in time sit the auction out. 1 s.
	CellStateTimeout time.Duration
	// CellStateMaxAge is how long a cell's State answer serves later
	// auctions of the same term, with what they placed on it taken off;
	// 1 s. See cellCache.
	CellStateMaxAge time.Duration
	// PerformTimeout bounds each Perform call; 5 s.
	PerformTimeout time.Duration
	// MaxAttempts: auctions an item may fail before it gets a placement
	// error; 5.
	MaxAttempts int
	// RetryDelay before a failed item is auctioned again; 500 ms.
	RetryDelay time.Duration
	// ClaimTimeout: work a cell accepted but has not claimed after this long
	// is auctioned again (a second claim loses in the BBS); 10 s.
	ClaimTimeout time.Duration
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
	if c.BatchWindow <= 0 {
		c.BatchWindow = 50 * time.Millisecond
	}
	if c.BusyWindow <= 0 {
		c.BusyWindow = time.Second
	}
	if c.MaxBatch <= 0 {
		c.MaxBatch = 5000
	}
	if c.CellStateTimeout <= 0 {
		c.CellStateTimeout = time.Second
	}
	if c.CellStateMaxAge <= 0 {
		c.CellStateMaxAge = time.Second
	}
	if c.PerformTimeout <= 0 {
		c.PerformTimeout = 5 * time.Second
	}
	if c.MaxAttempts <= 0 {
		c.MaxAttempts = 5
	}
	if c.RetryDelay <= 0 {
		c.RetryDelay = 500 * time.Millisecond
	}
	if c.ClaimTimeout <= 0 {
		c.ClaimTimeout = 10 * time.Second
	}
	if c.Now == nil {
		c.Now = time.Now
	}
}

// BBS is what the auctioneer asks of the BBS.
type BBS interface {
	ListDesiredLRPSchedules(ctx context.Context, in *basinv1.ListDesiredLRPSchedulesRequest, opts ...grpc.CallOption) (*basinv1.ListDesiredLRPSchedulesResponse, error)
	GetTask(ctx context.Context, in *basinv1.GetTaskRequest, opts ...grpc.CallOption) (*basinv1.GetTaskResponse, error)
	FailActualLRP(ctx context.Context, in *basinv1.FailActualLRPRequest, opts ...grpc.CallOption) (*basinv1.FailActualLRPResponse, error)
	FailTask(ctx context.Context, in *basinv1.FailTaskRequest, opts ...grpc.CallOption) (*basinv1.FailTaskResponse, error)
}

var _ BBS = (basinv1.BBSServiceClient)(nil)

// Auctioneer is one replica.
type Auctioneer struct {
	cfg     Config
	keys    bbs.Keys
	etcd    *clientv3.Client
	bbs     BBS
	log     *slog.Logger
	reg     *prometheus.Registry
	metrics *metrics

	mu    sync.Mutex
	conns map[string]*grpc.ClientConn // rep address → connection
}

// New returns an auctioneer replica that elects itself through etcd and
// writes through the BBS.
func New(cfg Config, etcd *clientv3.Client, b BBS, logger *slog.Logger) *Auctioneer {
	cfg.defaults()
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return &Auctioneer{
		cfg: cfg, keys: bbs.NewKeys(cfg.Prefix), etcd: etcd, bbs: b,
		log: logger, reg: reg, metrics: newMetrics(reg),
		conns: make(map[string]*grpc.ClientConn),
	}
}

// Registry holds the auctioneer's metrics, for a shared debug server.
func (a *Auctioneer) Registry() *prometheus.Registry { return a.reg }

// Run campaigns for leadership and auctions while leading, until ctx ends.
func (a *Auctioneer) Run(ctx context.Context) error {
	defer a.closeConns()
	g, gctx := errgroup.WithContext(ctx)
	if a.cfg.DebugAddress != "" {
		lis, err := bbs.ListenDebug(a.cfg.DebugAddress)
		if err != nil {
			return err
		}
		g.Go(func() error { return bbs.ServeDebug(gctx, lis, a.reg) })
	}
	g.Go(func() error {
		return leader.Run(gctx, a.etcd, leader.Config{
			Component: "auctioneer", Keys: a.keys, ID: a.cfg.ID, TTL: a.cfg.LeaseTTL, Logger: a.log,
		}, a.lead)
	})
	return g.Wait()
}

// lead runs one term: watch the queues and auction until leadership ends.
func (a *Auctioneer) lead(ctx context.Context, fence *basinv1.Fence) error {
	a.metrics.leader.Set(1)
	defer a.metrics.leader.Set(0)
	q := newQueue(a.keys)
	t := &term{a: a, fence: fence, q: q, schedules: make(map[string]*basinv1.DesiredLRPSchedule), cells: &cellCache{
		maxAge: a.cfg.CellStateMaxAge, now: a.cfg.Now, fetch: a.state, cells: make(map[string]*cachedCell),
		fetched: a.fetchedState,
	}}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return q.watch(gctx, a.etcd, a.keys.UnclaimedPrefix()) })
	g.Go(func() error { return q.watch(gctx, a.etcd, a.keys.PendingTaskPrefix()) })
	g.Go(func() error { return t.loop(gctx) })
	return g.Wait()
}

// fetchedState counts a State call; cells that fail or are slow sit the
// auction out.
func (a *Auctioneer) fetchedState(err error) {
	if err != nil {
		a.metrics.cellErrors.Inc()
		a.log.Debug("cell state", "err", err)
		return
	}
	a.metrics.cellStates.Inc()
}

// term is the state of one leadership term.
type term struct {
	a         *Auctioneer
	fence     *basinv1.Fence
	q         *queue
	schedules map[string]*basinv1.DesiredLRPSchedule
	cells     *cellCache
}

// errFenced ends a term: the BBS refused a write because this replica no
// longer holds its election key.
var errFenced = errors.New("auctioneer is no longer leader")

func (t *term) loop(ctx context.Context) error {
	cfg := t.a.cfg
	var lastEnd time.Time
	var lastTook time.Duration
	for {
		n, next := t.q.due(cfg.Now())
		t.a.metrics.queued.Set(float64(t.q.len()))
		if wait := busyPause(n, cfg.MaxBatch, lastTook, cfg.Now().Sub(lastEnd), cfg.BusyWindow); wait > 0 {
			if !t.gather(ctx, wait) {
				return nil
			}
		}
		if n == 0 {
			var timer <-chan time.Time
			var tm *time.Timer
			if !next.IsZero() {
				tm = time.NewTimer(max(next.Sub(cfg.Now()), time.Millisecond))
				timer = tm.C
			}
			select {
			case <-ctx.Done():
			case <-t.q.wake:
			case <-timer:
			}
			if tm != nil {
				tm.Stop()
			}
			if ctx.Err() != nil {
				return nil
			}
			// Gather what else arrives within the window into this batch.
			if n, _ := t.q.due(cfg.Now()); n < cfg.MaxBatch {
				select {
				case <-ctx.Done():
					return nil
				case <-time.After(cfg.BatchWindow):
				}
			}
		}
		if ctx.Err() != nil {
			return nil
		}
		batch := t.q.take(cfg.Now(), cfg.MaxBatch, cfg.ClaimTimeout)
		if len(batch) == 0 {
			continue
		}
		start := cfg.Now()
		if err := t.auction(ctx, batch); err != nil {
			return err
		}
		lastEnd = cfg.Now()
		lastTook = lastEnd.Sub(start)
	}
}

// busyPause is how long to let work gather before the next auction when
// due items are already waiting (they arrived while the last auction ran):
// twice what the last auction took, at most busyWindow, less what has passed
// since it ended; nothing when a full batch is due.
func busyPause(due, maxBatch int, lastTook, sinceEnd, busyWindow time.Duration) time.Duration {
	if due == 0 || due >= maxBatch {
		return 0
	}
	return max(min(2*lastTook, busyWindow)-sinceEnd, 0)
}

// gather waits up to d, or until a full batch is due; false when ctx ended.
func (t *term) gather(ctx context.Context, d time.Duration) bool {
	timer := time.NewTimer(d)
	defer timer.Stop()
	var checked time.Time
	for {
		select {
		case <-ctx.Done():
			return false
		case <-timer.C:
			return true
		case <-t.q.wake:
			// Counting what is due walks the queue: not on every arrival.
			if now := t.a.cfg.Now(); now.Sub(checked) >= t.a.cfg.BatchWindow {
				checked = now
				if n, _ := t.q.due(now); n >= t.a.cfg.MaxBatch {
					return true
				}
			}
		}
	}
}

// auction runs one batch: resolve the work, snapshot the cells, plan, commit.
func (t *term) auction(ctx context.Context, batch []item) error {
	start := time.Now()
	m := t.a.metrics
	m.batchSize.Observe(float64(len(batch)))
	work, byKey, err := t.resolve(ctx, batch)
	if err != nil {
		return err
	}
	resolved := time.Now()
	present, err := t.a.presences(ctx)
	if err != nil {
		t.a.log.Warn("list cells", "err", err)
	}
	cells := t.cells.snapshot(ctx, present)
	stated := time.Now()
	if ctx.Err() != nil {
		// Leadership ended mid-auction: an empty snapshot is no reason to
		// count failed attempts.
		return nil
	}
	plan := placement.Place(cells.cells, work.Work)
	t.cells.placed(plan)
	m.auctionSeconds.Observe(time.Since(start).Seconds())
	planned := time.Now()
	defer func() {
		t.a.log.Debug("auction", "items", len(batch), "cells", len(cells.cells),
			"placed", len(plan.LRPs)+len(plan.Tasks), "failed", len(plan.FailedLRPs)+len(plan.FailedTasks),
			"resolve", resolved.Sub(start), "state", stated.Sub(resolved), "place", planned.Sub(stated), "commit", time.Since(planned))
	}()

	var wg sync.WaitGroup
	var fenced sync.Once
	var fenceErr error
	failed := func(key, reason string) {
		if err := t.fail(ctx, byKey[key], reason); errors.Is(err, errFenced) {
			fenced.Do(func() { fenceErr = err })
		}
	}
	for _, f := range plan.FailedLRPs {
		failed(t.a.keys.Unclaimed(f.LRP.ProcessGUID, f.LRP.Index), f.Reason)
	}
	for _, f := range plan.FailedTasks {
		failed(t.a.keys.PendingTask(f.Task.GUID), f.Reason)
	}
	perCell := make(map[string]*basinv1.PerformRequest)
	add := func(cellID string) *basinv1.PerformRequest {
		r := perCell[cellID]
		if r == nil {
			r = &basinv1.PerformRequest{}
			perCell[cellID] = r
		}
		return r
	}
	for _, p := range plan.LRPs {
		l := p.LRP
		add(p.CellID).Lrps = append(add(p.CellID).Lrps, &basinv1.LRPStart{
			Key:       &basinv1.ActualLRPKey{ProcessGuid: l.ProcessGUID, Index: l.Index, Domain: l.Domain},
			Stack:     l.Stack,
			Resources: t.schedules[l.ProcessGUID].GetResources(),
		})
	}
	for _, p := range plan.Tasks {
		add(p.CellID).Tasks = append(add(p.CellID).Tasks, &basinv1.TaskStart{
			TaskGuid: p.Task.GUID, Stack: p.Task.Stack, Resources: work.taskResources[p.Task.GUID],
		})
	}
	var mu sync.Mutex
	var turnedDown []string
	for cellID, req := range perCell {
		wg.Go(func() {
			rejected := t.perform(ctx, cells.addrs[cellID], cellID, req)
			for key, reason := range rejected {
				failed(key, reason)
			}
			if len(rejected) > 0 {
				mu.Lock()
				turnedDown = append(turnedDown, cellID)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	// What the cache holds for these cells is wrong: ask them again.
	for _, id := range turnedDown {
		t.cells.forget(id)
	}
	m.placements.Add(float64(len(plan.LRPs) + len(plan.Tasks)))
	return fenceErr
}

// perform sends one cell its share and returns the keys it turned down
// with the reason.
func (t *term) perform(ctx context.Context, addr, cellID string, req *basinv1.PerformRequest) map[string]string {
	rejected := make(map[string]string)
	rejectAll := func(reason string) {
		for _, l := range req.Lrps {
			rejected[t.a.keys.Unclaimed(l.GetKey().GetProcessGuid(), l.GetKey().GetIndex())] = reason
		}
		for _, tk := range req.Tasks {
			rejected[t.a.keys.PendingTask(tk.GetTaskGuid())] = reason
		}
	}
	conn, err := t.a.conn(addr)
	if err != nil {
		rejectAll(fmt.Sprintf("cell %s unreachable", cellID))
		return rejected
	}
	pctx, cancel := context.WithTimeout(ctx, t.a.cfg.PerformTimeout)
	defer cancel()
	resp, err := basinv1.NewCellServiceClient(conn).Perform(pctx, req)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		t.a.log.Warn("perform", "cell", cellID, "err", err)
		rejectAll(fmt.Sprintf("cell %s unreachable", cellID))
		return rejected
	}
	for _, r := range resp.GetRejectedLrps() {
		rejected[t.a.keys.Unclaimed(r.GetKey().GetProcessGuid(), r.GetKey().GetIndex())] = r.GetReason()
	}
	for _, r := range resp.GetRejectedTasks() {
		rejected[t.a.keys.PendingTask(r.GetTaskGuid())] = r.GetReason()
	}
	return rejected
}

// fail records a failed attempt; after MaxAttempts the work gets its
// placement error in the BBS, which takes it off the queue.
func (t *term) fail(ctx context.Context, it item, reason string) error {
	cfg := t.a.cfg
	n := t.q.retry(it.key, reason, cfg.Now().Add(cfg.RetryDelay))
	if n == 0 || n < cfg.MaxAttempts {
		return nil
	}
	t.a.metrics.failures.WithLabelValues(reasonLabel(reason)).Inc()
	var err error
	switch it.kind {
	case kindLRP:
		_, err = t.a.bbs.FailActualLRP(ctx, &basinv1.FailActualLRPRequest{
			Key:            &basinv1.ActualLRPKey{ProcessGuid: it.guid, Index: it.index, Domain: t.schedules[it.guid].GetDomain()},
			PlacementError: reason,
			Fence:          t.fence,
		})
	case kindTask:
		_, err = t.a.bbs.FailTask(ctx, &basinv1.FailTaskRequest{TaskGuid: it.guid, FailureReason: reason, Fence: t.fence})
	}
	if err == nil {
		t.a.log.Info("placement failed", "key", it.key, "reason", reason, "attempts", n)
		return nil
	}
	if isFenceLost(err) {
		return fmt.Errorf("fail %s: %w: %v", it.key, errFenced, err)
	}
	// Not UNCLAIMED or PENDING any more (claimed, removed): nothing to fail.
	t.a.log.Debug("fail placement", "key", it.key, "err", err)
	return nil
}

// isFenceLost tells a deposed leader's refused write from other refusals
// (the state machine's), which share FAILED_PRECONDITION.
func isFenceLost(err error) bool {
	s, ok := status.FromError(err)
	return ok && s.Code() == codes.FailedPrecondition && strings.Contains(s.Message(), bbs.ErrFenceLost.Error())
}

// reasonLabel keeps the failures metric's label set small: reasons that name
// a stack or tags collapse to their kind.
func reasonLabel(reason string) string {
	switch {
	case strings.HasPrefix(reason, "no cell with stack "):
		return "no cell with stack"
	case strings.HasPrefix(reason, "no cell with placement tags"):
		return "no cell with placement tags"
	case strings.HasPrefix(reason, "cell ") && strings.HasSuffix(reason, " unreachable"):
		return "cell unreachable"
	}
	return reason
}

// resolved is a batch ready for placement.
type resolved struct {
	placement.Work
	taskResources map[string]*basinv1.ResourceLimits
}

// resolve turns queue items into placement work, reading the schedules and
// tasks the queue keys point to. Items whose record is gone are held back:
// their queue key is on its way out.
func (t *term) resolve(ctx context.Context, batch []item) (resolved, map[string]item, error) {
	out := resolved{taskResources: make(map[string]*basinv1.ResourceLimits)}
	byKey := make(map[string]item, len(batch))
	refreshed := false
	for _, it := range batch {
		byKey[it.key] = it
		if it.kind != kindLRP {
			continue
		}
		if _, ok := t.schedules[it.guid]; !ok && !refreshed {
			// Stack, resources and placement of an LRP never change, so
			// schedules are read once per term, all at once.
			resp, err := t.a.bbs.ListDesiredLRPSchedules(ctx, &basinv1.ListDesiredLRPSchedulesRequest{})
			if err != nil {
				t.a.log.Warn("list desired LRP schedules", "err", err)
				for _, it := range batch {
					t.q.hold(it.key, t.a.cfg.Now().Add(t.a.cfg.RetryDelay))
				}
				return out, byKey, nil
			}
			for _, s := range resp.GetSchedules() {
				t.schedules[s.GetProcessGuid()] = s
			}
			refreshed = true
		}
	}
	var mu sync.Mutex
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(16)
	for _, it := range batch {
		switch it.kind {
		case kindLRP:
			s, ok := t.schedules[it.guid]
			if !ok {
				continue
			}
			out.LRPs = append(out.LRPs, placement.LRP{
				ProcessGUID: it.guid, Domain: s.GetDomain(), Index: it.index, Stack: s.GetStack(),
				MemoryMB: s.GetResources().GetMemoryMb(), DiskMB: s.GetResources().GetDiskMb(),
				RequireTags: s.GetPlacement().GetRequireTags(),
			})
		case kindTask:
			g.Go(func() error {
				resp, err := t.a.bbs.GetTask(gctx, &basinv1.GetTaskRequest{TaskGuid: it.guid})
				if err != nil {
					if status.Code(err) != codes.NotFound {
						t.a.log.Warn("get task", "task", it.guid, "err", err)
						t.q.hold(it.key, t.a.cfg.Now().Add(t.a.cfg.RetryDelay))
					}
					return nil
				}
				task := resp.GetTask()
				if task.GetState() != basinv1.TaskState_TASK_STATE_PENDING {
					return nil
				}
				d := task.GetDefinition()
				mu.Lock()
				defer mu.Unlock()
				out.Tasks = append(out.Tasks, placement.Task{
					GUID: it.guid, Stack: d.GetStack(), MemoryMB: d.GetResources().GetMemoryMb(),
					DiskMB: d.GetResources().GetDiskMb(), RequireTags: d.GetPlacement().GetRequireTags(),
				})
				out.taskResources[it.guid] = d.GetResources()
				return nil
			})
		}
	}
	return out, byKey, g.Wait()
}

// conn returns a shared connection to a rep; gRPC dials lazily and
// reconnects by itself.
func (a *Auctioneer) conn(addr string) (*grpc.ClientConn, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if c, ok := a.conns[addr]; ok {
		return c, nil
	}
	c, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("connect to cell at %s: %w", addr, err)
	}
	a.conns[addr] = c
	return c, nil
}

func (a *Auctioneer) closeConns() {
	a.mu.Lock()
	defer a.mu.Unlock()
	for addr, c := range a.conns {
		c.Close()
		delete(a.conns, addr)
	}
}
