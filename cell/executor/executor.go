// Package executor runs app instances as containerd containers on runc:
// stack + droplet snapshots, basin-launcher as uid 2000 without
// capabilities, resource limits, a network namespace from CNI with the app's
// port mapped on the host, captured output, health checks and exit reports.
//
// It knows nothing of the BBS: the rep decides what to run and reports what
// the executor tells it through Config.OnEvent.
package executor

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	apievents "github.com/containerd/containerd/api/events"
	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"

	"github.com/basinpaas/basin/archive"
	"github.com/basinpaas/basin/stack"
)

// Container labels: everything a restarted cell needs to adopt or destroy
// an instance without any other record.
const (
	LabelInstanceGUID = "basin.io/instance-guid"
	LabelProcessGUID  = "basin.io/process-guid"
	LabelIndex        = "basin.io/index"
	LabelDroplet      = "basin.io/droplet"
	labelNetNS        = "basin.io/netns"
	labelIP           = "basin.io/ip"
	labelPorts        = "basin.io/ports"
	labelHealth       = "basin.io/health"
	labelMemoryMB     = "basin.io/memory-mb"

	launcherPath = "/tmp/lifecycle/basin-launcher"
	runtimeName  = "io.containerd.runc.v2"
)

// Errors the rep can check with errors.Is.
var (
	ErrNotFound      = errors.New("instance not found")
	ErrExists        = errors.New("instance already exists")
	ErrUnknownStack  = errors.New("stack not available on this cell")
	ErrDropletDigest = errors.New("droplet digest mismatch")
	ErrNotRunning    = errors.New("executor is not running")
)

// Config configures an Executor. Client and LauncherPath are required; the
// rest have defaults. Several executors on one machine (dev up --cells N)
// need distinct StateDir, BridgeName, Subnet, FirewallChain and port ranges.
type Config struct {
	Client *client.Client
	// LauncherPath is the host's static basin-launcher binary, bind-mounted
	// read-only into every container.
	LauncherPath string
	Logger       *slog.Logger
	// OnEvent receives instance lifecycle events. It is called from the
	// instance's goroutine and must not block for long.
	OnEvent func(Event)
	// StateDir keeps network namespaces, IPAM data, CNI and FIFO files.
	// Default /run/basin/executor.
	StateDir string
	// WorkDir is where stacks are built. Default StateDir/work.
	WorkDir string
	// Stacks are ensured (built and imported when missing) by Run.
	// Default ["tiny"].
	Stacks []string
	// CNIBinDir holds the CNI plugins; default /usr/lib/cni (Debian).
	CNIBinDir   string
	NetworkName string // default "basin"
	BridgeName  string // default "basin0"
	Subnet      string // default "10.213.0.0/16"
	// AdvertiseAddress is the host address app ports are mapped on and
	// reported to the router; default 127.0.0.1.
	AdvertiseAddress string
	// HostPortLow..HostPortHigh is the range of mapped host ports; default
	// 61000..61999.
	HostPortLow, HostPortHigh int
	// ProtectedPorts are host TCP ports containers must not reach (etcd,
	// component ports).
	ProtectedPorts []int
	// FirewallChain is the iptables chain holding those rules; default
	// "BASIN-PROTECT".
	FirewallChain string
	// LogLines is the per-instance ring buffer size; default 1000.
	LogLines int
	// StartPollInterval is the health check period while starting; default
	// 25 ms so a ready app is seen at once.
	StartPollInterval time.Duration
	// ExitLines is how many last lines of output an exit report carries;
	// default 20.
	ExitLines int
	// MaxExecs bounds the concurrent Exec sessions (basin ssh) per
	// instance; default 5.
	MaxExecs int
}

