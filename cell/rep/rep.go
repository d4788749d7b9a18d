// Package rep is the half of a cell that speaks for it: presence under a
// lease, State and Perform for the auctioneer, claims and reports through the
// BBS, route keys under the cell's lease, reconciliation after a restart or a
// lost lease, and evacuation. The executor (package executor) runs the
// containers; the rep decides what runs and tells the BBS what happened.
//
// Every write the rep asks of the BBS carries its fence: the presence key and
// the create revision it got when it last registered. A cell whose lease
// lapsed can therefore no longer claim, start, crash or complete anything
// until it has registered again, which it does only after destroying the
// containers of instances that moved elsewhere meanwhile.
package rep

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/basinpaas/basin/bbs"
	"github.com/basinpaas/basin/cell/executor"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

// LabelCellID marks the containers a cell started, so cells sharing one
// containerd (basin dev up --cells N) adopt or destroy only their own.
const LabelCellID = "basin.io/cell-id"

// Executor is what the rep needs of the executor (package executor).
type Executor interface {
	Start(ctx context.Context, spec executor.Spec) (executor.Info, error)
	WaitHealthy(ctx context.Context, guid string) (executor.Info, error)
	Stop(ctx context.Context, guid string, grace time.Duration) error
	List(ctx context.Context) ([]executor.Info, error)
	Adopt(ctx context.Context, guid string) (executor.Info, error)
	Destroy(ctx context.Context, guid string) error
	Logs(guid string) (*executor.LogBuffer, error)
	Exec(ctx context.Context, guid string, spec executor.ExecSpec) (int, error)
}

// BBS is the part of the BBS API a cell calls; *bbs.Client satisfies it.
type BBS interface {
	GetDesiredLRP(ctx context.Context, in *basinv1.GetDesiredLRPRequest, opts ...grpc.CallOption) (*basinv1.GetDesiredLRPResponse, error)
	ListDesiredLRPs(ctx context.Context, in *basinv1.ListDesiredLRPsRequest, opts ...grpc.CallOption) (*basinv1.ListDesiredLRPsResponse, error)
	ApplyActualLRPTransitions(ctx context.Context, in *basinv1.ApplyActualLRPTransitionsRequest, opts ...grpc.CallOption) (*basinv1.ApplyActualLRPTransitionsResponse, error)
	GetActualLRP(ctx context.Context, in *basinv1.GetActualLRPRequest, opts ...grpc.CallOption) (*basinv1.GetActualLRPResponse, error)
	ListActualLRPs(ctx context.Context, in *basinv1.ListActualLRPsRequest, opts ...grpc.CallOption) (*basinv1.ListActualLRPsResponse, error)
	ClaimActualLRP(ctx context.Context, in *basinv1.ClaimActualLRPRequest, opts ...grpc.CallOption) (*basinv1.ClaimActualLRPResponse, error)
	StartActualLRP(ctx context.Context, in *basinv1.StartActualLRPRequest, opts ...grpc.CallOption) (*basinv1.StartActualLRPResponse, error)
	CrashActualLRP(ctx context.Context, in *basinv1.CrashActualLRPRequest, opts ...grpc.CallOption) (*basinv1.CrashActualLRPResponse, error)
	UnclaimActualLRP(ctx context.Context, in *basinv1.UnclaimActualLRPRequest, opts ...grpc.CallOption) (*basinv1.UnclaimActualLRPResponse, error)
	GetTask(ctx context.Context, in *basinv1.GetTaskRequest, opts ...grpc.CallOption) (*basinv1.GetTaskResponse, error)
	StartTask(ctx context.Context, in *basinv1.StartTaskRequest, opts ...grpc.CallOption) (*basinv1.StartTaskResponse, error)
	CompleteTask(ctx context.Context, in *basinv1.CompleteTaskRequest, opts ...grpc.CallOption) (*basinv1.CompleteTaskResponse, error)
	ListTasks(ctx context.Context, in *basinv1.ListTasksRequest, opts ...grpc.CallOption) (*basinv1.ListTasksResponse, error)
	WatchSchedules(ctx context.Context, opts ...grpc.CallOption) (basinv1.BBSService_WatchSchedulesClient, error)
}

