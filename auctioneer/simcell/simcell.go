// Package simcell is a cell without containers, for tests and benchmarks of
// the auctioneer and converger: a CellService gRPC server that registers its
// presence under a lease, accepts or rejects Perform by its capacity, and
// claims and starts what it accepts through the BBS with its presence fence,
// as the real rep does. Instances "run" as entries in a map.
package simcell

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/basinpaas/basin/bbs"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// Config describes one simulated cell.
type Config struct {
	ID     string
	Zone   string
	Stacks []string
	Tags   []string
	// Capacity in MiB and containers.
	MemoryMB, DiskMB int64
	Containers       int32
	// LeaseTTL of the presence key; 3 s when zero.
	LeaseTTL time.Duration
	Keys     bbs.Keys
	// Registry, when set, is told of every start and stop, so a test can
	// check that no instance index runs on two cells at once.
	Registry *Registry
	Logger   *slog.Logger
}

// BBS is what a cell asks of the BBS.
type BBS interface {
	ClaimActualLRP(ctx context.Context, in *basinv1.ClaimActualLRPRequest, opts ...grpc.CallOption) (*basinv1.ClaimActualLRPResponse, error)
	StartActualLRP(ctx context.Context, in *basinv1.StartActualLRPRequest, opts ...grpc.CallOption) (*basinv1.StartActualLRPResponse, error)
	CrashActualLRP(ctx context.Context, in *basinv1.CrashActualLRPRequest, opts ...grpc.CallOption) (*basinv1.CrashActualLRPResponse, error)
	StartTask(ctx context.Context, in *basinv1.StartTaskRequest, opts ...grpc.CallOption) (*basinv1.StartTaskResponse, error)
	CompleteTask(ctx context.Context, in *basinv1.CompleteTaskRequest, opts ...grpc.CallOption) (*basinv1.CompleteTaskResponse, error)
}

type instKey struct {
	guid  string
	index int32
}

type alloc struct {
	instanceGUID  string
	memMB, diskMB int64
	running       bool
}

// Cell is a running simulated cell.
type Cell struct {
	basinv1.UnimplementedCellServiceServer
	cfg      Config
	etcd     *clientv3.Client
	bbs      BBS
	log      *slog.Logger
	presence *basinv1.CellPresence
	fence    *basinv1.Fence
	lis      net.Listener
	srv      *grpc.Server

	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu     sync.Mutex
	allocs map[instKey]*alloc
	tasks  int
	seq    int
	dead   bool
}

// Start registers the cell and serves until Stop or Kill.
func Start(ctx context.Context, etcd *clientv3.Client, b BBS, cfg Config) (*Cell, error) {
	if cfg.LeaseTTL <= 0 {
		cfg.LeaseTTL = 3 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("listen: %w", err)
	}
	c := &Cell{cfg: cfg, etcd: etcd, bbs: b, log: cfg.Logger.With("cell", cfg.ID), lis: lis, allocs: make(map[instKey]*alloc)}
	c.presence = &basinv1.CellPresence{
		CellId: cfg.ID, RepAddress: lis.Addr().String(), Zone: cfg.Zone, Stacks: cfg.Stacks,
		Capacity:      &basinv1.CellCapacity{MemoryMb: cfg.MemoryMB, DiskMb: cfg.DiskMB, Containers: cfg.Containers},
		PlacementTags: cfg.Tags, AdvertiseAddress: "127.0.0.1",
	}
	lease, err := etcd.Grant(ctx, int64(max(1, cfg.LeaseTTL/time.Second)))
	if err != nil {
		lis.Close()
		return nil, fmt.Errorf("grant presence lease: %w", err)
	}
	key := cfg.Keys.Cell(cfg.ID)
	val, _ := proto.Marshal(c.presence)
	resp, err := etcd.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, string(val), clientv3.WithLease(lease.ID))).Commit()
	if err != nil || !resp.Succeeded {
		lis.Close()
		return nil, fmt.Errorf("register presence %s: exists or failed: %v", key, err)
	}
	c.fence = &basinv1.Fence{Key: key, CreateRevision: resp.Header.Revision}
	rctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	c.cancel = cancel
	ka, err := etcd.KeepAlive(rctx, lease.ID)
	if err != nil {
		cancel()
		lis.Close()
		return nil, fmt.Errorf("keep presence alive: %w", err)
	}
	c.wg.Go(func() {
		for range ka {
		}
	})
	c.wg.Go(func() { c.watchIndex(rctx) })
	c.srv = grpc.NewServer()
	basinv1.RegisterCellServiceServer(c.srv, c)
	c.wg.Go(func() { c.srv.Serve(lis) })
	return c, nil
}