func (c *Config) withDefaults() {
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.OnEvent == nil {
		c.OnEvent = func(Event) {}
	}
	if c.StateDir == "" {
		c.StateDir = "/run/basin/executor"
	}
	if c.WorkDir == "" {
		c.WorkDir = filepath.Join(c.StateDir, "work")
	}
	if len(c.Stacks) == 0 {
		c.Stacks = []string{"tiny"}
	}
	if c.CNIBinDir == "" {
		c.CNIBinDir = "/usr/lib/cni"
	}
	if c.NetworkName == "" {
		c.NetworkName = "basin"
	}
	if c.BridgeName == "" {
		c.BridgeName = "basin0"
	}
	if c.Subnet == "" {
		c.Subnet = "10.213.0.0/16"
	}
	if c.AdvertiseAddress == "" {
		c.AdvertiseAddress = "127.0.0.1"
	}
	if c.HostPortLow == 0 {
		c.HostPortLow, c.HostPortHigh = 61000, 61999
	}
	if c.FirewallChain == "" {
		c.FirewallChain = "BASIN-PROTECT"
	}
	if c.LogLines == 0 {
		c.LogLines = 1000
	}
	if c.StartPollInterval == 0 {
		c.StartPollInterval = 25 * time.Millisecond
	}
	if c.ExitLines == 0 {
		c.ExitLines = 20
	}
	if c.MaxExecs == 0 {
		c.MaxExecs = 5
	}
}

// EventType says what happened to an instance.
type EventType string

const (
	// EventHealthy: the first health check passed; the instance is running.
	EventHealthy EventType = "healthy"
	// EventExited: the instance is gone (crashed, killed by a failed check,
	// out of memory, or stopped on request) and its resources are freed.
	EventExited EventType = "exited"
)

// Event reports an instance's transition.
type Event struct {
	Type         EventType
	InstanceGUID string
	ProcessGUID  string
	Index        int
	Info         Info      // for EventHealthy
	Exit         *ExitInfo // for EventExited
}

// ExitInfo is why and how an instance ended.
type ExitInfo struct {
	Status    uint32
	Reason    string // human-readable, e.g. "out of memory (memory limit 64 MB)"
	OOM       bool
	Stopped   bool // requested through Stop: not a crash
	LastLines []LogLine
	Time      time.Time
}

// State of an instance.
type State string

const (
	StateStarting State = "starting"
	StateRunning  State = "running"
	StateExited   State = "exited"
)

// Info describes a running (or adoptable) instance.
type Info struct {
	InstanceGUID string
	ProcessGUID  string
	Index        int
	State        State
	// HostIP is the advertised address Ports are mapped on.
	HostIP      string
	ContainerIP string
	Ports       []PortMapping
	PID         uint32
	Labels      map[string]string
}

// Executor runs instances. Create it with New, then call Run; Start and the
// other methods work while Run runs.
type Executor struct {
	cfg   Config
	c     *client.Client
	log   *slog.Logger
	net   *network
	ready chan struct{}
	ctx   context.Context // Run's context, set before ready is closed
	wg    sync.WaitGroup  // instance monitors, owned by Run

	mu        sync.Mutex
	instances map[string]*instance
	gone      map[string]*LogBuffer // logs of exited instances, bounded
	goneOrder []string
	oom       map[string]bool // containers the kernel OOM-killed in
	stacks    map[string]string

	layerMu    sync.Mutex
	layerLocks map[string]*sync.RWMutex
	unpacks    atomic.Int64
}

// New validates cfg and returns an Executor that does nothing until Run.
func New(cfg Config) (*Executor, error) {
	cfg.withDefaults()
	if cfg.Client == nil {
		return nil, errors.New("executor: Config.Client is nil")
	}
	if _, err := os.Stat(cfg.LauncherPath); err != nil {
		return nil, fmt.Errorf("executor: launcher: %w", err)
	}
	return &Executor{
		cfg: cfg, c: cfg.Client, log: cfg.Logger, ready: make(chan struct{}),
		instances: map[string]*instance{}, gone: map[string]*LogBuffer{}, oom: map[string]bool{},
		stacks: map[string]string{}, layerLocks: map[string]*sync.RWMutex{},
	}, nil
}

