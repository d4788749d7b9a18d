package bbs

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"time"

	"github.com/basinpaas/basin/bbs/blobstore"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"
)

// Config configures a BBS server.
type Config struct {
	// ListenAddress for gRPC, e.g. "127.0.0.1:8889". Ignored when Listener is set.
	ListenAddress string
	Listener      net.Listener
	// DebugAddress serves /metrics; empty disables it.
	DebugAddress string
	// TLS: server certificate and key; ClientCAFile turns on verification of
	// component client certificates. Plaintext when CertFile is empty.
	CertFile, KeyFile, ClientCAFile string
	// Token users must send as "authorization: Bearer <token>"; empty
	// disables the check (loopback development only).
	Token string
	// MaxMessageBytes bounds one request or response.
	MaxMessageBytes int
	Limits          Limits
	Store           StoreConfig
	// Blobs, when set, is served as the BlobstoreService; blobs larger than
	// MaxBlobBytes are refused, and blobs nothing references are deleted
	// after BlobGrace (checked every BlobGCInterval).
	Blobs          blobstore.Store
	MaxBlobBytes   int64
	BlobGrace      time.Duration
	BlobGCInterval time.Duration
	// Staging configures the StagingService, served when Blobs is set.
	Staging StagingConfig
	// BuiltinBuildpacks, when set (and Blobs is), gives the built-in
	// buildpacks that Run registers once the store is ready (see
	// StagingAPI.RegisterBuiltin): basin dev up and cmd/bbs pass
	// buildpacks.Builtin's archives.
	BuiltinBuildpacks func() ([]BuildpackArchive, error)
	// CellDialOptions reach the cells' reps for LogService and SSHService (their TLS
	// credentials); plaintext when empty, as the auctioneer dials them.
	CellDialOptions []grpc.DialOption
	Logger          *slog.Logger
}

// Server is a BBS: the gRPC API over a Store, with health, reflection and
// metrics. Several may serve at once on one etcd: all state is there.
type Server struct {
	cfg      Config
	store    *Store
	api      *API
	registry *prometheus.Registry
	grpc     *grpc.Server
	health   *health.Server
	lis      net.Listener
	log      *slog.Logger
	staging  *StagingAPI // nil without a blobstore
	cells    *cellConns
}