// ID is the cell's id.
func (c *Cell) ID() string { return c.cfg.ID }

// Fence is the cell's presence fence.
func (c *Cell) Fence() *basinv1.Fence { return c.fence }

// Kill ends the cell as SIGKILL would: it stops answering and stops renewing
// its lease without revoking it, so its presence vanishes when the lease
// expires. Its instances die with it.
func (c *Cell) Kill() {
	c.mu.Lock()
	c.dead = true
	for k := range c.allocs {
		c.cfg.Registry.stopped(k, c.cfg.ID)
	}
	c.allocs = map[instKey]*alloc{}
	c.mu.Unlock()
	c.srv.Stop()
	c.cancel()
	c.wg.Wait()
}

// Crash ends a running instance and reports it CRASHED through the BBS, as
// a cell does when an app exits.
func (c *Cell) Crash(ctx context.Context, guid string, index int32, reason string) error {
	k := instKey{guid, index}
	c.mu.Lock()
	a := c.allocs[k]
	if a == nil || !a.running {
		c.mu.Unlock()
		return fmt.Errorf("%s/%d does not run on cell %s", guid, index, c.cfg.ID)
	}
	delete(c.allocs, k)
	c.cfg.Registry.stopped(k, c.cfg.ID)
	c.mu.Unlock()
	_, err := c.bbs.CrashActualLRP(ctx, &basinv1.CrashActualLRPRequest{
		Key:         &basinv1.ActualLRPKey{ProcessGuid: guid, Index: index},
		InstanceKey: &basinv1.ActualLRPInstanceKey{InstanceGuid: a.instanceGUID, CellId: c.cfg.ID},
		Reason:      reason, Fence: c.fence,
	})
	return err
}

// Running lists the instances running here as "guid/index".
func (c *Cell) Running() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
	for k, a := range c.allocs {
		if a.running {
			out = append(out, fmt.Sprintf("%s/%d", k.guid, k.index))
		}
	}
	return out
}

// State reports capacity left and what holds it.
func (c *Cell) State(context.Context, *basinv1.StateRequest) (*basinv1.StateResponse, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	resp := &basinv1.StateResponse{Presence: c.presence, Tasks: int32(c.tasks)}
	mem, disk, n := c.usedLocked()
	resp.Available = &basinv1.CellCapacity{MemoryMb: c.cfg.MemoryMB - mem, DiskMb: c.cfg.DiskMB - disk, Containers: c.cfg.Containers - n}
	for k, a := range c.allocs {
		resp.Lrps = append(resp.Lrps, &basinv1.LRPAllocation{ProcessGuid: k.guid, Index: k.index, MemoryMb: a.memMB, DiskMb: a.diskMB})
	}
	return resp, nil
}

func (c *Cell) usedLocked() (mem, disk int64, n int32) {
	for _, a := range c.allocs {
		mem += a.memMB
		disk += a.diskMB
		n++
	}
	return mem, disk, n + int32(c.tasks)
}