// Run prepares the cell (state dirs, stacks, CNI, firewall), serves until
// ctx ends, then stops monitoring and removes the firewall. Containers keep
// running so a restarted cell can adopt them.
func (e *Executor) Run(ctx context.Context) error {
	ctx = namespaces.WithNamespace(ctx, stack.Namespace)
	for _, d := range []string{"netns", "ipam", "cni", "fifo", "work"} {
		if err := os.MkdirAll(filepath.Join(e.cfg.StateDir, d), 0o700); err != nil {
			return fmt.Errorf("executor: state dir: %w", err)
		}
	}
	if err := os.MkdirAll(e.cfg.WorkDir, 0o700); err != nil {
		return fmt.Errorf("executor: work dir: %w", err)
	}
	for _, s := range e.cfg.Stacks {
		name, err := stack.Ensure(ctx, e.c, s, e.cfg.WorkDir)
		if err != nil {
			return fmt.Errorf("executor: %w", err)
		}
		e.stacks[s] = name
	}
	n, err := newNetwork(e.cfg)
	if err != nil {
		return fmt.Errorf("executor: %w", err)
	}
	e.net = n
	if err := n.installFirewall(ctx); err != nil {
		_ = n.removeFirewall(context.WithoutCancel(ctx)) // whatever part got in
		return fmt.Errorf("executor: firewall: %w", err)
	}
	defer func() {
		if err := n.removeFirewall(context.WithoutCancel(ctx)); err != nil {
			e.log.Error("remove firewall", "err", err)
		}
	}()

	evCtx, stopEvents := context.WithCancel(ctx)
	defer stopEvents()
	envelopes, errs := e.c.Subscribe(evCtx, `topic=="/tasks/oom"`)

	// Monitors run on runCtx: whatever ends Run ends them first (they
	// leave their containers running), then Run waits for them.
	runCtx, cancel := context.WithCancel(ctx)
	e.ctx = runCtx
	close(e.ready)
	defer e.wg.Wait()
	defer cancel()

	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-errs:
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("executor: containerd events: %w", err)
		case env := <-envelopes:
			if env == nil || env.Namespace != stack.Namespace || env.Event == nil {
				continue
			}
			v, err := typeurl.UnmarshalAny(env.Event)
			if err != nil {
				continue
			}
			if oom, ok := v.(*apievents.TaskOOM); ok {
				e.mu.Lock()
				e.oom[oom.ContainerID] = true
				e.mu.Unlock()
			}
		}
	}
}

// waitReady returns Run's context once Run has prepared the cell.
func (e *Executor) waitReady(ctx context.Context) (context.Context, error) {
	select {
	case <-e.ready:
		if e.ctx.Err() != nil {
			return nil, ErrNotRunning
		}
		return e.ctx, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("wait for executor: %w", ctx.Err())
	}
}

// DropletUnpacks counts droplets this executor unpacked into layers.
func (e *Executor) DropletUnpacks() int64 { return e.unpacks.Load() }

func (e *Executor) layerLock(name string) *sync.RWMutex {
	e.layerMu.Lock()
	defer e.layerMu.Unlock()
	l := e.layerLocks[name]
	if l == nil {
		l = &sync.RWMutex{}
		e.layerLocks[name] = l
	}
	return l
}