var _ BBS = (*bbs.Client)(nil)
var _ Executor = (*executor.Executor)(nil)

// Config configures a Rep. CellID, RepAddress and Capacity are required.
type Config struct {
	CellID string
	Zone   string
	// Stacks this cell runs; default ["tiny"].
	Stacks        []string
	PlacementTags []string
	Capacity      *basinv1.CellCapacity
	// RepAddress is where the auctioneer reaches this rep's gRPC API.
	RepAddress string
	// AdvertiseAddress is where instance ports are mapped (route endpoints
	// and net info); default 127.0.0.1.
	AdvertiseAddress string
	// Keys is the etcd key layout; default under bbs.DefaultPrefix.
	Keys bbs.Keys
	// LeaseTTL of presence and routes; default 3 s.
	LeaseTTL time.Duration
	// StopGrace is SIGTERM → SIGKILL for stopped instances; default 10 s.
	StopGrace time.Duration
	// RouteDrain is how long a routed instance being stopped keeps running
	// after its routes are deleted, so routers see the deletion through
	// their watch and requests in flight finish, before it gets SIGTERM;
	// default 1 s, negative stops at once.
	RouteDrain time.Duration
	// EvacuationTimeout bounds the wait for replacements; default 60 s.
	EvacuationTimeout time.Duration
	// TaskTimeout applies to tasks that set none; default 1 h.
	TaskTimeout time.Duration
	// DropletDir caches fetched droplets by digest.
	DropletDir string
	// HTTPClient fetches http(s) droplets; default one with timeouts.
	HTTPClient *http.Client
	// MaxDropletBytes bounds one droplet download (and a staging's
	// droplet, build cache and bits); default 2 GiB.
	MaxDropletBytes int64
	// BuilderPath is the host's static basin-builder, bind-mounted
	// read-only into staging containers; staging tasks fail without it.
	BuilderPath string
	// StagingDir keeps staging tasks' workspaces (bits, cache, output);
	// default "staging" beside DropletDir.
	StagingDir string
	// BuildpackDir keeps buildpacks unpacked once per archive digest;
	// default "buildpacks" beside DropletDir.
	BuildpackDir string
	// StagingEnv is added to every staging container's environment: the
	// host's way to the package registries (GOPROXY, npm_config_registry,
	// proxies), so buildpacks reach what the host reaches.
	StagingEnv []string
	// CABundle, when set, is a host file of trusted CA certificates mounted
	// read-only over the stack's bundle in staging containers, so
	// buildpacks trust the registries (and TLS proxies) the host trusts.
	CABundle string
	Logger   *slog.Logger
	// Metrics, when set, receives the rep's metrics.
	Metrics *Metrics
}