// Perform accepts what fits and claims and starts it in the background.
func (c *Cell) Perform(ctx context.Context, req *basinv1.PerformRequest) (*basinv1.PerformResponse, error) {
	resp := &basinv1.PerformResponse{}
	var starts []*basinv1.LRPStart
	c.mu.Lock()
	mem, disk, n := c.usedLocked()
	for _, l := range req.GetLrps() {
		k := instKey{l.GetKey().GetProcessGuid(), l.GetKey().GetIndex()}
		lm, ld := l.GetResources().GetMemoryMb(), l.GetResources().GetDiskMb()
		reason := ""
		switch {
		case c.allocs[k] != nil:
			reason = "already on this cell"
		case mem+lm > c.cfg.MemoryMB:
			reason = "insufficient resources: memory"
		case disk+ld > c.cfg.DiskMB:
			reason = "insufficient resources: disk"
		case n+1 > c.cfg.Containers:
			reason = "insufficient resources: containers"
		}
		if reason != "" {
			resp.RejectedLrps = append(resp.RejectedLrps, &basinv1.RejectedLRP{Key: l.GetKey(), Reason: reason})
			continue
		}
		mem, disk, n = mem+lm, disk+ld, n+1
		c.seq++
		c.allocs[k] = &alloc{instanceGUID: fmt.Sprintf("%s-%d", c.cfg.ID, c.seq), memMB: lm, diskMB: ld}
		starts = append(starts, l)
	}
	var tasks []string
	for _, t := range req.GetTasks() {
		if n+1 > c.cfg.Containers || mem+t.GetResources().GetMemoryMb() > c.cfg.MemoryMB {
			resp.RejectedTasks = append(resp.RejectedTasks, &basinv1.RejectedTask{TaskGuid: t.GetTaskGuid(), Reason: "insufficient resources: memory"})
			continue
		}
		n++
		c.tasks++
		tasks = append(tasks, t.GetTaskGuid())
	}
	c.mu.Unlock()
	c.cfg.Registry.accepted(len(starts))
	// Claims and starts outlive the Perform call, as with a real cell.
	for _, l := range starts {
		c.wg.Go(func() { c.start(l.GetKey()) })
	}
	for _, g := range tasks {
		c.wg.Go(func() { c.runTask(g) })
	}
	return resp, nil
}