// dropletLayer returns the committed snapshot of droplet on the stack
// snapshot, unpacking it only the first time (per cell, per digest). It
// returns with the layer read-locked: release once an instance snapshot on
// it exists, so PruneDroplets cannot remove it in between.
func (e *Executor) dropletLayer(ctx context.Context, stackSnap string, d Droplet) (string, func(), error) {
	sum := sha256.Sum256([]byte(stackSnap))
	name := "basin/droplet/" + d.Digest + "/" + hex.EncodeToString(sum[:8])
	sn := e.c.SnapshotService(stack.Snapshotter)
	l := e.layerLock(name)
	l.RLock()
	if _, err := sn.Stat(ctx, name); err == nil {
		return name, l.RUnlock, nil
	}
	l.RUnlock()

	l.Lock()
	labels := map[string]string{LabelDroplet: d.Digest}
	err := stack.CommitLayer(ctx, e.c, name, stackSnap, labels, func(dir string) error {
		f, err := os.Open(d.Path)
		if err != nil {
			return fmt.Errorf("open droplet: %w", err)
		}
		defer f.Close()
		h := sha256.New()
		size, err := io.Copy(h, f)
		if err != nil {
			return fmt.Errorf("hash droplet %s: %w", d.Path, err)
		}
		if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != d.Digest {
			return fmt.Errorf("droplet %s is %s, want %s: %w", d.Path, got, d.Digest, ErrDropletDigest)
		}
		e.unpacks.Add(1)
		home := filepath.Join(dir, "home", "vcap")
		return archive.Extract(ctx, f, size, home, archive.WithOwner(stack.VcapUID, stack.VcapGID))
	})
	l.Unlock()
	if err != nil {
		return "", nil, fmt.Errorf("droplet layer %s: %w", d.Digest, err)
	}
	l.RLock()
	if _, err := sn.Stat(ctx, name); err != nil {
		l.RUnlock()
		return "", nil, fmt.Errorf("droplet layer %s: pruned while starting: %w", d.Digest, err)
	}
	return name, l.RUnlock, nil
}

// PruneDroplets removes the droplet layers no instance runs on, except
// those whose digest keep reports (nil keep removes every unused layer). It
// returns the digests it removed. Layers are GC roots, so nothing else
// frees their disk space.
func (e *Executor) PruneDroplets(ctx context.Context, keep func(digest string) bool) ([]string, error) {
	ctx = namespaces.WithNamespace(ctx, stack.Namespace)
	sn := e.c.SnapshotService(stack.Snapshotter)
	layers := map[string]string{} // name -> digest
	err := sn.Walk(ctx, func(_ context.Context, info snapshots.Info) error {
		if info.Kind == snapshots.KindCommitted && strings.HasPrefix(info.Name, "basin/droplet/") {
			layers[info.Name] = info.Labels[LabelDroplet]
		}
		return nil
	}, `labels."`+LabelDroplet+`"`)
	if err != nil {
		return nil, fmt.Errorf("prune droplets: list layers: %w", err)
	}
	var removed []string
	for name, digest := range layers {
		if keep != nil && keep(digest) {
			continue
		}
		l := e.layerLock(name)
		l.Lock()
		err := sn.Remove(ctx, name)
		l.Unlock()
		switch {
		case err == nil:
			removed = append(removed, digest)
		case errdefs.IsFailedPrecondition(err), errdefs.IsNotFound(err):
			// instances run on it, or someone else removed it
		default:
			return removed, fmt.Errorf("prune droplet layer %s: %w", name, err)
		}
	}
	return removed, nil
}

// Start creates and starts an instance. It returns once the app's process
// runs; EventHealthy follows when its health check passes, EventExited when
// it ends. A failure leaves nothing behind.
func (e *Executor) Start(ctx context.Context, spec Spec) (Info, error) {
	runCtx, err := e.waitReady(ctx)
	if err != nil {
		return Info{}, err
	}
	ctx = namespaces.WithNamespace(ctx, stack.Namespace)
	spec.withDefaults()
	if err := spec.validate(); err != nil {
		return Info{}, err
	}
	id := spec.InstanceGUID
	e.mu.Lock()
	if _, ok := e.instances[id]; ok {
		e.mu.Unlock()
		return Info{}, fmt.Errorf("start %s: %w", id, ErrExists)
	}
	inst := newInstance(e, id, NewLogBuffer(e.cfg.LogLines, nil))
	inst.stdout.source, inst.stderr.source = spec.LogSource, spec.LogSource
	e.instances[id] = inst
	delete(e.gone, id)
	e.mu.Unlock()

	info, err := e.create(ctx, runCtx, inst, spec)
	if err != nil {
		e.mu.Lock()
		delete(e.instances, id)
		e.mu.Unlock()
		inst.logs.Append(SourceCell, "", "Failed to create container: "+err.Error())
		inst.logs.Close()
		return Info{}, err
	}
	return info, nil
}

