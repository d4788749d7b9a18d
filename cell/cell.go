// Package cell wires one cell: a containerd (given or started here), the
// executor that runs containers on it, the rep that speaks for the cell, its
// gRPC API and its debug port. cmd/cell runs one; basin dev up can run
// several in one process against one containerd, each with its own Config.
package cell

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/basinpaas/basin/bbs"
	"github.com/basinpaas/basin/cell/containerdproc"
	"github.com/basinpaas/basin/cell/executor"
	"github.com/basinpaas/basin/cell/rep"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

// Config configures one cell. Cells sharing a machine (basin dev up --cells
// N) must differ in ID, ListenAddress, DebugAddress, StateDir and the
// executor's network: BridgeName, Subnet, FirewallChain and the host port
// range. They may share Containerd, Etcd and BBSClient.
type Config struct {
	ID            string
	Zone          string
	Stacks        []string // default ["tiny"]
	PlacementTags []string
	Capacity      *basinv1.CellCapacity

	// ListenAddress of the rep's gRPC API (ignored when Listener is set);
	// RepAddress is what presence advertises, default the bound address.
	ListenAddress string
	Listener      net.Listener
	RepAddress    string
	// DebugAddress serves /metrics and pprof; empty disables it.
	// DebugListener, when set, is used instead (already bound).
	DebugAddress  string
	DebugListener net.Listener
	// CertFile and KeyFile serve the rep's API over TLS; ClientCAFile then
	// requires client certificates it signed (the auctioneer's, an
	// operator's). Plaintext when CertFile is empty: loopback development.
	CertFile, KeyFile, ClientCAFile string
	// AdvertiseAddress is where instance ports are mapped; default 127.0.0.1.
	AdvertiseAddress string

	// BBSClient is used when set; otherwise BBS is dialled.
	BBSClient rep.BBS
	BBS       bbs.ClientConfig
	// Etcd is used when set; otherwise EtcdEndpoints are dialled.
	Etcd          *clientv3.Client
	EtcdEndpoints []string
	Prefix        string

	// Containerd is used when set; otherwise ContainerdAddress is dialled;
	// when both are empty the cell starts its own containerd under
	// StateDir/containerd and stops it on exit (containers survive it).
	Containerd        *client.Client
	ContainerdAddress string
	LauncherPath      string
	// BuilderPath is the static basin-builder staging containers run;
	// without it the cell fails the staging tasks it is given.
	BuilderPath string
	// StagingEnv and CABundle give staging containers the host's way to
	// package registries; HostStagingEnv fills them from this machine.
	StagingEnv []string
	CABundle   string
	// StateDir keeps the executor's state, the droplet cache and an own
	// containerd. Keep it short when the cell starts containerd: the
	// socket path must fit in 100 bytes.
	StateDir string

	// Executor network: see executor.Config.
	NetworkName, BridgeName, Subnet, FirewallChain string
	HostPortLow, HostPortHigh                      int
	ProtectedPorts                                 []int
	CNIBinDir                                      string

	LeaseTTL  time.Duration
	StopGrace time.Duration
	// RouteDrain: see rep.Config.RouteDrain.
	RouteDrain        time.Duration
	EvacuationTimeout time.Duration
	Logger            *slog.Logger
}

// Cell is one cell, ready to Run.
type Cell struct {
	cfg      Config
	creds    []grpc.ServerOption
	lis      net.Listener
	registry *prometheus.Registry
	log      *slog.Logger

	rep     *rep.Rep
	repDone chan struct{} // closed once the rep exists (or Run failed)
}