func (c *Config) withDefaults() {
	if len(c.Stacks) == 0 {
		c.Stacks = []string{"tiny"}
	}
	if c.AdvertiseAddress == "" {
		c.AdvertiseAddress = "127.0.0.1"
	}
	if c.Keys.Prefix == "" {
		c.Keys = bbs.NewKeys("")
	}
	if c.LeaseTTL == 0 {
		c.LeaseTTL = 3 * time.Second
	}
	if c.StopGrace == 0 {
		c.StopGrace = 10 * time.Second
	}
	if c.RouteDrain == 0 {
		c.RouteDrain = time.Second
	}
	if c.EvacuationTimeout == 0 {
		c.EvacuationTimeout = 60 * time.Second
	}
	if c.TaskTimeout == 0 {
		c.TaskTimeout = time.Hour
	}
	if c.HTTPClient == nil {
		c.HTTPClient = &http.Client{Timeout: 10 * time.Minute, Transport: &http.Transport{
			Proxy: http.ProxyFromEnvironment, TLSHandshakeTimeout: 10 * time.Second,
			ResponseHeaderTimeout: 30 * time.Second, IdleConnTimeout: 90 * time.Second, MaxIdleConnsPerHost: 4,
		}}
	}
	if c.MaxDropletBytes == 0 {
		c.MaxDropletBytes = 2 << 30
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Metrics == nil {
		c.Metrics = NewMetrics(nil)
	}
}

// Rep speaks for one cell. Create it with New, deliver the executor's events
// to OnEvent, and call Run.
type Rep struct {
	cfg   Config
	etcd  *clientv3.Client
	bbs   BBS
	exec  Executor
	log   *slog.Logger
	m     *Metrics
	drops *dropletCache
	ready chan struct{} // closed once Run registered and reconciled
	// transitions and desired batch the claims, starts and desired-LRP
	// reads of instances starting together.
	transitions *coalescer[*basinv1.ActualLRPTransition, *basinv1.ActualLRP]
	desired     *coalescer[desiredRead, *basinv1.DesiredLRP]

	// scheduleNoted tells followSchedules an instance read its schedule,
	// noted (under mu) with the oldest revision read since it last looked.
	scheduleNoted chan struct{}
	noted         map[string]int64

	wg     sync.WaitGroup // goroutines started through goAttach
	runCtx context.Context

	mu         sync.Mutex
	lrps       map[string]*lrp  // by instance guid
	gone       []goneInstance   // recently ended instances, for Logs
	tasks      map[string]*task // by task guid
	evacuating bool
	evacDone   chan struct{} // closed when an evacuation finished
	lease      clientv3.LeaseID
	fence      *basinv1.Fence

	// buildpacks keeps staging tasks' buildpacks unpacked by digest.
	buildpacks *buildpackCache
}

// New validates cfg and returns a Rep; nothing happens until Run.
func New(cfg Config, etcd *clientv3.Client, b BBS, exec Executor) (*Rep, error) {
	cfg.withDefaults()
	switch {
	case cfg.CellID == "":
		return nil, errors.New("rep: Config.CellID is empty")
	case cfg.Capacity == nil:
		return nil, errors.New("rep: Config.Capacity is nil")
	case cfg.RepAddress == "":
		return nil, errors.New("rep: Config.RepAddress is empty")
	case cfg.DropletDir == "":
		return nil, errors.New("rep: Config.DropletDir is empty")
	case etcd == nil || b == nil || exec == nil:
		return nil, errors.New("rep: etcd, BBS and executor are required")
	}
	log := cfg.Logger.With("cell", cfg.CellID)
	if cfg.StagingDir == "" {
		cfg.StagingDir = filepath.Join(filepath.Dir(filepath.Clean(cfg.DropletDir)), "staging")
	}
	if cfg.BuildpackDir == "" {
		cfg.BuildpackDir = filepath.Join(filepath.Dir(filepath.Clean(cfg.DropletDir)), "buildpacks")
	}
	r := &Rep{
		buildpacks: newBuildpackCache(filepath.Clean(cfg.BuildpackDir), blobsOf(b), cfg.MaxDropletBytes),
		cfg:        cfg, etcd: etcd, bbs: b, exec: exec, log: log, m: cfg.Metrics,
		drops: newDropletCache(filepath.Clean(cfg.DropletDir), cfg.HTTPClient, blobsOf(b), cfg.MaxDropletBytes, cfg.Metrics),
		ready: make(chan struct{}), lrps: map[string]*lrp{}, tasks: map[string]*task{},
		scheduleNoted: make(chan struct{}, 1), noted: make(map[string]int64),
		transitions: newCoalescer(maxCoalesced, coalescedInflight, coalescedTimeout, sendTransitions(b)),
		desired:     newCoalescer(maxCoalesced, coalescedInflight, coalescedTimeout, fetchDesired(b)),
	}
	cfg.Metrics.cell.attach(r.gauges)
	return r, nil
}

// DropletFetches counts droplets this rep downloaded (once per digest).
func (r *Rep) DropletFetches() int64 { return r.drops.fetches.Load() }

// Ready is closed once Run has registered the cell and reconciled its
// containers: from then on Perform accepts work.
func (r *Rep) Ready() <-chan struct{} { return r.ready }

// Run reconciles the cell's containers with the BBS, registers presence,
// watches the cell's index keys and keeps the lease alive until ctx ends. It
// leaves containers running (and presence to expire) when it returns: a
// restarted process adopts them. Call Evacuate first to move them away.
func (r *Rep) Run(ctx context.Context) error {
	runCtx, cancel := context.WithCancel(ctx)
	defer r.wg.Wait()
	defer cancel()
	r.mu.Lock()
	r.runCtx = runCtx
	r.mu.Unlock()
	// Workspaces of staging tasks a previous process ran: their containers
	// are destroyed and their tasks failed by the reconciliation below.
	if err := os.RemoveAll(r.cfg.StagingDir); err != nil {
		r.log.Warn("remove old staging workspaces", "dir", r.cfg.StagingDir, "err", err)
	}

	// The BBS or etcd may not answer yet (components start together):
	// retry until they do.
	var adopt adoptPlan
	for backoff := 100 * time.Millisecond; ; backoff = min(backoff*2, 5*time.Second) {
		var err error
		if adopt, err = r.reconcileContainers(runCtx); err == nil {
			err = r.register(runCtx)
		}
		if err == nil {
			break
		}
		r.log.Warn("cell start-up: reconcile and register", "err", err)
		select {
		case <-runCtx.Done():
			return nil
		case <-time.After(backoff):
		}
	}
	r.adopt(runCtx, adopt)
	close(r.ready)
	r.log.Info("cell registered", "fence", r.currentFence().GetCreateRevision(), "adopted", len(adopt.owned))

	loops := []func(context.Context) error{r.watchIndex, r.followSchedules, r.keepAlive}
	errc := make(chan error, len(loops))
	for _, loop := range loops {
		go func() { errc <- loop(runCtx) }()
	}
	errs := []error{<-errc}
	cancel()
	for range len(loops) - 1 {
		errs = append(errs, <-errc)
	}
	if ctx.Err() != nil {
		return nil
	}
	return errors.Join(errs...)
}

// goAttach runs fn on a goroutine that Run waits for.
func (r *Rep) goAttach(fn func(ctx context.Context)) bool {
	r.mu.Lock()
	ctx := r.runCtx
	r.mu.Unlock()
	if ctx == nil || ctx.Err() != nil {
		return false
	}
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		fn(ctx)
	}()
	return true
}