func (e *Executor) create(ctx, runCtx context.Context, inst *instance, spec Spec) (_ Info, err error) {
	id := spec.InstanceGUID
	log := e.log.With("instance", id, "process", spec.ProcessGUID, "index", spec.Index)
	// A container left by an earlier cell process shares the id (and the
	// IPAM lease, keyed by id): touching anything of it here would break
	// it, so refuse before allocating.
	if _, err := e.c.LoadContainer(ctx, id); err == nil {
		return Info{}, fmt.Errorf("start %s: container exists in containerd (adopt or destroy it): %w", id, ErrExists)
	} else if !errdefs.IsNotFound(err) {
		return Info{}, fmt.Errorf("start %s: look up container: %w", id, err)
	}
	inst.logs.Append(SourceCell, "", "Creating container")
	t0 := time.Now()
	var tLayer, tNet, tContainer time.Duration
	stackSnap, ok := e.stacks[spec.Stack]
	if !ok {
		return Info{}, fmt.Errorf("start %s on stack %q: %w", id, spec.Stack, ErrUnknownStack)
	}
	layer, releaseLayer, err := e.dropletLayer(ctx, stackSnap, spec.Droplet)
	if err != nil {
		return Info{}, fmt.Errorf("start %s: %w", id, err)
	}
	layerHeld := true
	defer func() {
		if layerHeld {
			releaseLayer()
		}
	}()

	var cleanups []func(context.Context) error
	defer func() {
		if err == nil {
			return
		}
		cctx := context.WithoutCancel(ctx)
		for i := len(cleanups) - 1; i >= 0; i-- {
			if cerr := cleanups[i](cctx); cerr != nil {
				log.Error("clean up failed start", "err", cerr)
			}
		}
	}()

	tLayer = time.Since(t0)
	hostPorts, err := e.net.allocate(len(spec.Ports))
	if err != nil {
		return Info{}, fmt.Errorf("start %s: %w", id, err)
	}
	ports := make([]PortMapping, len(spec.Ports))
	for i, p := range spec.Ports {
		ports[i] = PortMapping{ContainerPort: p, HostPort: hostPorts[i]}
	}
	cleanups = append(cleanups, func(context.Context) error { e.net.release(ports); return nil })

	ns, err := newNetNS(filepath.Join(e.cfg.StateDir, "netns"))
	if err != nil {
		return Info{}, fmt.Errorf("start %s: %w", id, err)
	}
	cleanups = append(cleanups, func(context.Context) error { return ns.Remove() })

	// CNI (bridge, IPAM, portmap's iptables rules) takes about as long as
	// creating the container and its task: run both side by side and join
	// before the process starts, so the app never runs without its network.
	type netResult struct {
		ip  string
		err error
	}
	netc := make(chan netResult, 1)
	go func() {
		ip, err := e.net.setup(ctx, id, ns.GetPath(), ports)
		netc <- netResult{ip, err}
	}()
	var netr *netResult
	joinNet := func() netResult {
		if netr == nil {
			r := <-netc
			netr = &r
			tNet = time.Since(t0) - tLayer
		}
		return *netr
	}
	cleanups = append(cleanups, func(c context.Context) error {
		joinNet() // never tear down while the setup still runs
		return e.net.teardown(c, id, ns.GetPath(), ports)
	})

	// The lease keeps the new snapshot (and so its parents) from the GC
	// until the container references it.
	lctx, done, err := e.c.WithLease(ctx)
	if err != nil {
		return Info{}, fmt.Errorf("start %s: lease: %w", id, err)
	}
	defer done(context.WithoutCancel(ctx))
	sn := e.c.SnapshotService(stack.Snapshotter)
	_, err = sn.Prepare(lctx, id, layer, snapshots.WithLabels(map[string]string{LabelInstanceGUID: id}))
	layerHeld = false
	releaseLayer()
	if err != nil {
		return Info{}, fmt.Errorf("start %s: prepare snapshot on %s: %w", id, layer, err)
	}
	cleanups = append(cleanups, func(c context.Context) error { return ignoreNotFound(sn.Remove(c, id)) })

	portsJSON, _ := json.Marshal(ports)
	healthJSON, _ := json.Marshal(spec.HealthCheck)
	labels := map[string]string{
		LabelInstanceGUID: id,
		LabelProcessGUID:  spec.ProcessGUID,
		LabelIndex:        strconv.Itoa(spec.Index),
		LabelDroplet:      spec.Droplet.Digest,
		labelNetNS:        ns.GetPath(),
		labelPorts:        string(portsJSON),
		labelHealth:       string(healthJSON),
		labelMemoryMB:     strconv.FormatInt(spec.MemoryMB, 10),
	}
	for k, v := range spec.Labels {
		labels[k] = v
	}
	container, err := e.c.NewContainer(lctx, id,
		client.WithSnapshotter(stack.Snapshotter),
		client.WithSnapshot(id),
		client.WithRuntime(runtimeName, nil),
		client.WithContainerLabels(labels),
		client.WithNewSpec(e.specOpts(spec, ns.GetPath(), ports)...),
	)
	if err != nil {
		return Info{}, fmt.Errorf("start %s: create container: %w", id, err)
	}
	cleanups = append(cleanups, func(c context.Context) error {
		return ignoreNotFound(container.Delete(c))
	})
	tContainer = time.Since(t0) - tLayer
	task, err := container.NewTask(ctx, inst.ioCreator(filepath.Join(e.cfg.StateDir, "fifo")))
	if err != nil {
		return Info{}, fmt.Errorf("start %s: create task: %w", id, err)
	}
	cleanups = append(cleanups, func(c context.Context) error {
		_, err := task.Delete(c, client.WithProcessKill)
		return ignoreNotFound(err)
	})

	nr := joinNet()
	if nr.err != nil {
		return Info{}, fmt.Errorf("start %s: %w", id, nr.err)
	}
	// The health checks of an adopted instance need its address.
	labels[labelIP] = nr.ip
	if _, err := container.SetLabels(ctx, map[string]string{labelIP: nr.ip}); err != nil {
		return Info{}, fmt.Errorf("start %s: label container: %w", id, err)
	}
	inst.setMeta(spec.ProcessGUID, spec.Index, spec.HealthCheck, spec.MemoryMB, Info{
		InstanceGUID: id, ProcessGUID: spec.ProcessGUID, Index: spec.Index, State: StateStarting,
		HostIP: e.cfg.AdvertiseAddress, ContainerIP: nr.ip, Ports: ports, Labels: labels,
	}, ns.GetPath())
	// Wait before Start so a process that exits at once is not missed.
	exitC, err := task.Wait(runCtx)
	if err != nil {
		return Info{}, fmt.Errorf("start %s: wait task: %w", id, err)
	}
	if err := task.Start(ctx); err != nil {
		return Info{}, fmt.Errorf("start %s: start task: %w", id, err)
	}
	info := inst.started(task)
	log.Debug("instance started", "total", time.Since(t0), "layer", tLayer, "network", tNet,
		"container", tContainer)
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		inst.monitor(runCtx, container, task, exitC, false)
	}()
	return info, nil
}