// New binds the gRPC listener, so Addr is known before Run.
func New(cfg Config) (*Cell, error) {
	if cfg.ID == "" || cfg.Capacity == nil || cfg.StateDir == "" || cfg.LauncherPath == "" {
		return nil, errors.New("cell: ID, Capacity, StateDir and LauncherPath are required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.AdvertiseAddress == "" {
		cfg.AdvertiseAddress = "127.0.0.1"
	}
	var creds []grpc.ServerOption
	if cfg.CertFile != "" {
		tc, err := ServerTLS(cfg.CertFile, cfg.KeyFile, cfg.ClientCAFile)
		if err != nil {
			return nil, fmt.Errorf("cell %s: %w", cfg.ID, err)
		}
		creds = append(creds, grpc.Creds(credentials.NewTLS(tc)))
	}
	lis := cfg.Listener
	if lis == nil {
		var err error
		if lis, err = net.Listen("tcp", cfg.ListenAddress); err != nil {
			return nil, fmt.Errorf("cell %s: listen on %s: %w", cfg.ID, cfg.ListenAddress, err)
		}
	}
	if cfg.RepAddress == "" {
		cfg.RepAddress = lis.Addr().String()
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return &Cell{cfg: cfg, creds: creds, lis: lis, registry: reg, log: cfg.Logger.With("cell", cfg.ID), repDone: make(chan struct{})}, nil
}

// Addr is the rep's gRPC address.
func (c *Cell) Addr() string { return c.lis.Addr().String() }

// Rep returns the rep once Run created it, or nil when ctx ends first.
func (c *Cell) Rep(ctx context.Context) *rep.Rep {
	select {
	case <-c.repDone:
		return c.rep
	case <-ctx.Done():
		return nil
	}
}

// Registry holds the cell's metrics.
func (c *Cell) Registry() *prometheus.Registry { return c.registry }

// Run starts everything and serves until ctx ends. Containers keep running
// when it returns; call Evacuate first to move them away.
func (c *Cell) Run(ctx context.Context) (err error) {
	repMade := false
	defer func() {
		if !repMade {
			close(c.repDone)
		}
	}()
	cfg := c.cfg
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("cell %s: state dir: %w", cfg.ID, err)
	}

	cd := cfg.Containerd
	if cd == nil {
		addr := cfg.ContainerdAddress
		if addr == "" {
			// Stopped after everything else: the deferred cancel runs last.
			dctx, stop := context.WithCancel(context.WithoutCancel(ctx))
			d, err := containerdproc.Start(dctx, containerdproc.Config{Dir: filepath.Join(cfg.StateDir, "containerd"), Logger: c.log})
			if err != nil {
				stop()
				return fmt.Errorf("cell %s: %w", cfg.ID, err)
			}
			defer func() { stop(); <-d.Stopped() }()
			addr = d.Address()
		}
		cd, err = client.New(addr)
		if err != nil {
			return fmt.Errorf("cell %s: containerd at %s: %w", cfg.ID, addr, err)
		}
		defer cd.Close()
	}

	etcd := cfg.Etcd
	if etcd == nil {
		etcd, err = clientv3.New(clientv3.Config{Endpoints: cfg.EtcdEndpoints, DialTimeout: 5 * time.Second,
			DialKeepAliveTime: 10 * time.Second, DialKeepAliveTimeout: 3 * time.Second})
		if err != nil {
			return fmt.Errorf("cell %s: etcd %v: %w", cfg.ID, cfg.EtcdEndpoints, err)
		}
		defer etcd.Close()
	}

	bbsClient := cfg.BBSClient
	if bbsClient == nil {
		cl, err := bbs.Dial(cfg.BBS)
		if err != nil {
			return fmt.Errorf("cell %s: %w", cfg.ID, err)
		}
		defer cl.Close()
		bbsClient = cl
	}

	var r *rep.Rep
	ex, err := executor.New(executorConfig(cfg, cd, c.log, func(ev executor.Event) { r.OnEvent(ev) })) // r is set before Run starts the executor
	if err != nil {
		return fmt.Errorf("cell %s: %w", cfg.ID, err)
	}
	r, err = rep.New(rep.Config{
		CellID: cfg.ID, Zone: cfg.Zone, Stacks: cfg.Stacks, PlacementTags: cfg.PlacementTags, Capacity: cfg.Capacity,
		RepAddress: cfg.RepAddress, AdvertiseAddress: cfg.AdvertiseAddress, Keys: bbs.NewKeys(cfg.Prefix),
		LeaseTTL: cfg.LeaseTTL, StopGrace: cfg.StopGrace, RouteDrain: cfg.RouteDrain, EvacuationTimeout: cfg.EvacuationTimeout,
		DropletDir: filepath.Join(cfg.StateDir, "droplets"), BuilderPath: cfg.BuilderPath,
		StagingDir: filepath.Join(cfg.StateDir, "staging"), BuildpackDir: filepath.Join(cfg.StateDir, "buildpacks"),
		StagingEnv: cfg.StagingEnv, CABundle: cfg.CABundle,
		Logger: cfg.Logger, Metrics: rep.NewMetrics(c.registry),
	}, etcd, bbsClient, ex)
	if err != nil {
		return fmt.Errorf("cell %s: %w", cfg.ID, err)
	}
	c.rep = r
	repMade = true
	close(c.repDone)

	// Shutdown in reverse: gRPC and the rep stop first, the executor last.
	execCtx, stopExec := context.WithCancel(context.WithoutCancel(ctx))
	defer stopExec()
	execErr := make(chan error, 1)
	go func() { execErr <- ex.Run(execCtx) }()
	defer func() {
		stopExec()
		if e := <-execErr; e != nil && err == nil {
			err = fmt.Errorf("cell %s: %w", cfg.ID, e)
		}
	}()

	gs, hs := rep.NewGRPCServer(r, c.creds...)
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		select {
		case e := <-execErr:
			execErr <- e // for the deferred wait
			if gctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("executor stopped: %v", e)
		case <-gctx.Done():
			return nil
		}
	})
	g.Go(func() error { return r.Run(gctx) })
	g.Go(func() error { return rep.Serve(gctx, r, gs, hs, c.lis) })
	if dbg := cfg.DebugListener; dbg != nil || cfg.DebugAddress != "" {
		if dbg == nil {
			var err error
			if dbg, err = bbs.ListenDebug(cfg.DebugAddress); err != nil {
				return err
			}
		}
		g.Go(func() error { return bbs.ServeDebug(gctx, dbg, c.registry) })
	}
	c.log.Info("cell serving", "addr", c.Addr(), "debug", cfg.DebugAddress)
	return g.Wait()
}

