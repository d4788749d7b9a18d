//go:build integration

package integration

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/proto"

	"github.com/basinpaas/basin/bbs"
	"github.com/basinpaas/basin/bbs/embeddedetcd"
	"github.com/basinpaas/basin/cell"
	"github.com/basinpaas/basin/cell/containerdproc"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"github.com/basinpaas/basin/stack"
)

// TestMain removes what the cell tests share once they are done.
func TestMain(m *testing.M) {
	code := m.Run()
	if repEtcdDir != "" {
		if e, err := repEtcd(); err == nil {
			e.Close()
		}
		os.RemoveAll(repEtcdDir)
	}
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// repEtcd is one embedded etcd for the cell tests; each test has its prefix.
// TestMain closes it and removes repEtcdDir.
var (
	repEtcdDir string
	repEtcd    = sync.OnceValues(func() (*embeddedetcd.Etcd, error) {
		dir, err := os.MkdirTemp("", "basin-cell-etcd-")
		if err != nil {
			return nil, err
		}
		repEtcdDir = dir
		return embeddedetcd.Start(context.Background(), embeddedetcd.Config{Dir: dir})
	})
)

// cellBinary builds cmd/cell once per test run.
func cellBinary(t *testing.T) string {
	t.Helper()
	return command(t, "cell")
}

// repEnv is etcd, a real BBS server in this process, and a BBS client.
type repEnv struct {
	t      *testing.T
	ctx    context.Context
	etcd   *clientv3.Client
	etcdEP string
	keys   bbs.Keys
	prefix string
	bbs    *bbs.Client
	bbsURL string
}

func newRepEnv(t *testing.T, ctx context.Context) *repEnv {
	t.Helper()
	e, err := repEtcd()
	if err != nil {
		t.Fatalf("embedded etcd: %v", err)
	}
	cli, err := e.Client()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	prefix := fmt.Sprintf("/cell-test/%s-%d/", t.Name(), time.Now().UnixNano())
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv, err := bbs.NewServer(cli, bbs.Config{Listener: lis, Store: bbs.StoreConfig{Prefix: prefix}})
	if err != nil {
		t.Fatal(err)
	}
	sctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(sctx) }()
	t.Cleanup(func() { stop(); <-done })
	bc, err := bbs.Dial(bbs.ClientConfig{Address: srv.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bc.Close() })
	if err := bc.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	return &repEnv{t: t, ctx: ctx, etcd: cli, etcdEP: e.Endpoint(), keys: bbs.NewKeys(prefix), prefix: prefix, bbs: bc, bbsURL: srv.Addr()}
}

func (env *repEnv) desireApp(guid, start string, hc *basinv1.HealthCheck, files map[string]string) {
	env.t.Helper()
	d := droplet(env.t, files)
	_, err := env.bbs.DesireLRP(env.ctx, &basinv1.DesireLRPRequest{
		Schedule: &basinv1.DesiredLRPSchedule{ProcessGuid: guid, Instances: 1, Stack: "tiny",
			Resources: &basinv1.ResourceLimits{MemoryMb: 64, DiskMb: 64, Pids: 64},
			Routes:    []*basinv1.Route{{Host: guid + ".apps.example.com"}}},
		Run: &basinv1.DesiredLRPRun{StartCommand: start, Ports: []uint32{8080}, HealthCheck: hc, AppName: guid,
			Droplet: &basinv1.DropletRef{Digest: d.Digest, Url: "file://" + d.Path}},
	})
	if err != nil {
		env.t.Fatalf("desire %s: %v", guid, err)
	}
}