// Stop ends an instance: SIGTERM, then SIGKILL after grace, then its
// resources are freed and EventExited (Stopped) is sent. It returns once the
// instance is gone or ctx ends.
func (e *Executor) Stop(ctx context.Context, guid string, grace time.Duration) error {
	e.mu.Lock()
	inst := e.instances[guid]
	e.mu.Unlock()
	if inst == nil {
		return fmt.Errorf("stop %s: %w", guid, ErrNotFound)
	}
	return inst.stop(namespaces.WithNamespace(ctx, stack.Namespace), grace)
}

// Logs returns an instance's log buffer (also for a recently exited one).
func (e *Executor) Logs(guid string) (*LogBuffer, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if inst := e.instances[guid]; inst != nil {
		return inst.logs, nil
	}
	if b := e.gone[guid]; b != nil {
		return b, nil
	}
	return nil, fmt.Errorf("logs of %s: %w", guid, ErrNotFound)
}

// Info returns what the executor knows of an instance it manages.
func (e *Executor) Info(guid string) (Info, error) {
	e.mu.Lock()
	inst := e.instances[guid]
	e.mu.Unlock()
	if inst == nil {
		return Info{}, fmt.Errorf("info of %s: %w", guid, ErrNotFound)
	}
	return inst.snapshot(), nil
}