// Evacuate moves the cell's instances elsewhere and stops them here (see
// rep.Rep.Evacuate); Run keeps running until its ctx ends.
func (c *Cell) Evacuate(ctx context.Context, timeout time.Duration) error {
	var r *rep.Rep
	select {
	case <-c.repDone:
		r = c.rep
	default:
	}
	if r == nil {
		return fmt.Errorf("evacuate cell %s: the cell never started", c.cfg.ID)
	}
	select {
	case <-r.Ready():
	default:
		// Never registered: nothing was placed here, and without the BBS
		// nothing can be moved.
		return fmt.Errorf("evacuate cell %s: the cell never became ready", c.cfg.ID)
	}
	return r.Evacuate(ctx, timeout)
}

// Numbered derives the configuration of cell i (from 0) of several cells
// sharing one machine and one containerd, as basin dev up --cells N runs
// them: everything that must differ is made distinct from base (ID, state,
// bridge, network, subnet, firewall chain, host ports); Containerd, Etcd,
// BBS, capacity and stacks are shared. Addresses are left to the caller
// (port 0 picks a free one).
func Numbered(base Config, i int) Config {
	c := base
	id := base.ID
	if id == "" {
		id = "cell"
	}
	c.ID = fmt.Sprintf("%s-%d", id, i)
	c.StateDir = filepath.Join(base.StateDir, c.ID)
	c.NetworkName = fmt.Sprintf("basin%d", i)
	c.BridgeName = fmt.Sprintf("basin%d", i)
	// 10.213.0.0/16 is one cell's default; N cells take a /24 each.
	c.Subnet = fmt.Sprintf("10.213.%d.0/24", i%256)
	c.FirewallChain = fmt.Sprintf("BASIN-PROTECT-%d", i)
	c.HostPortLow, c.HostPortHigh = 61000+i*200, 61000+i*200+199
	c.Listener = nil
	c.RepAddress = ""
	return c
}