func (r *Rep) currentFence() *basinv1.Fence {
	r.mu.Lock()
	defer r.mu.Unlock()
	return proto.Clone(r.fence).(*basinv1.Fence)
}

func (r *Rep) instanceKey(guid string) *basinv1.ActualLRPInstanceKey {
	return &basinv1.ActualLRPInstanceKey{InstanceGuid: guid, CellId: r.cfg.CellID}
}

func (r *Rep) presence() *basinv1.CellPresence {
	r.mu.Lock()
	evac := r.evacuating
	r.mu.Unlock()
	return &basinv1.CellPresence{
		CellId: r.cfg.CellID, RepAddress: r.cfg.RepAddress, Zone: r.cfg.Zone,
		Stacks: slices.Clone(r.cfg.Stacks), Capacity: proto.Clone(r.cfg.Capacity).(*basinv1.CellCapacity),
		PlacementTags: slices.Clone(r.cfg.PlacementTags), Evacuating: evac, AdvertiseAddress: r.cfg.AdvertiseAddress,
	}
}

// register grants a lease and writes presence under it. An existing presence
// key (left by this cell's previous process, whose lease has not run out) is
// taken over rather than deleted and re-created, so the converger does not
// see the cell vanish across a quick restart; the fence is the key's create
// revision either way.
func (r *Rep) register(ctx context.Context) error {
	ttl := max(int64(r.cfg.LeaseTTL/time.Second), 1)
	lease, err := r.etcd.Grant(ctx, ttl)
	if err != nil {
		return fmt.Errorf("grant presence lease for cell %s: %w", r.cfg.CellID, err)
	}
	key := r.cfg.Keys.Cell(r.cfg.CellID)
	val, err := proto.Marshal(r.presence())
	if err != nil {
		return fmt.Errorf("encode presence: %w", err)
	}
	resp, err := r.etcd.Txn(ctx).Then(
		clientv3.OpPut(key, string(val), clientv3.WithLease(lease.ID)),
		clientv3.OpGet(key),
	).Commit()
	if err != nil {
		return fmt.Errorf("write presence %s: %w", key, err)
	}
	kvs := resp.Responses[1].GetResponseRange().Kvs
	if len(kvs) == 0 {
		return fmt.Errorf("write presence %s: key missing right after the write", key)
	}
	r.mu.Lock()
	r.lease = lease.ID
	r.fence = &basinv1.Fence{Key: key, CreateRevision: kvs[0].CreateRevision}
	r.mu.Unlock()
	return nil
}