// WaitHealthy blocks until the instance passed its first health check, and
// fails if it exits first.
func (e *Executor) WaitHealthy(ctx context.Context, guid string) (Info, error) {
	e.mu.Lock()
	inst := e.instances[guid]
	e.mu.Unlock()
	if inst == nil {
		return Info{}, fmt.Errorf("wait for %s: %w", guid, ErrNotFound)
	}
	select {
	case <-inst.healthy:
		return inst.snapshot(), nil
	case <-inst.done:
		x := inst.exitInfo()
		return Info{}, fmt.Errorf("wait for %s: exited before healthy: %s", guid, x.Reason)
	case <-ctx.Done():
		return Info{}, fmt.Errorf("wait for %s to be healthy: %w", guid, ctx.Err())
	}
}

// List returns every basin instance container in containerd, managed by
// this executor or not (after a restart, none are until adopted).
func (e *Executor) List(ctx context.Context) ([]Info, error) {
	ctx = namespaces.WithNamespace(ctx, stack.Namespace)
	cs, err := e.c.Containers(ctx, `labels."`+LabelInstanceGUID+`"`)
	if err != nil {
		return nil, fmt.Errorf("list containers: %w", err)
	}
	out := make([]Info, 0, len(cs))
	for _, c := range cs {
		labels, err := c.Labels(ctx)
		if err != nil {
			if errdefs.IsNotFound(err) {
				continue
			}
			return nil, fmt.Errorf("labels of %s: %w", c.ID(), err)
		}
		info := infoFromLabels(labels, e.cfg.AdvertiseAddress)
		info.State = StateExited
		e.mu.Lock()
		inst := e.instances[c.ID()]
		e.mu.Unlock()
		if inst != nil {
			info = inst.snapshot()
		} else if t, err := c.Task(ctx, nil); err == nil {
			info.PID = t.Pid()
			if st, err := t.Status(ctx); err == nil && st.Status == client.Running {
				info.State = StateRunning
			}
		}
		out = append(out, info)
	}
	return out, nil
}

func infoFromLabels(labels map[string]string, hostIP string) Info {
	idx, _ := strconv.Atoi(labels[LabelIndex])
	var ports []PortMapping
	_ = json.Unmarshal([]byte(labels[labelPorts]), &ports)
	return Info{
		InstanceGUID: labels[LabelInstanceGUID], ProcessGUID: labels[LabelProcessGUID], Index: idx,
		HostIP: hostIP, ContainerIP: labels[labelIP], Ports: ports, Labels: labels,
	}
}

// Adopt takes over a running instance container left by a previous cell
// process: its output is captured again, its ports reserved, its health
// watched. It is Starting until its health check passes again.
func (e *Executor) Adopt(ctx context.Context, guid string) (Info, error) {
	runCtx, err := e.waitReady(ctx)
	if err != nil {
		return Info{}, err
	}
	ctx = namespaces.WithNamespace(ctx, stack.Namespace)
	container, err := e.c.LoadContainer(ctx, guid)
	if err != nil {
		return Info{}, fmt.Errorf("adopt %s: %w", guid, errors.Join(ErrNotFound, err))
	}
	labels, err := container.Labels(ctx)
	if err != nil {
		return Info{}, fmt.Errorf("adopt %s: labels: %w", guid, err)
	}
	info := infoFromLabels(labels, e.cfg.AdvertiseAddress)
	var hc HealthCheck
	if err := json.Unmarshal([]byte(labels[labelHealth]), &hc); err != nil {
		return Info{}, fmt.Errorf("adopt %s: health check label: %w", guid, err)
	}
	mem, _ := strconv.ParseInt(labels[labelMemoryMB], 10, 64)

	e.mu.Lock()
	if _, ok := e.instances[guid]; ok {
		e.mu.Unlock()
		return Info{}, fmt.Errorf("adopt %s: %w", guid, ErrExists)
	}
	inst := newInstance(e, guid, NewLogBuffer(e.cfg.LogLines, nil))
	e.instances[guid] = inst
	e.mu.Unlock()
	fail := func(err error) (Info, error) {
		e.mu.Lock()
		delete(e.instances, guid)
		e.mu.Unlock()
		return Info{}, err
	}
	info.State = StateStarting
	inst.setMeta(info.ProcessGUID, info.Index, hc, mem, info, labels[labelNetNS])
	task, err := container.Task(ctx, inst.ioAttach())
	if err != nil {
		return fail(fmt.Errorf("adopt %s: task: %w", guid, err))
	}
	exitC, err := task.Wait(runCtx)
	if err != nil {
		return fail(fmt.Errorf("adopt %s: wait task: %w", guid, err))
	}
	e.net.reserve(info.Ports)
	inst.logs.Append(SourceCell, "", "Adopted by a restarted cell")
	info = inst.started(task)
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		inst.monitor(runCtx, container, task, exitC, true)
	}()
	return info, nil
}