// executorConfig is the executor a cell with cfg runs.
func executorConfig(cfg Config, cd *client.Client, log *slog.Logger, onEvent func(executor.Event)) executor.Config {
	return executor.Config{
		Client: cd, LauncherPath: cfg.LauncherPath, Logger: log, OnEvent: onEvent,
		StateDir: filepath.Join(cfg.StateDir, "executor"), Stacks: cfg.Stacks,
		CNIBinDir: cfg.CNIBinDir, NetworkName: cfg.NetworkName, BridgeName: cfg.BridgeName, Subnet: cfg.Subnet,
		AdvertiseAddress: cfg.AdvertiseAddress, HostPortLow: cfg.HostPortLow, HostPortHigh: cfg.HostPortHigh,
		ProtectedPorts: cfg.ProtectedPorts, FirewallChain: cfg.FirewallChain,
	}
}

// Purge removes what a cell with cfg left on this machine while it is not
// running: its containers (tasks, snapshots, network namespaces, port
// mappings), its firewall chain and its bridge. cfg.Containerd is required.
// basin dev down uses it.
func Purge(ctx context.Context, cfg Config) error {
	if cfg.Containerd == nil {
		return errors.New("cell purge: Config.Containerd is required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	ex, err := executor.New(executorConfig(cfg, cfg.Containerd, cfg.Logger, nil))
	if err != nil {
		return fmt.Errorf("cell %s: %w", cfg.ID, err)
	}
	rctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- ex.Run(rctx) }()
	var errs []error
	infos, err := ex.List(ctx)
	if err != nil {
		errs = append(errs, err)
	}
	for _, info := range infos {
		if info.Labels[rep.LabelCellID] != cfg.ID {
			continue // another cell's, on a shared containerd
		}
		if err := ex.Destroy(ctx, info.InstanceGUID); err != nil {
			errs = append(errs, err)
		}
	}
	stop() // Run removes the firewall chain on its way out
	if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
		errs = append(errs, err)
	}
	if err := ex.RemoveLeftoverNAT(ctx); err != nil {
		errs = append(errs, err)
	}
	bridge := cfg.BridgeName
	if bridge == "" {
		bridge = "basin0"
	}
	if out, err := exec.CommandContext(ctx, "ip", "link", "del", bridge).CombinedOutput(); err != nil &&
		!strings.Contains(string(out), "Cannot find device") {
		errs = append(errs, fmt.Errorf("delete bridge %s: %v: %s", bridge, err, out))
	}
	return errors.Join(errs...)
}

// ServerTLS is the rep's server TLS configuration: its key pair and, when
// caFile is set, mandatory client certificates signed by that CA.
func ServerTLS(certFile, keyFile, caFile string) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("load TLS key pair %s: %w", certFile, err)
	}
	tc := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("read client CA %s: %w", caFile, err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("client CA %s holds no PEM certificate", caFile)
		}
		// Only components and operators call a cell: no certificate, no call.
		tc.ClientCAs, tc.ClientAuth = pool, tls.RequireAndVerifyClientCert
	}
	return tc, nil
}

// hostCABundle is Debian's bundle of the CAs this machine trusts.
const hostCABundle = "/etc/ssl/certs/ca-certificates.crt"

// HostStagingEnv returns what staging containers need to reach the package
// registries this machine reaches: its Go module proxy (GOPROXY, else Go's
// default), npm registry and HTTP proxies when set, and its CA bundle when
// it has one (registries behind a TLS-inspecting proxy need its CA).
func HostStagingEnv() (env []string, caBundle string) {
	goproxy := os.Getenv("GOPROXY")
	if goproxy == "" {
		goproxy = "https://proxy.golang.org,direct"
	}
	env = append(env, "GOPROXY="+goproxy)
	for _, k := range []string{"GOSUMDB", "GONOSUMDB", "GOPRIVATE", "npm_config_registry", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"} {
		if v, ok := os.LookupEnv(k); ok {
			env = append(env, k+"="+v)
		}
	}
	if fi, err := os.Stat(hostCABundle); err == nil && fi.Mode().IsRegular() {
		caBundle = hostCABundle
	}
	return env, caBundle
}