// updatePresence rewrites the presence value (e.g. evacuating) under the
// current lease; the create revision, so the fence, stays.
func (r *Rep) updatePresence(ctx context.Context) error {
	r.mu.Lock()
	lease := r.lease
	r.mu.Unlock()
	val, err := proto.Marshal(r.presence())
	if err != nil {
		return fmt.Errorf("encode presence: %w", err)
	}
	key := r.cfg.Keys.Cell(r.cfg.CellID)
	// Only while the key is still ours: a write after expiry would create
	// a new key (new create revision) nobody fences with.
	resp, err := r.etcd.Txn(ctx).If(clientv3.Compare(clientv3.LeaseValue(key), "=", int64(lease))).
		Then(clientv3.OpPut(key, string(val), clientv3.WithLease(lease))).Commit()
	if err != nil {
		return fmt.Errorf("update presence %s: %w", key, err)
	}
	if !resp.Succeeded {
		return fmt.Errorf("update presence %s: lease %x no longer holds it", key, lease)
	}
	return nil
}

// keepAlive keeps the lease alive; when it is lost (expired in a partition,
// revoked) it destroys what now belongs to other cells, registers again and
// re-writes the routes of the instances it still runs.
func (r *Rep) keepAlive(ctx context.Context) error {
	for {
		r.mu.Lock()
		lease := r.lease
		r.mu.Unlock()
		kctx, cancel := context.WithCancel(ctx)
		ch, err := r.etcd.KeepAlive(kctx, lease)
		if err == nil {
			for range ch {
			}
		}
		cancel()
		if ctx.Err() != nil {
			return nil
		}
		r.m.leaseLosses.Inc()
		r.log.Warn("presence lease lost; re-registering", "lease", fmt.Sprintf("%x", lease), "err", err)
		backoff := 100 * time.Millisecond
		for {
			err := r.recoverLease(ctx)
			if err == nil {
				break
			}
			r.log.Error("re-register after lost lease", "err", err)
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(backoff):
			}
			backoff = min(backoff*2, 5*time.Second)
		}
	}
}

func (r *Rep) recoverLease(ctx context.Context) error {
	if err := r.dropForeign(ctx); err != nil {
		return err
	}
	if err := r.register(ctx); err != nil {
		return err
	}
	for _, l := range r.snapshotLRPs() {
		if l.isRunning() {
			if err := r.writeRoutes(ctx, l); err != nil {
				return err
			}
		}
	}
	r.log.Info("cell registered again", "fence", r.currentFence().GetCreateRevision())
	return nil
}

func newGUID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
