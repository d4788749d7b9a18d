// Package gorouter routes HTTP requests by host name to the app instances
// that cells register under routes/ in etcd. It is one process's worth of
// router: a route table kept by a watch, the proxy, the health and debug
// endpoints, and a graceful drain.
//
// Embedding (basin dev up does this on its embedded etcd):
//
//	r, err := gorouter.New(gorouter.Config{
//		Prefix:        bbs.DefaultPrefix,
//		DefaultDomain: "apps.localhost",
//		Addr:          "127.0.0.1:8080", // or ":0", then print r.Addr()
//	}, etcdClient, logger)
//	if err != nil { ... }
//	fmt.Println("apps at http://<app>."+domain+" via", r.Addr())
//	g.Go(func() error { return r.Run(ctx) }) // returns after ctx is done and the drain
//
// A cell's route for app "myapp" under host "myapp.<DefaultDomain>" then
// answers curl -H 'Host: myapp.apps.localhost' http://<r.Addr()>/.
package gorouter

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/basinpaas/basin/bbs"
	"github.com/basinpaas/basin/gorouter/proxy"
	"github.com/basinpaas/basin/gorouter/routetable"
)

// Config is the router's configuration. Addresses take "host:port"; port 0
// picks a free one (see Addr and friends). An empty TLSAddr, HealthAddr or
// DebugAddr turns that listener off.
type Config struct {
	// Prefix is the etcd key prefix (bbs.DefaultPrefix when empty).
	Prefix string
	// DefaultDomain is the apps domain: app "myapp" is reached at
	// myapp.<DefaultDomain>. The router does not invent routes from it; it
	// is here so an embedder (basin dev up) prints and uses one value.
	DefaultDomain string

	Addr       string // plain HTTP
	TLSAddr    string // HTTPS with SNI certificates from TLSCertDir
	HealthAddr string // GET /health: 200, or 503 while draining or before the first sync
	DebugAddr  string // /metrics and /debug/pprof/

	// TLSCertDir holds <name>.crt + <name>.key pairs (PEM); each serves the
	// names in its certificate, picked by SNI. Changed files are picked up
	// every TLSReloadInterval (default 30s).
	TLSCertDir        string
	TLSReloadInterval time.Duration

	// DrainWait is how long /health reports unhealthy before listeners close,
	// so load balancers stop sending; DrainTimeout bounds the wait for
	// requests in flight after that.
	DrainWait    time.Duration
	DrainTimeout time.Duration

	Proxy proxy.Config
}

// Router is a running router; build it with New, start it with Run.
type Router struct {
	cfg    Config
	log    *slog.Logger
	table  *routetable.Table
	syncer *routetable.Syncer
	proxy  *proxy.Proxy
	reg    *prometheus.Registry

	ln, tlsLn, healthLn, debugLn net.Listener
	certs                        *certStore

	mu       sync.Mutex
	draining bool
}

// New builds the router and binds its listeners, so Addr is valid at once.
// Run must follow: it closes what New opened.
func New(cfg Config, client *clientv3.Client, logger *slog.Logger) (*Router, error) {
	if cfg.Addr == "" {
		return nil, errors.New("router config: addr: required")
	}
	if cfg.DrainTimeout == 0 {
		cfg.DrainTimeout = 30 * time.Second
	}
	keys := bbs.NewKeys(cfg.Prefix)
	r := &Router{cfg: cfg, log: logger, table: routetable.New(), reg: prometheus.NewRegistry()}
	r.syncer = routetable.NewSyncer(r.table, client, keys.RoutePrefix(), logger)
	r.reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: "basin", Subsystem: "router", Name: "routes",
			Help: "Route keys (endpoints) in the table.",
		}, func() float64 { return float64(r.table.Len()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Namespace: "basin", Subsystem: "router", Name: "route_relists_total",
			Help: "Full lists of the routes prefix, the first one included.",
		}, func() float64 { return float64(r.syncer.Relists()) }),
	)
	p, err := proxy.New(cfg.Proxy, r.table, proxy.NewMetrics(r.reg), logger)
	if err != nil {
		return nil, fmt.Errorf("router: %w", err)
	}
	r.proxy = p
	if cfg.TLSAddr != "" {
		if r.certs, err = newCertStore(cfg.TLSCertDir, logger); err != nil {
			return nil, fmt.Errorf("router: %w", err)
		}
		if r.cfg.TLSReloadInterval == 0 {
			r.cfg.TLSReloadInterval = 30 * time.Second
		}
	}
	if err := r.listen(); err != nil {
		r.closeListeners()
		return nil, err
	}
	return r, nil
}

func (r *Router) listen() error {
	var err error
	for _, l := range []struct {
		addr string
		ln   *net.Listener
		what string
	}{
		{r.cfg.Addr, &r.ln, "http"},
		{r.cfg.TLSAddr, &r.tlsLn, "https"},
		{r.cfg.HealthAddr, &r.healthLn, "health"},
		{r.cfg.DebugAddr, &r.debugLn, "debug"},
	} {
		if l.addr == "" {
			continue
		}
		if *l.ln, err = net.Listen("tcp", l.addr); err != nil {
			return fmt.Errorf("router: listen for %s on %s: %w", l.what, l.addr, err)
		}
	}
	return nil
}