func (env *repEnv) waitActual(guid string, want basinv1.ActualLRPState, within time.Duration) *basinv1.ActualLRP {
	env.t.Helper()
	deadline := time.Now().Add(within)
	var last *basinv1.ActualLRP
	for time.Now().Before(deadline) {
		resp, err := env.bbs.GetActualLRP(env.ctx, &basinv1.GetActualLRPRequest{ProcessGuid: guid})
		if err == nil {
			last = resp.GetActualLrp()
			if last.GetState() == want {
				return last
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	env.t.Fatalf("%s/0 not %v within %s; last %v", guid, want, within, last)
	return nil
}

// routeKV reads routes/<guid>.apps.example.com/<guid>/0.
func (env *repEnv) routeKV(guid string) (*basinv1.RouteEndpoint, int64) {
	env.t.Helper()
	resp, err := env.etcd.Get(env.ctx, env.keys.Route(guid+".apps.example.com", "", guid, 0))
	if err != nil {
		env.t.Fatal(err)
	}
	if len(resp.Kvs) == 0 {
		return nil, 0
	}
	ep := &basinv1.RouteEndpoint{}
	if err := proto.Unmarshal(resp.Kvs[0].Value, ep); err != nil {
		env.t.Fatal(err)
	}
	return ep, resp.Kvs[0].ModRevision
}

func cellClient(t *testing.T, addr string) basinv1.CellServiceClient {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return basinv1.NewCellServiceClient(conn)
}

func performOne(t *testing.T, ctx context.Context, c basinv1.CellServiceClient, guid string) {
	t.Helper()
	resp, err := c.Perform(ctx, &basinv1.PerformRequest{Lrps: []*basinv1.LRPStart{{
		Key: &basinv1.ActualLRPKey{ProcessGuid: guid}, Stack: "tiny", Resources: &basinv1.ResourceLimits{MemoryMb: 64, DiskMb: 64}}}})
	if err != nil || len(resp.GetRejectedLrps()) != 0 {
		t.Fatalf("Perform %s: %v %v", guid, resp, err)
	}
}

// getRetry GETs url until it answers (the app may not listen yet).
func getRetry(t *testing.T, url string, within time.Duration) (int, string) {
	t.Helper()
	deadline := time.Now().Add(within)
	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	var last error
	for time.Now().Before(deadline) {
		resp, err := hc.Get(url)
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			return resp.StatusCode, string(b)
		}
		last = err
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("GET %s: %v", url, last)
	return 0, ""
}

// TestCellRunsAndCrashesLRPs runs a whole cell in this process on a real
// containerd: an LRP placed by Perform serves HTTP through its mapped port,
// is RUNNING with net info and routed; an app that exits after three
// requests is CRASHED with its status and output, its route gone first; a
// memory hog is CRASHED as out of memory; a task returns its result file;
// Drain hands an instance to a second cell of the same process.
// (uid 2000, the environment, memory kills and the firewall are checked by
// the executor tests in executor_test.go.)
func TestCellRunsAndCrashesLRPs(t *testing.T) {
	cenv := startCell(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	env := newRepEnv(t, ctx)

	// Two cells in this process on one containerd, as basin dev up --cells
	// N runs them: each has its own id, state, bridge, subnet, ports.
	// Bound here, not picked and released: a released port can be taken by
	// any outgoing connection before the cell binds it.
	debugLis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	debugAddr := debugLis.Addr().String()
	a := runTestCell(t, cenv, env, "it-cell", 0, debugLis)
	b := runTestCell(t, cenv, env, "it-cell-b", 1, nil)
	rc := cellClient(t, a.Addr())
	rcB := cellClient(t, b.Addr())
	waitServing(t, ctx, a.Addr())
	waitServing(t, ctx, b.Addr())

	t.Run("serves", func(t *testing.T) {
		env.desireApp("it-web", "exec httpd -f -p $PORT -h /home/vcap/app",
			&basinv1.HealthCheck{Type: basinv1.HealthCheckType_HEALTH_CHECK_TYPE_HTTP, HttpEndpoint: "/index.html"},
			map[string]string{"app/index.html": "hello from a cell\n"})
		t0 := time.Now()
		performOne(t, ctx, rc, "it-web")
		a := env.waitActual("it-web", basinv1.ActualLRPState_ACTUAL_LRP_STATE_RUNNING, time.Minute)
		t.Logf("Perform → RUNNING in %s", time.Since(t0).Round(time.Millisecond))
		ni := a.GetNetInfo()
		if a.GetInstanceKey().GetCellId() != "it-cell" || ni.GetAddress() != "127.0.0.1" || len(ni.GetPorts()) != 1 ||
			ni.GetPorts()[0].GetContainerPort() != 8080 || ni.GetInstanceAddress() == "" {
			t.Fatalf("actual %v: want RUNNING on it-cell with 8080 mapped on 127.0.0.1", a)
		}
		hostPort := ni.GetPorts()[0].GetHostPort()
		if code, body := get(t, fmt.Sprintf("http://127.0.0.1:%d/index.html", hostPort)); code != 200 || body != "hello from a cell\n" {
			t.Errorf("GET through the mapped port = %d %q", code, body)
		}
		var ep *basinv1.RouteEndpoint
		for deadline := time.Now().Add(10 * time.Second); ep == nil && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
			ep, _ = env.routeKV("it-web")
		}
		if ep == nil || ep.GetAddress() != "127.0.0.1" || ep.GetPort() != hostPort || ep.GetInstanceGuid() != a.GetInstanceKey().GetInstanceGuid() {
			t.Errorf("route %v: want 127.0.0.1:%d for instance %s", ep, hostPort, a.GetInstanceKey().GetInstanceGuid())
		}
		st, err := rc.State(ctx, &basinv1.StateRequest{})
		if err != nil || len(st.GetLrps()) != 1 || st.GetAvailable().GetMemoryMb() != 1024-64 || st.GetPresence().GetCellId() != "it-cell" {
			t.Errorf("State = %v, %v", st, err)
		}
		// Recent logs carry the cell's events and the app's lines, tagged.
		ls, err := rc.Logs(ctx, &basinv1.LogsRequest{ProcessGuid: "it-web"})
		if err != nil {
			t.Fatal(err)
		}
		var sawCreating, sawHealthy bool
		for {
			m, err := ls.Recv()
			if err != nil {
				break
			}
			l := m.GetLine()
			if l.GetProcessGuid() != "it-web" || l.GetTimeUnixNano() == 0 || l.GetInstanceGuid() != a.GetInstanceKey().GetInstanceGuid() {
				t.Errorf("log line %v not tagged with the app, instance and time", l)
			}
			sawCreating = sawCreating || (l.GetSource() == "CELL" && strings.Contains(l.GetText(), "Creating"))
			sawHealthy = sawHealthy || (l.GetSource() == "CELL" && strings.Contains(l.GetText(), "healthy"))
		}
		if !sawCreating || !sawHealthy {
			t.Errorf("logs lack the cell's creating/healthy events")
		}
	})

	t.Run("crash", func(t *testing.T) {
		// httpd serves a CGI that counts requests; after the third the
		// shell (the container's first process) exits with status 7.
		cgi := `#!/bin/sh
n=$(( $(cat /home/vcap/tmp/n 2>/dev/null || echo 0) + 1 ))
echo $n > /home/vcap/tmp/n
printf 'Content-Type: text/plain\r\n\r\nrequest %s\n' "$n"
if [ "$n" -ge 3 ]; then (sleep 0.2; touch /home/vcap/tmp/done) >/dev/null 2>&1 & fi
`
		start := `httpd -f -p $PORT -h /home/vcap/app & while [ ! -f /home/vcap/tmp/done ]; do sleep 0.05; done; echo "served 3 requests, giving up" >&2; exit 7`
		env.desireApp("it-crash", start, &basinv1.HealthCheck{Type: basinv1.HealthCheckType_HEALTH_CHECK_TYPE_PROCESS},
			map[string]string{"app/cgi-bin/count": cgi})
		performOne(t, ctx, rc, "it-crash")
		a := env.waitActual("it-crash", basinv1.ActualLRPState_ACTUAL_LRP_STATE_RUNNING, time.Minute)
		var routeRev int64
		for deadline := time.Now().Add(10 * time.Second); routeRev == 0 && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
			_, routeRev = env.routeKV("it-crash")
		}
		if routeRev == 0 {
			t.Fatal("no route for the running instance")
		}
		url := fmt.Sprintf("http://127.0.0.1:%d/cgi-bin/count", a.GetNetInfo().GetPorts()[0].GetHostPort())
		for i := 1; i <= 3; i++ {
			if code, body := getRetry(t, url, 10*time.Second); code != 200 || body != fmt.Sprintf("request %d\n", i) {
				t.Fatalf("request %d = %d %q", i, code, body)
			}
		}
		crashed := env.waitActual("it-crash", basinv1.ActualLRPState_ACTUAL_LRP_STATE_CRASHED, 30*time.Second)
		t.Logf("crash reason: %q", crashed.GetCrashReason())
		if !strings.Contains(crashed.GetCrashReason(), "status 7") || !strings.Contains(crashed.GetCrashReason(), "served 3 requests, giving up") {
			t.Errorf("crash reason %q: want the exit status and the app's last output", crashed.GetCrashReason())
		}
		wr := <-env.etcd.Watch(ctx, env.keys.Route("it-crash.apps.example.com", "", "it-crash", 0), clientv3.WithRev(routeRev+1))
		if len(wr.Events) == 0 || wr.Events[0].Type != clientv3.EventTypeDelete {
			t.Fatalf("route not deleted: %+v", wr)
		}
		del := wr.Events[0].Kv.ModRevision
		t.Logf("route deleted at revision %d, CRASHED written at %d", del, crashed.GetRevision())
		if del >= crashed.GetRevision() {
			t.Errorf("route deleted at revision %d, not before CRASHED at %d", del, crashed.GetRevision())
		}
		assertGone(t, cenv.client, a.GetInstanceKey().GetInstanceGuid())
	})

	t.Run("oom", func(t *testing.T) {
		env.desireApp("it-hog", "echo allocating; head -c 536870912 /dev/zero | tail -n 1 > /dev/null",
			&basinv1.HealthCheck{Type: basinv1.HealthCheckType_HEALTH_CHECK_TYPE_PROCESS}, map[string]string{"app/README": "hog\n"})
		performOne(t, ctx, rc, "it-hog")
		crashed := env.waitActual("it-hog", basinv1.ActualLRPState_ACTUAL_LRP_STATE_CRASHED, time.Minute)
		t.Logf("crash reason: %q", crashed.GetCrashReason())
		if !strings.Contains(crashed.GetCrashReason(), "out of memory") || !strings.Contains(crashed.GetCrashReason(), "allocating") {
			t.Errorf("crash reason %q: want the memory kill and the app's output", crashed.GetCrashReason())
		}
	})

	t.Run("task", func(t *testing.T) {
		if _, err := env.bbs.DesireTask(ctx, &basinv1.DesireTaskRequest{TaskGuid: "it-task", Definition: &basinv1.TaskDefinition{
			Stack: "tiny", Command: "echo computing; echo 42 > /home/vcap/tmp/answer", ResultFile: "/home/vcap/tmp/answer",
			Resources: &basinv1.ResourceLimits{MemoryMb: 32, DiskMb: 32, Pids: 16}}}); err != nil {
			t.Fatal(err)
		}
		resp, err := rc.Perform(ctx, &basinv1.PerformRequest{Tasks: []*basinv1.TaskStart{{TaskGuid: "it-task", Stack: "tiny",
			Resources: &basinv1.ResourceLimits{MemoryMb: 32, DiskMb: 32}}}})
		if err != nil || len(resp.GetRejectedTasks()) != 0 {
			t.Fatalf("Perform task: %v %v", resp, err)
		}
		var task *basinv1.Task
		for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			r, err := env.bbs.GetTask(ctx, &basinv1.GetTaskRequest{TaskGuid: "it-task"})
			if task = r.GetTask(); err == nil && task.GetState() == basinv1.TaskState_TASK_STATE_COMPLETED {
				break
			}
		}
		if task.GetState() != basinv1.TaskState_TASK_STATE_COMPLETED || task.GetFailed() || task.GetResult() != "42\n" || task.GetCellId() != "it-cell" {
			t.Errorf("task %v: want COMPLETED on it-cell with result \"42\\n\"", task)
		}
	})

	t.Run("metrics", func(t *testing.T) {
		code, body := get(t, "http://"+debugAddr+"/metrics")
		if code != 200 || !strings.Contains(body, "basin_rep_lrp_starts_total 3") || !strings.Contains(body, "basin_rep_lrp_crashes_total 2") ||
			!strings.Contains(body, "basin_rep_droplet_fetches_total") {
			t.Errorf("metrics (%d) lack the rep's starts, crashes or droplet fetches:\n%s", code, body)
		}
	})

	t.Run("evacuate", func(t *testing.T) {
		before := env.waitActual("it-web", basinv1.ActualLRPState_ACTUAL_LRP_STATE_RUNNING, time.Second)
		oldURL := fmt.Sprintf("http://127.0.0.1:%d/index.html", before.GetNetInfo().GetPorts()[0].GetHostPort())
		drained := make(chan error, 1)
		go func() {
			_, err := rc.Drain(ctx, &basinv1.DrainRequest{TimeoutMs: 60000})
			drained <- err
		}()
		env.waitActual("it-web", basinv1.ActualLRPState_ACTUAL_LRP_STATE_UNCLAIMED, 10*time.Second)
		// Unclaimed but still serving, until a replacement runs.
		if code, _ := get(t, oldURL); code != 200 {
			t.Errorf("evacuating instance answered %d before its replacement ran", code)
		}
		if resp, err := rc.Perform(ctx, &basinv1.PerformRequest{Lrps: []*basinv1.LRPStart{{Key: before.GetKey(), Stack: "tiny",
			Resources: &basinv1.ResourceLimits{MemoryMb: 64, DiskMb: 64}}}}); err != nil || len(resp.GetRejectedLrps()) != 1 {
			t.Errorf("an evacuating cell accepted work: %v %v", resp, err)
		}
		t0 := time.Now()
		performOne(t, ctx, rcB, "it-web")
		select {
		case err := <-drained:
			if err != nil {
				t.Fatalf("Drain: %v", err)
			}
		case <-time.After(60 * time.Second):
			t.Fatal("Drain did not return")
		}
		t.Logf("replacement placed and evacuated instance stopped in %s", time.Since(t0).Round(time.Millisecond))
		after := env.waitActual("it-web", basinv1.ActualLRPState_ACTUAL_LRP_STATE_RUNNING, time.Second)
		if after.GetInstanceKey().GetCellId() != "it-cell-b" {
			t.Fatalf("after evacuation %v: want RUNNING on it-cell-b", after)
		}
		assertGone(t, cenv.client, before.GetInstanceKey().GetInstanceGuid())
		newURL := fmt.Sprintf("http://127.0.0.1:%d/index.html", after.GetNetInfo().GetPorts()[0].GetHostPort())
		if code, body := get(t, newURL); code != 200 || body != "hello from a cell\n" {
			t.Errorf("replacement GET = %d %q", code, body)
		}
		if ep, _ := env.routeKV("it-web"); ep.GetInstanceGuid() != after.GetInstanceKey().GetInstanceGuid() {
			t.Errorf("route %v: want the replacement's", ep)
		}
		if st, err := rc.State(ctx, &basinv1.StateRequest{}); err != nil || !st.GetPresence().GetEvacuating() || len(st.GetLrps()) != 0 {
			t.Errorf("drained cell state %v %v", st, err)
		}
	})

	// Retire what is left: the cell stops it through its index watch.
	if _, err := env.bbs.RemoveDesiredLRP(ctx, &basinv1.RemoveDesiredLRPRequest{ProcessGuid: "it-web"}); err != nil {
		t.Fatal(err)
	}
	waitNoContainers(t, ctx, cenv.client, 30*time.Second)
}

// runTestCell runs cell n of this process on the shared containerd until
// the test ends.
func runTestCell(t *testing.T, cenv *cellEnv, env *repEnv, id string, n int, debug net.Listener) *cell.Cell {
	t.Helper()
	state, err := containerdproc.ShortDir("bcell")
	if err != nil {
		t.Fatal(err)
	}
	bridge := fmt.Sprintf("basincell%d", 2*n)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c, err := cell.New(cell.Config{
		ID: id, Zone: "z1", Capacity: &basinv1.CellCapacity{MemoryMb: 1024, DiskMb: 4096, Containers: 10},
		Listener: lis, DebugListener: debug, Containerd: cenv.client, Etcd: env.etcd, BBSClient: env.bbs, Prefix: env.prefix,
		LauncherPath: cenv.launcher, StateDir: state,
		NetworkName: bridge, BridgeName: bridge, Subnet: fmt.Sprintf("10.%d.0.0/24", 221+2*n),
		FirewallChain: fmt.Sprintf("BASIN-CELLTEST%d", 2*n),
		HostPortLow:   62200 + 200*n, HostPortHigh: 62299 + 200*n, StopGrace: 2 * time.Second,
		Logger: slog.New(slog.NewTextHandler(testLog{t}, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	runErr := make(chan error, 1)
	go func() { runErr <- c.Run(ctx) }()
	t.Cleanup(func() {
		stop()
		if err := <-runErr; err != nil {
			t.Errorf("cell %s Run: %v", id, err)
		}
		exec.Command("ip", "link", "del", bridge).Run()
		os.RemoveAll(state)
	})
	return c
}

func waitServing(t *testing.T, ctx context.Context, addr string) {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	hc := healthpb.NewHealthClient(conn)
	for {
		resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: basinv1.CellService_ServiceDesc.ServiceName})
		if err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("cell at %s not serving: %v", addr, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func waitNoContainers(t *testing.T, ctx context.Context, c *client.Client, within time.Duration) {
	t.Helper()
	nctx := namespaces.WithNamespace(ctx, stack.Namespace)
	deadline := time.Now().Add(within)
	for {
		cs, err := c.Containers(nctx)
		if err == nil && len(cs) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d containers left after %s (%v)", len(cs), within, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// cellProc is cmd/cell running as a child process.
type cellProc struct {
	cmd    *exec.Cmd
	exited chan error
}

func startCellProc(t *testing.T, bin string, args []string) *cellProc {
	t.Helper()
	cmd := exec.Command(bin, args...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &cellProc{cmd: cmd, exited: make(chan error, 1)}
	logged := make(chan struct{})
	go func() {
		defer close(logged)
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			t.Logf("cell[%d]: %s", cmd.Process.Pid, sc.Text())
		}
	}()
	go func() {
		<-logged
		p.exited <- cmd.Wait()
	}()
	t.Cleanup(func() {
		select {
		case <-p.exited:
		default:
			cmd.Process.Kill()
			<-p.exited
		}
	})
	return p
}

func (p *cellProc) signalAndWait(t *testing.T, sig syscall.Signal, within time.Duration) error {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-p.exited:
		p.exited <- err // for Cleanup
		return err
	case <-time.After(within):
		t.Fatalf("cell %d did not exit within %s of %v", p.cmd.Process.Pid, within, sig)
		return nil
	}
}

// TestCellProcessRestartsAndDies runs cmd/cell as a child process with its
// own containerd: restarted (SIGINT, then a new process) it adopts its
// running instance without restarting it; killed with SIGKILL its presence
// and routes vanish from etcd within the lease TTL.
func TestCellProcessRestartsAndDies(t *testing.T) {
	needCell(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	env := newRepEnv(t, ctx)
	bin := cellBinary(t)
	launcher := command(t, "basin-launcher")
	state, err := containerdproc.ShortDir("bcellp")
	if err != nil {
		t.Fatal(err)
	}
	const bridge, chain, subnet = "basincell1", "BASIN-CELLTEST1", "10.222.0.0/24"
	t.Cleanup(func() { cleanupCellProc(t, state, bridge, subnet, chain) })
	listen := freeLoopbackAddr(t)
	args := []string{"--id", "it-proc-cell", "--listen", listen, "--bbs", env.bbsURL, "--etcd", env.etcdEP,
		"--prefix", env.prefix, "--launcher", launcher, "--state-dir", state, "--bridge", bridge, "--network", bridge,
		"--subnet", subnet, "--firewall-chain", chain, "--host-ports", "62300-62399", "--lease-ttl", "3s",
		"--stop-grace", "2s", "--evacuation-timeout", "2s", "--memory-mb", "512"}
	rc := cellClient(t, listen)

	t0 := time.Now()
	first := startCellProc(t, bin, args)
	waitServing(t, ctx, listen)
	t.Logf("cell process up in %s (own containerd, tiny stack)", time.Since(t0).Round(time.Millisecond))
	env.desireApp("it-proc", "cat /proc/sys/kernel/random/uuid > /home/vcap/app/boot.txt; exec httpd -f -p $PORT -h /home/vcap/app",
		&basinv1.HealthCheck{Type: basinv1.HealthCheckType_HEALTH_CHECK_TYPE_HTTP, HttpEndpoint: "/boot.txt"},
		map[string]string{"app/README": "restart me\n"})
	performOne(t, ctx, rc, "it-proc")
	before := env.waitActual("it-proc", basinv1.ActualLRPState_ACTUAL_LRP_STATE_RUNNING, time.Minute)
	url := fmt.Sprintf("http://127.0.0.1:%d/boot.txt", before.GetNetInfo().GetPorts()[0].GetHostPort())
	_, boot := get(t, url)
	pid := instancePID(t, ctx, state, before.GetInstanceKey().GetInstanceGuid())

	// Restart: SIGINT leaves the containers running; the next process
	// adopts them.
	if err := first.signalAndWait(t, syscall.SIGINT, 30*time.Second); err != nil {
		t.Fatalf("cell exited on SIGINT with %v", err)
	}
	t0 = time.Now()
	second := startCellProc(t, bin, args)
	waitServing(t, ctx, listen)
	t.Logf("RESULT cell_restart_ms %d", time.Since(t0).Milliseconds())
	after := env.waitActual("it-proc", basinv1.ActualLRPState_ACTUAL_LRP_STATE_RUNNING, time.Second)
	if after.GetRevision() != before.GetRevision() || !proto.Equal(after.GetInstanceKey(), before.GetInstanceKey()) {
		t.Errorf("actual LRP changed across the restart:\nbefore %v\nafter  %v", before, after)
	}
	if code, body := get(t, url); code != 200 || body != boot {
		t.Errorf("after restart GET = %d %q, want 200 %q (the same process)", code, body, boot)
	}
	if p := instancePID(t, ctx, state, before.GetInstanceKey().GetInstanceGuid()); p != pid {
		t.Errorf("container pid %d after restart, %d before", p, pid)
	}
	var ep *basinv1.RouteEndpoint
	for deadline := time.Now().Add(5 * time.Second); ep == nil && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		ep, _ = env.routeKV("it-proc")
	}
	if ep.GetInstanceGuid() != before.GetInstanceKey().GetInstanceGuid() {
		t.Errorf("route after restart %v", ep)
	}
	// The route's lease is the new process's: it outlives the old lease.
	time.Sleep(3500 * time.Millisecond)
	if ep, _ := env.routeKV("it-proc"); ep == nil {
		t.Error("route vanished with the previous process's lease")
	}

	// SIGKILL: presence and routes go with the lease.
	presence := env.keys.Cell("it-proc-cell")
	route := env.keys.Route("it-proc.apps.example.com", "", "it-proc", 0)
	if err := second.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	var presenceGone, routeGone time.Duration
	for presenceGone == 0 || routeGone == 0 {
		if time.Since(killed) > 10*time.Second {
			t.Fatalf("presence or route still there 10s after SIGKILL")
		}
		for key, gone := range map[string]*time.Duration{presence: &presenceGone, route: &routeGone} {
			if *gone != 0 {
				continue
			}
			resp, err := env.etcd.Get(ctx, key, clientv3.WithCountOnly())
			if err == nil && resp.Count == 0 {
				*gone = time.Since(killed)
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("after SIGKILL: presence gone in %s, route in %s (lease TTL 3s)", presenceGone.Round(time.Millisecond), routeGone.Round(time.Millisecond))
	t.Logf("RESULT cell_sigkill_presence_gone_ms %d", presenceGone.Milliseconds())
	t.Logf("RESULT cell_sigkill_route_gone_ms %d", routeGone.Milliseconds())
	// Keepalives refresh the TTL every second and etcd checks expiry every
	// 500 ms: the keys go 2 to 3.5 s after the kill.
	if presenceGone > 4500*time.Millisecond || routeGone > 4500*time.Millisecond {
		t.Errorf("presence/route outlived the 3s lease TTL by more than etcd's expiry check")
	}

	// A third process adopts the instance again (no converger moved it);
	// removing the LRP stops it; SIGTERM evacuates an empty cell and exits.
	third := startCellProc(t, bin, args)
	waitServing(t, ctx, listen)
	if code, body := get(t, url); code != 200 || body != boot {
		t.Errorf("after SIGKILL and restart GET = %d %q, want the same process", code, body)
	}
	if _, err := env.bbs.RemoveDesiredLRP(ctx, &basinv1.RemoveDesiredLRPRequest{ProcessGuid: "it-proc"}); err != nil {
		t.Fatal(err)
	}
	cd, err := client.New(filepath.Join(state, "containerd", "containerd.sock"))
	if err != nil {
		t.Fatal(err)
	}
	waitNoContainers(t, ctx, cd, 30*time.Second)
	cd.Close()
	if out, err := exec.CommandContext(ctx, bin, "drain", "--rep", listen, "--timeout", "2s").CombinedOutput(); err != nil || !strings.Contains(string(out), "drained") {
		t.Errorf("cell drain: %v: %s", err, out)
	}
	if st, err := rc.State(ctx, &basinv1.StateRequest{}); err != nil || !st.GetPresence().GetEvacuating() {
		t.Errorf("State after cell drain = %v, %v; want evacuating", st, err)
	}
	if err := third.signalAndWait(t, syscall.SIGTERM, 30*time.Second); err != nil {
		t.Errorf("cell exited on SIGTERM with %v", err)
	}
}

// instancePID asks the cell's own containerd for the instance's host pid.
func instancePID(t *testing.T, ctx context.Context, state, guid string) uint32 {
	t.Helper()
	c, err := client.New(filepath.Join(state, "containerd", "containerd.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	nctx := namespaces.WithNamespace(ctx, stack.Namespace)
	ctr, err := c.LoadContainer(nctx, guid)
	if err != nil {
		t.Fatalf("load container %s: %v", guid, err)
	}
	task, err := ctr.Task(nctx, nil)
	if err != nil {
		t.Fatalf("task of %s: %v", guid, err)
	}
	return task.Pid()
}

// cleanupCellState kills and deletes every container a cell process left
// on its own containerd (only after a failure: the test removes its app).
// cleanupCellProc removes whatever a cell process run left: containers
// (through a containerd on the cell's state), the bridge, the firewall
// chain, the state.
func cleanupCellProc(t *testing.T, state, bridge, subnet, chain string) {
	cleanupCellState(t, state)
	exec.Command("ip", "link", "del", bridge).Run()
	for exec.Command("iptables", "-w", "5", "-D", "INPUT", "-s", subnet, "-j", chain).Run() == nil {
	}
	exec.Command("iptables", "-w", "5", "-F", chain).Run()
	exec.Command("iptables", "-w", "5", "-X", chain).Run()
	os.RemoveAll(state)
}

func cleanupCellState(t *testing.T, state string) {
	dir := filepath.Join(state, "containerd")
	if _, err := os.Stat(filepath.Join(dir, "config.toml")); err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	d, err := containerdproc.Start(ctx, containerdproc.Config{Dir: dir})
	if err != nil {
		t.Logf("cleanup: start containerd: %v", err)
		return
	}
	defer func() { cancel(); <-d.Stopped() }()
	c, err := client.New(d.Address())
	if err != nil {
		return
	}
	defer c.Close()
	nctx := namespaces.WithNamespace(ctx, stack.Namespace)
	cs, _ := c.Containers(nctx)
	for _, ctr := range cs {
		labels, _ := ctr.Labels(nctx)
		if task, err := ctr.Task(nctx, nil); err == nil {
			task.Delete(nctx, client.WithProcessKill)
		}
		ctr.Delete(nctx, client.WithSnapshotCleanup)
		// What the executor's teardown would have undone: the port
		// mapping's iptables rules and the pinned network namespace.
		removeCNIRules(t, ctr.ID())
		if ns := labels["basin.io/netns"]; ns != "" {
			exec.Command("umount", ns).Run()
			os.Remove(ns)
		}
		t.Logf("cleanup: removed leftover container %s", ctr.ID())
	}
}

// removeCNIRules deletes the nat rules CNI's portmap and bridge plugins
// wrote for a container whose teardown never ran (a SIGKILLed cell): a
// leftover DNAT would take a later test's traffic to a reused host port.
func removeCNIRules(t *testing.T, containerID string) {
	for _, chain := range []string{"CNI-HOSTPORT-DNAT", "POSTROUTING"} {
		out, err := exec.Command("iptables", "-w", "5", "-t", "nat", "-S", chain).Output()
		if err != nil {
			continue
		}
		for _, rule := range strings.Split(string(out), "\n") {
			if !strings.HasPrefix(rule, "-A ") || !strings.Contains(rule, `id: \"`+containerID+`\"`) {
				continue
			}
			i := strings.Index(rule, "-j CNI-")
			if i < 0 {
				continue
			}
			target := strings.Fields(rule[i+3:])[0]
			// The comment holds quotes: let a shell split the rule as iptables -S printed it.
			del := "iptables -w 5 -t nat -D " + strings.TrimPrefix(rule, "-A ")
			if out, err := exec.Command("sh", "-c", del).CombinedOutput(); err != nil {
				t.Logf("cleanup: %s: %v %s", del, err, out)
				continue
			}
			exec.Command("iptables", "-w", "5", "-t", "nat", "-F", target).Run()
			exec.Command("iptables", "-w", "5", "-t", "nat", "-X", target).Run()
		}
	}
}
