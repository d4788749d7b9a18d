// Command bench measures basin's router against a direct connection, nginx
// and haproxy on loopback, then under route churn. scripts/bench-router.sh
// installs the tools and runs it; see there for the knobs.
//
// Layout on a 2-core machine: the backend and the proxy under test share
// core 0 (taskset), wrk has core 1, so every proxy gets the same CPU. etcd
// and this orchestrator float.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"

	"github.com/basinpaas/basin/bbs"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

type options struct {
	gorouter    string
	duration    time.Duration
	warmup      time.Duration
	conns       []int
	routes      int
	churnRoutes int
	churnRate   int
	churnFor    time.Duration
	proxyCPU    string
	wrkCPU      string
	profile     string
	backendAddr string
	skipChurn   bool
	skipCompare bool
	targets     []string
	rounds      int
	workDir     string
	benchHost   string
	etcdPrefix  string
}

func main() {
	var o options
	var conns, targets string
	flag.StringVar(&o.gorouter, "gorouter", "", "path to the gorouter binary (required)")
	flag.DurationVar(&o.duration, "duration", 5*time.Second, "wrk measurement per target and connection count")
	flag.DurationVar(&o.warmup, "warmup", time.Second, "wrk warm-up before each measurement")
	flag.StringVar(&conns, "conns", "64,256", "connection counts")
	flag.IntVar(&o.routes, "routes", 1000, "routes in the table during the comparison")
	flag.IntVar(&o.churnRoutes, "churn-routes", 100000, "routes in the table during the churn scenario")
	flag.IntVar(&o.churnRate, "churn-rate", 1000, "route changes per second during churn")
	flag.DurationVar(&o.churnFor, "churn-duration", 10*time.Second, "length of the churn scenario")
	flag.StringVar(&o.proxyCPU, "proxy-cpu", "0", "CPU list for the backend and the proxy under test")
	flag.StringVar(&o.wrkCPU, "wrk-cpu", "1", "CPU list for wrk")
	flag.StringVar(&o.profile, "profile", "", "write a CPU profile of basin's router at the first connection count here")
	flag.StringVar(&o.backendAddr, "serve-backend", "", "internal: run as the Go backend on this address")
	flag.BoolVar(&o.skipChurn, "skip-churn", false, "only the comparison")
	flag.BoolVar(&o.skipCompare, "skip-compare", false, "only the churn scenario")
	flag.StringVar(&targets, "targets", "direct,basin,nginx,haproxy", "targets of the comparison")
	flag.IntVar(&o.rounds, "rounds", 3, "interleaved rounds of the comparison; each target keeps its best")
	flag.Parse()
	if o.backendAddr != "" {
		serveBackend(o.backendAddr)
		return
	}
	for _, c := range strings.Split(conns, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(c))
		if err != nil {
			log.Fatalf("-conns: %v", err)
		}
		o.conns = append(o.conns, n)
	}
	o.targets = strings.Split(targets, ",")
	if o.gorouter == "" {
		log.Fatal("-gorouter: required")
	}
	o.benchHost = "bench.apps.test"
	o.etcdPrefix = "/basin-bench/"
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, o); err != nil {
		log.Fatalf("bench: %v", err)
	}
}

// serveBackend is the one Go backend every target proxies to.
func serveBackend(addr string) {
	body := []byte("Hello, World!")
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		w.Write(body)
	})
	s := &http.Server{Addr: addr, Handler: h, ReadHeaderTimeout: 10 * time.Second}
	log.Fatal(s.ListenAndServe())
}

type result struct {
	target string
	conns  int
	rps    float64
	p50    time.Duration
	p99    time.Duration
	errors int64
	// CPU time per request of the proxy and of the backend, from /proc:
	// steadier than req/s when other work shares the machine.
	proxyCPU, backendCPU time.Duration
	switches             float64 // context switches of the proxy per request
}

// procs tracks the processes we started, to stop exactly those.
type procs struct {
	mu   sync.Mutex
	list []*exec.Cmd
}