func (r *Router) closeListeners() {
	for _, ln := range []net.Listener{r.ln, r.tlsLn, r.healthLn, r.debugLn} {
		if ln != nil {
			ln.Close()
		}
	}
}

// Addr is the plain HTTP address the router listens on.
func (r *Router) Addr() net.Addr { return r.ln.Addr() }

// TLSAddr is the HTTPS address, or nil.
func (r *Router) TLSAddr() net.Addr { return addrOf(r.tlsLn) }

// HealthAddr is the health check address, or nil.
func (r *Router) HealthAddr() net.Addr { return addrOf(r.healthLn) }

// DebugAddr is the metrics and pprof address, or nil.
func (r *Router) DebugAddr() net.Addr { return addrOf(r.debugLn) }

func addrOf(ln net.Listener) net.Addr {
	if ln == nil {
		return nil
	}
	return ln.Addr()
}

// Table exposes the route table (read-only use: lookups and size).
func (r *Router) Table() *routetable.Table { return r.table }

// Synced is closed once the route table holds the first full list.
func (r *Router) Synced() <-chan struct{} { return r.syncer.Synced() }

// Run serves until ctx is done, then drains: /health turns 503, after
// DrainWait the listeners close, and requests in flight get DrainTimeout to
// finish. It returns nil after a clean drain.
func (r *Router) Run(ctx context.Context) error {
	bg, stopBG := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	errc := make(chan error, 8)
	goRun := func(f func() error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f(); err != nil {
				errc <- err
			}
		}()
	}
	// The table keeps syncing during the drain: requests in flight and new
	// ones on kept-alive connections still route correctly.
	goRun(func() error { return r.syncer.Run(bg) })
	goRun(func() error { r.proxy.Maintain(bg); return nil })
	if r.certs != nil {
		goRun(func() error { r.certs.watch(bg, r.cfg.TLSReloadInterval); return nil })
	}

	var aux []*http.Server
	if r.healthLn != nil {
		hs := &http.Server{Handler: http.HandlerFunc(r.health), ReadHeaderTimeout: 5 * time.Second}
		aux = append(aux, hs)
		goRun(func() error { return serveHTTP(hs, r.healthLn) })
	}
	if r.debugLn != nil {
		ds := &http.Server{Handler: bbs.DebugHandler(r.reg), ReadHeaderTimeout: 5 * time.Second}
		aux = append(aux, ds)
		goRun(func() error { return serveHTTP(ds, r.debugLn) })
	}

	// Serving before the first list would answer 404 for routes that exist;
	// clients wait in the listen backlog instead.
	var runErr error
	select {
	case <-r.syncer.Synced():
		goRun(func() error { return r.proxy.Serve(r.ln) })
		if r.tlsLn != nil {
			goRun(func() error { return r.proxy.ServeTLS(r.tlsLn, r.certs.tlsConfig()) })
		}
		select {
		case <-ctx.Done():
		case runErr = <-errc:
		}
	case <-ctx.Done():
	case runErr = <-errc:
	}
	if runErr != nil {
		r.log.Error("router failed; draining", "err", runErr)
	}

	r.mu.Lock()
	r.draining = true
	r.mu.Unlock()
	if r.cfg.DrainWait > 0 {
		t := time.NewTimer(r.cfg.DrainWait)
		<-t.C
	}
	for _, ln := range []net.Listener{r.ln, r.tlsLn} {
		if ln != nil {
			ln.Close()
		}
	}
	dctx, cancel := context.WithTimeout(context.Background(), r.cfg.DrainTimeout)
	if err := r.proxy.Shutdown(dctx); err != nil {
		r.log.Warn("drain cut connections", "err", err)
	}
	cancel()
	for _, s := range aux {
		s.Close()
	}
	stopBG()
	wg.Wait()
	return runErr
}

func serveHTTP(s *http.Server, ln net.Listener) error {
	if err := s.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve %s: %w", ln.Addr(), err)
	}
	return nil
}

func (r *Router) health(w http.ResponseWriter, req *http.Request) {
	if req.URL.Path != "/health" {
		http.NotFound(w, req)
		return
	}
	r.mu.Lock()
	draining := r.draining
	r.mu.Unlock()
	synced := false
	select {
	case <-r.syncer.Synced():
		synced = true
	default:
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	switch {
	case draining:
		w.WriteHeader(http.StatusServiceUnavailable)
		io.WriteString(w, "draining\n")
	case !synced:
		w.WriteHeader(http.StatusServiceUnavailable)
		io.WriteString(w, "route table not synced\n")
	default:
		io.WriteString(w, "ok\n")
	}
}