func (c *Cell) start(key *basinv1.ActualLRPKey) {
	k := instKey{key.GetProcessGuid(), key.GetIndex()}
	c.mu.Lock()
	a := c.allocs[k]
	c.mu.Unlock()
	if a == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ik := &basinv1.ActualLRPInstanceKey{InstanceGuid: a.instanceGUID, CellId: c.cfg.ID}
	drop := func(err error) {
		c.log.Debug("start", "guid", k.guid, "index", k.index, "err", err)
		c.mu.Lock()
		if c.allocs[k] == a {
			delete(c.allocs, k)
		}
		c.mu.Unlock()
	}
	// A claim whose reply is lost may still have happened: claiming again
	// with the same instance key is a no-op, so retry until the BBS says
	// yes or no rather than forget an instance it recorded here.
	for {
		_, err := c.bbs.ClaimActualLRP(ctx, &basinv1.ClaimActualLRPRequest{Key: key, InstanceKey: ik, Fence: c.fence})
		if err == nil {
			break
		}
		if code := status.Code(err); code == codes.FailedPrecondition || code == codes.NotFound || code == codes.InvalidArgument || ctx.Err() != nil {
			drop(err)
			return
		}
		select {
		case <-ctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
	}
	c.mu.Lock()
	if c.dead || c.allocs[k] != a {
		c.mu.Unlock()
		return
	}
	// The instance "runs" from here: a real cell starts its container now.
	if err := c.cfg.Registry.started(k, c.cfg.ID); err != nil {
		c.log.Error("double run", "err", err)
	}
	a.running = true
	c.mu.Unlock()
	ni := &basinv1.ActualLRPNetInfo{Address: "127.0.0.1", Ports: []*basinv1.PortMapping{{ContainerPort: 8080, HostPort: 61000}}}
	if _, err := c.bbs.StartActualLRP(ctx, &basinv1.StartActualLRPRequest{Key: key, InstanceKey: ik, NetInfo: ni, Fence: c.fence}); err != nil {
		c.log.Debug("mark running", "guid", k.guid, "index", k.index, "err", err)
		return
	}
	c.cfg.Registry.markedRunning()
}

func (c *Cell) runTask(guid string) {
	defer func() {
		c.mu.Lock()
		c.tasks--
		c.mu.Unlock()
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.bbs.StartTask(ctx, &basinv1.StartTaskRequest{TaskGuid: guid, CellId: c.cfg.ID, Fence: c.fence}); err != nil {
		return
	}
	c.bbs.CompleteTask(ctx, &basinv1.CompleteTaskRequest{TaskGuid: guid, CellId: c.cfg.ID, Result: "ok", Fence: c.fence})
}

// watchIndex stops instances whose cell index key goes away (retired,
// unclaimed, crashed), as a real cell stops their containers.
func (c *Cell) watchIndex(ctx context.Context) {
	prefix := c.cfg.Keys.CellIndexPrefix(c.cfg.ID)
	for ctx.Err() == nil {
		wch := c.etcd.Watch(clientv3.WithRequireLeader(ctx), prefix, clientv3.WithPrefix())
		for wr := range wch {
			for _, ev := range wr.Events {
				if ev.Type != clientv3.EventTypeDelete {
					continue
				}
				_, guid, idx, ok := c.cfg.Keys.ParseCellIndex(string(ev.Kv.Key))
				if !ok {
					continue
				}
				k := instKey{guid, idx}
				c.mu.Lock()
				if a := c.allocs[k]; a != nil {
					delete(c.allocs, k)
					if a.running {
						c.cfg.Registry.stopped(k, c.cfg.ID)
					}
				}
				c.mu.Unlock()
			}
		}
	}
}

// Registry records where each instance runs across cells.
type Registry struct {
	running atomic.Int64
	accepts atomic.Int64
	mu      sync.Mutex
	where   map[instKey]string
	doubles []string
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry { return &Registry{where: make(map[instKey]string)} }

func (r *Registry) started(k instKey, cell string) error {
	if r == nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if other, ok := r.where[k]; ok && other != cell {
		err := fmt.Errorf("%s/%d runs on %s and %s", k.guid, k.index, other, cell)
		r.doubles = append(r.doubles, err.Error())
		return err
	}
	r.where[k] = cell
	return nil
}

func (r *Registry) stopped(k instKey, cell string) {
	if r == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.where[k] == cell {
		delete(r.where, k)
	}
}

// Doubles lists every time an instance index started on a cell while
// running on another.
func (r *Registry) Doubles() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.doubles) == 0 {
		return nil
	}
	return errors.New(fmt.Sprint(r.doubles))
}

func (r *Registry) markedRunning() {
	if r != nil {
		r.running.Add(1)
	}
}

func (r *Registry) accepted(n int) {
	if r != nil {
		r.accepts.Add(int64(n))
	}
}

// Accepted counts the instances the cells accepted in Perform.
func (r *Registry) Accepted() int64 { return r.accepts.Load() }

// MarkedRunning counts the instances the cells have marked RUNNING in the
// BBS since the registry was made.
func (r *Registry) MarkedRunning() int64 { return r.running.Load() }

// PerCell returns, for each process guid, how many instances run on each cell.
func (r *Registry) PerCell() map[string]map[string]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make(map[string]map[string]int)
	for k, cell := range r.where {
		if out[k.guid] == nil {
			out[k.guid] = make(map[string]int)
		}
		out[k.guid][cell]++
	}
	return out
}

// Count is how many instances run across the registry's cells.
func (r *Registry) Count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.where)
}