func (p *procs) start(name string, logPath string, args ...string) (*exec.Cmd, error) {
	cmd := exec.Command(name, args...)
	f, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("log for %s: %w", name, err)
	}
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("start %s %v: %w", name, args, err)
	}
	p.mu.Lock()
	p.list = append(p.list, cmd)
	p.mu.Unlock()
	return cmd, nil
}

func (p *procs) stop(cmd *exec.Cmd) {
	if cmd == nil || cmd.Process == nil {
		return
	}
	cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		cmd.Process.Kill()
		<-done
	}
}

func (p *procs) stopAll() {
	p.mu.Lock()
	list := p.list
	p.list = nil
	p.mu.Unlock()
	for i := len(list) - 1; i >= 0; i-- {
		p.stop(list[i])
	}
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func waitListening(ctx context.Context, addr string) error {
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("nothing listens on %s after 15s", addr)
}

func run(ctx context.Context, o options) error {
	dir, err := os.MkdirTemp("", "basin-bench-router-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	o.workDir = dir
	ps := &procs{}
	defer ps.stopAll()
	self, err := os.Executable()
	if err != nil {
		return err
	}

	etcd, cli, err := startEtcd(dir)
	if err != nil {
		return err
	}
	defer etcd.Close()
	defer cli.Close()

	ports := map[string]int{}
	for _, n := range []string{"backend", "basin", "debug", "nginx", "haproxy"} {
		if ports[n], err = freePort(); err != nil {
			return err
		}
	}
	addr := func(n string) string { return "127.0.0.1:" + strconv.Itoa(ports[n]) }

	pids := map[string]int{}
	backendCmd, err := ps.start("taskset", filepath.Join(dir, "backend.log"), "-c", o.proxyCPU, self, "-serve-backend", addr("backend"))
	if err != nil {
		return err
	}
	pids["direct"] = backendCmd.Process.Pid
	if err := waitListening(ctx, addr("backend")); err != nil {
		return err
	}

	keys := bbs.NewKeys(o.etcdPrefix)
	bh, bp, _ := net.SplitHostPort(addr("backend"))
	bport, _ := strconv.Atoi(bp)
	if err := putRoutes(ctx, cli, keys, "fill", 0, o.routes-1, bh, uint32(bport)); err != nil {
		return err
	}
	if err := putRoute(ctx, cli, keys, o.benchHost, bh, uint32(bport)); err != nil {
		return err
	}

	routerArgs := []string{"-c", o.proxyCPU, o.gorouter,
		"-etcd-endpoints", etcdEndpoint(etcd), "-prefix", o.etcdPrefix,
		"-addr", addr("basin"), "-health-addr", "", "-debug-addr", addr("debug"),
		"-access-log", "", "-drain-wait", "0", "-log-level", "warn"}
	routerCmd, err := ps.start("taskset", filepath.Join(dir, "gorouter.log"), routerArgs...)
	if err != nil {
		return err
	}
	pids["basin"] = routerCmd.Process.Pid
	if err := waitListening(ctx, addr("basin")); err != nil {
		return err
	}
	if err := waitRoutes(ctx, "http://"+addr("debug")+"/metrics", o.routes); err != nil {
		return err
	}

	var results []result
	if !o.skipCompare {
		ng, err := startNginx(ps, dir, addr("nginx"), addr("backend"), o.proxyCPU)
		if err != nil {
			return err
		}
		pids["nginx"] = ng.Process.Pid
		hp, err := startHAProxy(ps, dir, addr("haproxy"), addr("backend"), o.proxyCPU)
		if err != nil {
			return err
		}
		pids["haproxy"] = hp.Process.Pid
		for _, n := range []string{"nginx", "haproxy"} {
			if err := waitListening(ctx, addr(n)); err != nil {
				return fmt.Errorf("%s: %w (log in %s)", n, err, dir)
			}
		}
		fmt.Printf("comparison: %d routes in basin's table, wrk on CPU %s, backend and proxy on CPU %s, %s per measurement, best of %d interleaved rounds\n",
			o.routes+1, o.wrkCPU, o.proxyCPU, o.duration, o.rounds)
		// Rounds interleave the targets so background load hits them alike;
		// each keeps its best round (highest req/s), the usual guard against
		// a machine that is busy with other work part of the time.
		best := map[string]result{}
		for round := 0; round < o.rounds; round++ {
			for ci, c := range o.conns {
				for _, target := range o.targets {
					a := addr(target)
					if target == "direct" {
						a = addr("backend")
					}
					var prof chan error
					if target == "basin" && ci == 0 && round == 0 && o.profile != "" {
						prof = make(chan error, 1)
						go func() {
							time.Sleep(o.warmup + 500*time.Millisecond)
							prof <- fetchProfile(ctx, "http://"+addr("debug"), o.duration-time.Second, o.profile)
						}()
					}
					if o.warmup > 0 {
						if _, err := runWrk(ctx, o, a, c, o.warmup); err != nil {
							return fmt.Errorf("%s warm-up at %d connections: %w", target, c, err)
						}
					}
					proxyBefore, backendBefore := procCPU(pids[target]), procCPU(pids["direct"])
					csBefore := ctxSwitches(pids[target])
					r, err := runWrk(ctx, o, a, c, o.duration)
					if n := r.rps * o.duration.Seconds(); err == nil && n > 0 {
						r.proxyCPU = (procCPU(pids[target]) - proxyBefore) / time.Duration(n)
						r.backendCPU = (procCPU(pids["direct"]) - backendBefore) / time.Duration(n)
						r.switches = float64(ctxSwitches(pids[target])-csBefore) / n
						if target == "direct" {
							r.proxyCPU = 0
						}
					}
					if err != nil {
						return fmt.Errorf("%s at %d connections: %w", target, c, err)
					}
					if prof != nil {
						if err := <-prof; err != nil {
							fmt.Fprintf(os.Stderr, "profile: %v\n", err)
						}
					}
					r.target = target
					fmt.Printf("  round %d %-8s c=%-4d %10.0f req/s  p50 %7.3f ms  p99 %7.3f ms  errors %d  CPU/req: proxy %.1f µs, backend %.1f µs; proxy context switches/req %.2f\n",
						round+1, target, c, r.rps, ms(r.p50), ms(r.p99), r.errors, us(r.proxyCPU), us(r.backendCPU), r.switches)
					k := target + strconv.Itoa(c)
					if old, ok := best[k]; !ok || r.rps > old.rps {
						r.errors += old.errors
						best[k] = r
					} else {
						old.errors += r.errors
						best[k] = old
					}
				}
			}
		}
		for _, target := range o.targets {
			for _, c := range o.conns {
				results = append(results, best[target+strconv.Itoa(c)])
			}
		}
		printTable(results, o.conns)
	}

	var churn churnResult
	if !o.skipChurn {
		churn, err = runChurn(ctx, o, cli, keys, bh, uint32(bport), addr("basin"), "http://"+addr("debug")+"/metrics")
		if err != nil {
			return fmt.Errorf("churn: %w", err)
		}
		fmt.Printf("churn: %d routes, %d changes/s for %s: traffic %.0f req/s, %d errors; route change → routable p50 %.1f ms, p99 %.1f ms, max %.1f ms over %d probes; router RSS %s\n",
			o.churnRoutes, o.churnRate, o.churnFor, churn.rps, churn.errors, ms(churn.p50), ms(churn.p99), ms(churn.max), churn.samples, rss(pids["basin"]))
	}

	for _, r := range results {
		fmt.Printf("RESULT %s_rps_%d %.0f\n", r.target, r.conns, r.rps)
		fmt.Printf("RESULT %s_p99_ms_%d %.3f\n", r.target, r.conns, ms(r.p99))
	}
	if !o.skipChurn {
		fmt.Printf("RESULT route_change_p99_ms %.1f\n", ms(churn.p99))
		fmt.Printf("RESULT churn_errors %d\n", churn.errors)
	}
	return nil
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// rss is a process's resident memory as /proc reports it.
func rss(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return "?"
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			return strings.TrimSpace(v)
		}
	}
	return "?"
}

// ctxSwitches sums the context switches of pid's threads and descendants.
func ctxSwitches(pid int) int64 {
	if pid == 0 {
		return 0
	}
	var total int64
	statuses, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/status", pid))
	for _, st := range statuses {
		b, _ := os.ReadFile(st)
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.HasSuffix(k, "ctxt_switches") {
				n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
				total += n
			}
		}
	}
	children, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	for _, t := range children {
		b, _ := os.ReadFile(t)
		for _, c := range strings.Fields(string(b)) {
			if cp, err := strconv.Atoi(c); err == nil {
				total += ctxSwitches(cp)
			}
		}
	}
	return total
}