// NewServer builds a BBS on cli and binds its gRPC listener, so Addr is known
// before Run.
func NewServer(cli *clientv3.Client, cfg Config) (*Server, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.MaxMessageBytes <= 0 {
		cfg.MaxMessageBytes = 4 << 20
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	cfg.Store.Registerer = reg
	cfg.Store.Logger = cfg.Logger
	store := NewStore(cli, cfg.Store)
	m := store.metrics

	auth := authenticator{token: cfg.Token}
	opts := []grpc.ServerOption{
		grpc.MaxRecvMsgSize(cfg.MaxMessageBytes),
		grpc.MaxSendMsgSize(64 << 20),
		grpc.ConnectionTimeout(10 * time.Second),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.ChainUnaryInterceptor(metricsUnary(m), unaryStatusInterceptor(cfg.Logger), auth.unary),
		grpc.ChainStreamInterceptor(streamStatusInterceptor(cfg.Logger), auth.stream),
	}
	if cfg.CertFile != "" {
		tc, err := serverTLS(cfg.CertFile, cfg.KeyFile, cfg.ClientCAFile)
		if err != nil {
			return nil, err
		}
		opts = append(opts, grpc.Creds(credentials.NewTLS(tc)))
	}
	gs := grpc.NewServer(opts...)
	api := NewAPI(store, cfg.Limits)
	basinv1.RegisterBBSServiceServer(gs, api)
	if cfg.Blobs != nil {
		if cfg.MaxBlobBytes <= 0 {
			cfg.MaxBlobBytes = 2 << 30
		}
		if cfg.BlobGrace <= 0 {
			cfg.BlobGrace = time.Hour
		}
		if cfg.BlobGCInterval <= 0 {
			cfg.BlobGCInterval = 10 * time.Minute
		}
		basinv1.RegisterBlobstoreServiceServer(gs, NewBlobAPI(cfg.Blobs, cfg.MaxBlobBytes))
	}
	var staging *StagingAPI
	if cfg.Blobs != nil {
		staging = NewStagingAPI(store, cfg.Blobs, cfg.Limits, cfg.Staging, cfg.Logger)
		basinv1.RegisterStagingServiceServer(gs, staging)
	}
	// Logs and ssh relay to the same cells: one connection per cell.
	cells := newCellConns(cfg.CellDialOptions)
	basinv1.RegisterLogServiceServer(gs, newLogAPI(store, cells, cfg.Logger))
	basinv1.RegisterSSHServiceServer(gs, newSSHAPI(store, cells, cfg.Logger))
	hs := health.NewServer()
	healthpb.RegisterHealthServer(gs, hs)
	reflection.Register(gs)

	lis := cfg.Listener
	if lis == nil {
		var err error
		if lis, err = net.Listen("tcp", cfg.ListenAddress); err != nil {
			return nil, fmt.Errorf("listen on %s: %w", cfg.ListenAddress, err)
		}
	}
	return &Server{cfg: cfg, store: store, api: api, registry: reg, grpc: gs, health: hs, lis: lis, log: cfg.Logger, staging: staging, cells: cells}, nil
}

// Addr is where the gRPC API listens.
func (s *Server) Addr() string { return s.lis.Addr().String() }

// Store is the server's store.
func (s *Server) Store() *Store { return s.store }

// API is the BBSService the server serves, for layers in the same process
// (the app layer) that call it without a network hop, validation included.
func (s *Server) API() *API { return s.api }

// RegisterService serves another gRPC service beside the BBS, behind the
// same authentication and error mapping; call it before Run.
func (s *Server) RegisterService(desc *grpc.ServiceDesc, impl any) {
	s.grpc.RegisterService(desc, impl)
}

// Registry holds the server's metrics, for embedding in a shared debug server.
func (s *Server) Registry() *prometheus.Registry { return s.registry }

// Staging is the StagingService, nil when the server has no blobstore.
func (s *Server) Staging() *StagingAPI { return s.staging }

// Run serves until ctx is done, then stops gracefully (bounded).
func (s *Server) Run(ctx context.Context) error {
	defer s.cells.close()
	g, gctx := errgroup.WithContext(ctx)
	if s.staging != nil && s.cfg.BuiltinBuildpacks != nil {
		g.Go(func() error { s.registerBuiltin(gctx); return nil })
	}
	g.Go(func() error { return s.store.Run(gctx) })
	g.Go(func() error {
		if err := s.store.WaitReady(gctx); err != nil {
			return nil
		}
		s.health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
		s.health.SetServingStatus(basinv1.BBSService_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
		return nil
	})
	s.health.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	g.Go(func() error {
		if err := s.grpc.Serve(s.lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			return fmt.Errorf("serve gRPC: %w", err)
		}
		return nil
	})
	if s.cfg.Blobs != nil {
		g.Go(func() error { s.collectBlobs(gctx); return nil })
	}
	if s.cfg.DebugAddress != "" {
		lis, err := ListenDebug(s.cfg.DebugAddress)
		if err != nil {
			return err
		}
		g.Go(func() error { return ServeDebug(gctx, lis, s.registry) })
	}
	g.Go(func() error {
		<-gctx.Done()
		s.health.Shutdown()
		stopped := make(chan struct{})
		go func() { s.grpc.GracefulStop(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(5 * time.Second):
			s.grpc.Stop()
		}
		return nil
	})
	s.log.Info("BBS serving", "addr", s.Addr())
	return g.Wait()
}

// registerBuiltin registers the built-in buildpacks once the store is
// ready, retrying while etcd or a concurrent replica gets in the way.
func (s *Server) registerBuiltin(ctx context.Context) {
	if err := s.store.WaitReady(ctx); err != nil {
		return
	}
	archives, err := s.cfg.BuiltinBuildpacks()
	if err != nil {
		s.log.Error("built-in buildpacks", "err", err)
		return
	}
	for backoff := 100 * time.Millisecond; ; backoff = min(2*backoff, 10*time.Second) {
		err := s.staging.RegisterBuiltin(ctx, archives)
		if err == nil {
			s.log.Info("built-in buildpacks registered", "count", len(archives))
			return
		}
		if ctx.Err() != nil {
			return
		}
		s.log.Warn("register built-in buildpacks", "err", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
	}
}

// collectBlobs deletes unreferenced blobs every BlobGCInterval. Several BBS
// replicas sharing a blobstore may all do it: deleting is idempotent and
// every replica sees the same references in etcd.
func (s *Server) collectBlobs(ctx context.Context) {
	t := time.NewTicker(s.cfg.BlobGCInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if _, err := collectBlobs(ctx, s.store, s.cfg.Blobs, s.cfg.BlobGrace, time.Now(), s.log); err != nil && ctx.Err() == nil {
			s.log.Warn("blob garbage collection failed", "err", err)
		}
	}
}

// DebugHandler serves /metrics from reg and the Go profiler under
// /debug/pprof/; it belongs on a loopback or otherwise private port.
func DebugHandler(reg *prometheus.Registry) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}

// ListenDebug binds a debug address, saying which on failure.
func ListenDebug(addr string) (net.Listener, error) {
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen on debug address %s: %w", addr, err)
	}
	return lis, nil
}

// ServeDebug serves DebugHandler(reg) on lis until ctx ends, then shuts it
// down within 2 s. Every component's debug port runs through it.
func ServeDebug(ctx context.Context, lis net.Listener, reg *prometheus.Registry) error {
	addr := lis.Addr().String()
	srv := &http.Server{Handler: DebugHandler(reg), ReadHeaderTimeout: 5 * time.Second}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(lis) }()
	select {
	case err := <-served:
		return fmt.Errorf("serve debug on %s: %w", addr, err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer cancel()
	err := srv.Shutdown(sctx)
	<-served
	return err
}

func serverTLS(certFile, keyFile, caFile string) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("load TLS key pair %s: %w", certFile, err)
	}
	tc := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pool, err := loadPool(caFile)
		if err != nil {
			return nil, err
		}
		// Users authenticate with a token, components with a certificate:
		// verify a certificate when given, but do not demand one.
		tc.ClientCAs = pool
		tc.ClientAuth = tls.VerifyClientCertIfGiven
	}
	return tc, nil
}

func loadPool(caFile string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("read CA %s: %w", caFile, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("CA %s holds no PEM certificate", caFile)
	}
	return pool, nil
}

func metricsUnary(m *metrics) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		start := time.Now()
		resp, err := handler(ctx, req)
		m.requestSeconds.WithLabelValues(info.FullMethod).Observe(time.Since(start).Seconds())
		m.requests.WithLabelValues(info.FullMethod, status.Code(toStatus(err)).String()).Inc()
		return resp, err
	}
}