// Destroy removes an instance container this executor does not manage
// (one a restarted cell no longer owns): kill, delete, free its network.
func (e *Executor) Destroy(ctx context.Context, guid string) error {
	e.mu.Lock()
	inst := e.instances[guid]
	e.mu.Unlock()
	if inst != nil {
		return e.Stop(ctx, guid, 0)
	}
	if _, err := e.waitReady(ctx); err != nil {
		return err
	}
	ctx = namespaces.WithNamespace(ctx, stack.Namespace)
	container, err := e.c.LoadContainer(ctx, guid)
	if err != nil {
		return fmt.Errorf("destroy %s: %w", guid, errors.Join(ErrNotFound, err))
	}
	labels, err := container.Labels(ctx)
	if err != nil {
		return fmt.Errorf("destroy %s: labels: %w", guid, err)
	}
	info := infoFromLabels(labels, e.cfg.AdvertiseAddress)
	return e.teardown(ctx, container, info.Ports, labels[labelNetNS])
}

// teardown deletes a container's task, the container, its snapshot and its
// network, trying every step and joining the errors.
func (e *Executor) teardown(ctx context.Context, container client.Container, ports []PortMapping, netnsPath string) error {
	var errs []error
	id := container.ID()
	if t, err := container.Task(ctx, nil); err == nil {
		if _, err := t.Delete(ctx, client.WithProcessKill); err != nil && !errdefs.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("delete task %s: %w", id, err))
		}
	} else if !errdefs.IsNotFound(err) {
		errs = append(errs, fmt.Errorf("load task %s: %w", id, err))
	}
	if err := container.Delete(ctx, client.WithSnapshotCleanup); err != nil && !errdefs.IsNotFound(err) {
		errs = append(errs, fmt.Errorf("delete container %s: %w", id, err))
	}
	if netnsPath != "" {
		if err := e.net.teardown(ctx, id, netnsPath, ports); err != nil {
			errs = append(errs, err)
		}
		if err := loadNetNS(netnsPath).Remove(); err != nil {
			errs = append(errs, fmt.Errorf("remove netns of %s: %w", id, err))
		}
	}
	e.net.release(ports)
	e.mu.Lock()
	delete(e.oom, id)
	e.mu.Unlock()
	return errors.Join(errs...)
}

// forget moves an exited instance's logs to the bounded "gone" list.
func (e *Executor) forget(inst *instance) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.instances[inst.id] == inst {
		delete(e.instances, inst.id)
	}
	e.gone[inst.id] = inst.logs
	e.goneOrder = append(e.goneOrder, inst.id)
	for len(e.goneOrder) > 256 {
		delete(e.gone, e.goneOrder[0])
		e.goneOrder = e.goneOrder[1:]
	}
}

func (e *Executor) oomKilled(id string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.oom[id]
}

func ignoreNotFound(err error) error {
	if errdefs.IsNotFound(err) {
		return nil
	}
	return err
}

// killSignal is what Stop sends first.
const killSignal = syscall.SIGTERM