// procCPU is the user+system CPU time of pid and its descendants (nginx's
// worker is a child of its master).
func procCPU(pid int) time.Duration {
	if pid == 0 {
		return 0
	}
	var total time.Duration
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
		// Fields after the command name, which is in parentheses.
		if i := bytes.LastIndexByte(b, ')'); i > 0 {
			f := strings.Fields(string(b[i+1:]))
			if len(f) > 12 {
				ut, _ := strconv.ParseInt(f[11], 10, 64)
				st, _ := strconv.ParseInt(f[12], 10, 64)
				total += time.Duration(ut+st) * time.Second / 100 // USER_HZ
			}
		}
	}
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	for _, t := range tasks {
		b, _ := os.ReadFile(t)
		for _, c := range strings.Fields(string(b)) {
			if cp, err := strconv.Atoi(c); err == nil {
				total += procCPU(cp)
			}
		}
	}
	return total
}

func printTable(results []result, conns []int) {
	by := map[string]result{}
	for _, r := range results {
		by[r.target+strconv.Itoa(r.conns)] = r
	}
	fmt.Println()
	fmt.Printf("%-8s %6s %10s %9s %9s %12s %12s %14s %16s\n", "target", "conns", "req/s", "p50 ms", "p99 ms", "rps/nginx", "p99/nginx", "proxy µs/req", "backend µs/req")
	for _, t := range []string{"direct", "basin", "nginx", "haproxy"} {
		for _, c := range conns {
			r, ok := by[t+strconv.Itoa(c)]
			if !ok {
				continue
			}
			ng := by["nginx"+strconv.Itoa(c)]
			ratio, pratio := 0.0, 0.0
			if ng.rps > 0 {
				ratio = r.rps / ng.rps
			}
			if ng.p99 > 0 {
				pratio = float64(r.p99) / float64(ng.p99)
			}
			fmt.Printf("%-8s %6d %10.0f %9.3f %9.3f %12.2f %12.2f %14.1f %16.1f\n", t, c, r.rps, ms(r.p50), ms(r.p99), ratio, pratio, us(r.proxyCPU), us(r.backendCPU))
		}
	}
	fmt.Println()
}

// --- etcd ---

func startEtcd(dir string) (*embed.Etcd, *clientv3.Client, error) {
	cport, err := freePort()
	if err != nil {
		return nil, nil, err
	}
	pport, err := freePort()
	if err != nil {
		return nil, nil, err
	}
	cu := url.URL{Scheme: "http", Host: "127.0.0.1:" + strconv.Itoa(cport)}
	pu := url.URL{Scheme: "http", Host: "127.0.0.1:" + strconv.Itoa(pport)}
	ec := embed.NewConfig()
	ec.Dir = filepath.Join(dir, "etcd")
	ec.Name = "bench"
	ec.ListenClientUrls, ec.AdvertiseClientUrls = []url.URL{cu}, []url.URL{cu}
	ec.ListenPeerUrls, ec.AdvertisePeerUrls = []url.URL{pu}, []url.URL{pu}
	ec.InitialCluster = ec.Name + "=" + pu.String()
	ec.LogLevel = "error"
	ec.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	// The disk is not what is measured; the router is.
	ec.UnsafeNoFsync = true
	e, err := embed.StartEtcd(ec)
	if err != nil {
		return nil, nil, fmt.Errorf("start etcd: %w", err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(30 * time.Second):
		e.Close()
		return nil, nil, errors.New("etcd not ready after 30s")
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{cu.String()}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		e.Close()
		return nil, nil, fmt.Errorf("etcd client: %w", err)
	}
	return e, cli, nil
}

func etcdEndpoint(e *embed.Etcd) string { return e.Config().ListenClientUrls[0].String() }

func routeValue(host, addr string, port uint32, guid string) []byte {
	b, _ := proto.Marshal(&basinv1.RouteEndpoint{Host: host, ProcessGuid: guid, InstanceGuid: guid + "-0", Address: addr, Port: port})
	return b
}

func putRoute(ctx context.Context, cli *clientv3.Client, keys bbs.Keys, host, addr string, port uint32) error {
	_, err := cli.Put(ctx, keys.Route(host, "", "bench", 0), string(routeValue(host, addr, port, "bench")))
	if err != nil {
		return fmt.Errorf("put route %s: %w", host, err)
	}
	return nil
}

// putRoutes writes hosts <name>-<from..to>.apps.test in transactions of 128
// (etcd's default op limit).
func putRoutes(ctx context.Context, cli *clientv3.Client, keys bbs.Keys, name string, from, to int, addr string, port uint32) error {
	var ops []clientv3.Op
	flush := func() error {
		if len(ops) == 0 {
			return nil
		}
		if _, err := cli.Txn(ctx).Then(ops...).Commit(); err != nil {
			return fmt.Errorf("put %d routes: %w", len(ops), err)
		}
		ops = ops[:0]
		return nil
	}
	for i := from; i <= to; i++ {
		host := fmt.Sprintf("%s-%d.apps.test", name, i)
		guid := fmt.Sprintf("%s-%d", name, i)
		ops = append(ops, clientv3.OpPut(keys.Route(host, "", guid, 0), string(routeValue(host, addr, port, guid))))
		if len(ops) == 128 {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	return flush()
}

var routesRe = regexp.MustCompile(`(?m)^basin_router_routes (\S+)$`)

func routerRoutes(ctx context.Context, metricsURL string) (int, error) {
	req, _ := http.NewRequestWithContext(ctx, "GET", metricsURL, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	m := routesRe.FindSubmatch(b)
	if m == nil {
		return 0, errors.New("no basin_router_routes in metrics")
	}
	f, err := strconv.ParseFloat(string(m[1]), 64)
	return int(f), err
}

func waitRoutes(ctx context.Context, metricsURL string, atLeast int) error {
	deadline := time.Now().Add(60 * time.Second)
	for {
		n, err := routerRoutes(ctx, metricsURL)
		if err == nil && n >= atLeast {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("router has %d routes after 60s, want %d (%v)", n, atLeast, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// --- the other proxies ---

func startNginx(ps *procs, dir, listen, backend, cpu string) (*exec.Cmd, error) {
	nd := filepath.Join(dir, "nginx")
	if err := os.MkdirAll(filepath.Join(nd, "logs"), 0o755); err != nil {
		return nil, err
	}
	conf := fmt.Sprintf(`worker_processes 1;
pid %[1]s/nginx.pid;
error_log %[1]s/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path %[1]s/client_body;
  proxy_temp_path %[1]s/proxy;
  fastcgi_temp_path %[1]s/fastcgi;
  uwsgi_temp_path %[1]s/uwsgi;
  scgi_temp_path %[1]s/scgi;
  upstream backend {
    server %[3]s;
    keepalive 64;
  }
  server {
    listen %[2]s;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
    }
  }
}
`, nd, listen, backend)
	cf := filepath.Join(nd, "nginx.conf")
	if err := os.WriteFile(cf, []byte(conf), 0o644); err != nil {
		return nil, err
	}
	return ps.start("taskset", filepath.Join(nd, "stdout.log"), "-c", cpu, "nginx", "-p", nd, "-e", filepath.Join(nd, "logs/error.log"), "-c", cf, "-g", "daemon off;")
}

func startHAProxy(ps *procs, dir, listen, backend, cpu string) (*exec.Cmd, error) {
	hd := filepath.Join(dir, "haproxy")
	if err := os.MkdirAll(hd, 0o755); err != nil {
		return nil, err
	}
	conf := fmt.Sprintf(`global
  maxconn 4096
  nbthread 1
defaults
  mode http
  option http-keep-alive
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend fe
  bind %s
  default_backend be
backend be
  http-reuse always
  server s1 %s
`, listen, backend)
	cf := filepath.Join(hd, "haproxy.cfg")
	if err := os.WriteFile(cf, []byte(conf), 0o644); err != nil {
		return nil, err
	}
	return ps.start("taskset", filepath.Join(hd, "haproxy.log"), "-c", cpu, "haproxy", "-db", "-f", cf)
}

// --- wrk ---

var (
	rpsRe     = regexp.MustCompile(`Requests/sec:\s+([\d.]+)`)
	latRe     = regexp.MustCompile(`(?m)^\s+(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$`)
	non2xxRe  = regexp.MustCompile(`Non-2xx or 3xx responses: (\d+)`)
	sockErrRe = regexp.MustCompile(`Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)`)
)

// runWrk runs wrk once for d (whole seconds).
func runWrk(ctx context.Context, o options, addr string, conns int, d time.Duration) (result, error) {
	wrk := func(d time.Duration) ([]byte, error) {
		args := []string{"-c", o.wrkCPU, "wrk", "-t1", "-c" + strconv.Itoa(conns), "-d" + strconv.Itoa(int(d.Seconds())) + "s",
			"--latency", "-H", "Host: " + o.benchHost, "http://" + addr + "/"}
		cctx, cancel := context.WithTimeout(ctx, d+30*time.Second)
		defer cancel()
		out, err := exec.CommandContext(cctx, "taskset", args...).CombinedOutput()
		if err != nil {
			return out, fmt.Errorf("wrk: %w: %s", err, out)
		}
		return out, nil
	}
	out, err := wrk(d)
	if err != nil {
		return result{}, err
	}
	return parseWrk(out, conns)
}

func parseWrk(out []byte, conns int) (result, error) {
	r := result{conns: conns}
	m := rpsRe.FindSubmatch(out)
	if m == nil {
		return r, fmt.Errorf("no Requests/sec in wrk output: %s", out)
	}
	r.rps, _ = strconv.ParseFloat(string(m[1]), 64)
	for _, lm := range latRe.FindAllSubmatch(out, -1) {
		v, _ := strconv.ParseFloat(string(lm[2]), 64)
		unit := map[string]time.Duration{"us": time.Microsecond, "ms": time.Millisecond, "s": time.Second}[string(lm[3])]
		d := time.Duration(v * float64(unit))
		if string(lm[1]) == "50" {
			r.p50 = d
		} else {
			r.p99 = d
		}
	}
	if m := non2xxRe.FindSubmatch(out); m != nil {
		n, _ := strconv.ParseInt(string(m[1]), 10, 64)
		r.errors += n
	}
	if m := sockErrRe.FindSubmatch(out); m != nil {
		for _, g := range m[1:] {
			n, _ := strconv.ParseInt(string(g), 10, 64)
			r.errors += n
		}
	}
	return r, nil
}

func fetchProfile(ctx context.Context, debugURL string, d time.Duration, path string) error {
	secs := max(1, int(d.Seconds()))
	req, _ := http.NewRequestWithContext(ctx, "GET", fmt.Sprintf("%s/debug/pprof/profile?seconds=%d", debugURL, secs), nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("fetch profile: %w", err)
	}
	defer resp.Body.Close()
	var buf bytes.Buffer
	if _, err := io.Copy(&buf, resp.Body); err != nil {
		return fmt.Errorf("read profile: %w", err)
	}
	return os.WriteFile(path, buf.Bytes(), 0o644)
}

// --- churn ---

type churnResult struct {
	rps           float64
	errors        int64
	p50, p99, max time.Duration
	samples       int
}

// runChurn fills the table to churnRoutes, then while wrk drives traffic to
// a stable host, replaces routes at churnRate changes a second (half puts
// of new hosts, half deletes of old ones) and probes a sample of the new
// hosts until the router serves them.
func runChurn(ctx context.Context, o options, cli *clientv3.Client, keys bbs.Keys, bh string, bport uint32, routerAddr, metricsURL string) (churnResult, error) {
	var res churnResult
	have, err := routerRoutes(ctx, metricsURL)
	if err != nil {
		return res, err
	}
	if extra := o.churnRoutes - have; extra > 0 {
		start := time.Now()
		if err := putRoutes(ctx, cli, keys, "churn", 0, extra-1, bh, bport); err != nil {
			return res, err
		}
		if err := waitRoutes(ctx, metricsURL, o.churnRoutes); err != nil {
			return res, err
		}
		fmt.Printf("churn: loaded %d routes in %s\n", extra, time.Since(start).Round(time.Millisecond))
	}
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()

	var probeErrors atomic.Int64
	var mu sync.Mutex
	var lat []time.Duration
	probeClient := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 32}}
	probe := func(host string, written time.Time) {
		for time.Since(written) < 5*time.Second && cctx.Err() == nil {
			req, _ := http.NewRequestWithContext(cctx, "GET", "http://"+routerAddr+"/", nil)
			req.Host = host
			resp, err := probeClient.Do(req)
			if err != nil {
				if cctx.Err() == nil {
					probeErrors.Add(1)
				}
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			switch resp.StatusCode {
			case 200:
				mu.Lock()
				lat = append(lat, time.Since(written))
				mu.Unlock()
				return
			case 404:
				time.Sleep(time.Millisecond)
			default:
				probeErrors.Add(1)
				return
			}
		}
		if cctx.Err() == nil {
			probeErrors.Add(1) // never routable within 5 s
		}
	}

	// Writer: every 10 ms one transaction of rate/100 changes.
	var writeErrors atomic.Int64
	var probes sync.WaitGroup
	writerDone := make(chan struct{})
	go func() {
		defer close(writerDone)
		perTick := max(2, o.churnRate/100)
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		next := o.churnRoutes // new hosts get fresh numbers
		oldest := 0           // deletes walk the churn hosts from the start
		n := 0
		for {
			select {
			case <-cctx.Done():
				return
			case <-tick.C:
			}
			var ops []clientv3.Op
			var newHosts []string
			for i := 0; i < perTick/2; i++ {
				host := fmt.Sprintf("churn-%d.apps.test", next)
				guid := fmt.Sprintf("churn-%d", next)
				ops = append(ops, clientv3.OpPut(keys.Route(host, "", guid, 0), string(routeValue(host, bh, bport, guid))))
				newHosts = append(newHosts, host)
				next++
				old := fmt.Sprintf("churn-%d.apps.test", oldest)
				ops = append(ops, clientv3.OpDelete(keys.Route(old, "", fmt.Sprintf("churn-%d", oldest), 0)))
				oldest++
			}
			written := time.Now()
			if _, err := cli.Txn(cctx).Then(ops...).Commit(); err != nil {
				if cctx.Err() == nil {
					writeErrors.Add(1)
				}
				continue
			}
			// Probe one new host in ten: enough samples, little load.
			for _, h := range newHosts {
				n++
				if n%10 == 0 {
					probes.Add(1)
					go func(h string) { defer probes.Done(); probe(h, written) }(h)
				}
			}
		}
	}()

	r, err := runWrk(ctx, options{wrkCPU: o.wrkCPU, benchHost: o.benchHost}, routerAddr, 64, o.churnFor)
	cancel()
	<-writerDone
	probes.Wait()
	if err != nil {
		return res, err
	}
	res.rps = r.rps
	res.errors = r.errors + probeErrors.Load() + writeErrors.Load()
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	res.samples = len(lat)
	if len(lat) > 0 {
		res.p50 = lat[len(lat)/2]
		res.p99 = lat[min(len(lat)-1, len(lat)*99/100)]
		res.max = lat[len(lat)-1]
	}
	return res, nil
}
