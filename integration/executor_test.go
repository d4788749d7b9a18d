//go:build integration

package integration

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"

	"github.com/basinpaas/basin/cell/containerdproc"
	"github.com/basinpaas/basin/cell/executor"
	"github.com/basinpaas/basin/stack"
)

// cellEnv is a real containerd (started here), the tiny stack imported into
// it and a built basin-launcher: what an executor needs on this machine.
type cellEnv struct {
	client   *client.Client
	launcher string
	stackDir string
}

// needCell skips, saying why, when this machine cannot run containers.
func needCell(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("running containers needs root")
	}
	if err := containerdproc.Binaries(); err != nil {
		t.Skipf("containerd binaries not installed: %v", err)
	}
	for _, p := range []string{"/bin/busybox", "/usr/lib/cni/bridge", "/usr/lib/cni/portmap", "/usr/lib/cni/host-local", "/usr/lib/cni/loopback"} {
		if _, err := os.Stat(p); err != nil {
			t.Skipf("%s missing (run scripts/setup.sh as root)", p)
		}
	}
	if _, err := exec.LookPath("iptables"); err != nil {
		t.Skip("iptables missing (run scripts/setup.sh as root)")
	}
}

func startCell(t *testing.T) *cellEnv {
	t.Helper()
	needCell(t)
	ctx, cancel := context.WithCancel(context.Background())
	dir, err := containerdproc.ShortDir("basin-it")
	if err != nil {
		t.Fatal(err)
	}
	d, err := containerdproc.Start(ctx, containerdproc.Config{Dir: dir})
	if err != nil {
		cancel()
		os.RemoveAll(dir)
		t.Fatalf("start containerd: %v", err)
	}
	t.Cleanup(func() {
		cancel()
		<-d.Stopped()
		os.RemoveAll(dir)
	})
	c, err := client.New(d.Address())
	if err != nil {
		t.Fatalf("containerd client: %v", err)
	}
	t.Cleanup(func() { c.Close() })

	launcher := command(t, "basin-launcher")

	start := time.Now()
	rootfs, err := stack.BuildTiny(ctx, filepath.Join(t.TempDir(), "tiny"))
	if err != nil {
		t.Fatalf("build tiny stack: %v", err)
	}
	name, err := stack.Import(ctx, c, rootfs)
	if err != nil {
		t.Fatalf("import tiny stack: %v", err)
	}
	t.Logf("tiny stack %s built and imported in %s", name, time.Since(start).Round(time.Millisecond))
	return &cellEnv{client: c, launcher: launcher}
}

// droplet writes a droplet tar.gz (app/, profile.d/, staging_info.yml) and
// returns its path and digest.
func droplet(t *testing.T, files map[string]string) executor.Droplet {
	t.Helper()
	var raw bytes.Buffer
	zw := gzip.NewWriter(&raw)
	tw := tar.NewWriter(zw)
	for _, d := range []string{"app/", "deps/", "profile.d/", "tmp/", "logs/"} {
		tw.WriteHeader(&tar.Header{Name: d, Typeflag: tar.TypeDir, Mode: 0o755})
	}
	for name, body := range files {
		tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o755, Size: int64(len(body))})
		tw.Write([]byte(body))
	}
	tw.Close()
	zw.Close()
	sum := sha256.Sum256(raw.Bytes())
	p := filepath.Join(t.TempDir(), "droplet.tgz")
	if err := os.WriteFile(p, raw.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return executor.Droplet{Digest: "sha256:" + hex.EncodeToString(sum[:]), Path: p}
}

// listen accepts and closes connections on a host port until the test ends.
func listen(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	return l.Addr().(*net.TCPAddr).Port
}

type testExecutor struct {
	*executor.Executor
	events chan executor.Event
}

func startExecutor(t *testing.T, env *cellEnv, protected []int) *testExecutor {
	t.Helper()
	state, err := os.MkdirTemp("", "basin-exec")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		exec.Command("ip", "link", "del", testBridge).Run()
		os.RemoveAll(state)
	})
	e, stop := runExecutor(t, env, state, protected)
	t.Cleanup(stop)
	return e
}

const testBridge = "basintest0"

// runExecutor runs an executor on state until stop is called; containers
// outlive it, as they outlive a cell process.
func runExecutor(t *testing.T, env *cellEnv, state string, protected []int) (*testExecutor, func()) {
	t.Helper()
	events := make(chan executor.Event, 64)
	e, err := executor.New(executor.Config{
		Client:         env.client,
		LauncherPath:   env.launcher,
		Logger:         slog.New(slog.NewTextHandler(testLog{t}, nil)),
		OnEvent:        func(ev executor.Event) { events <- ev },
		StateDir:       state,
		NetworkName:    "basintest",
		BridgeName:     testBridge,
		Subnet:         "10.219.0.0/24",
		HostPortLow:    62000,
		HostPortHigh:   62099,
		ProtectedPorts: protected,
		FirewallChain:  "BASIN-TEST-PROTECT",
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	runErr := make(chan error, 1)
	go func() { runErr <- e.Run(ctx) }()
	var stopped bool
	return &testExecutor{Executor: e, events: events}, func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-runErr; err != nil {
			t.Errorf("executor Run: %v", err)
		}
		if len(protected) > 0 && exec.Command("iptables", "-w", "5", "-n", "-L", "BASIN-TEST-PROTECT").Run() == nil {
			t.Errorf("firewall chain still installed after the executor stopped")
		}
	}
}

type testLog struct{ t *testing.T }

func (w testLog) Write(p []byte) (int, error) {
	w.t.Logf("%s", bytes.TrimSpace(p))
	return len(p), nil
}

func (e *testExecutor) nextEvent(t *testing.T, guid string, typ executor.EventType, within time.Duration) executor.Event {
	t.Helper()
	timeout := time.After(within)
	for {
		select {
		case ev := <-e.events:
			if ev.InstanceGUID == guid && ev.Type == typ {
				return ev
			}
			if ev.InstanceGUID == guid && ev.Type == executor.EventExited {
				t.Fatalf("%s exited while waiting for %s: %+v", guid, typ, ev.Exit)
			}
		case <-timeout:
			t.Fatalf("no %s event for %s within %s", typ, guid, within)
		}
	}
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestExecutorRunsAnAppInAContainer(t *testing.T) {
	env := startCell(t)
	protected, open := listen(t), listen(t)
	e := startExecutor(t, env, []int{protected})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	// The start command records who it runs as and whether it can reach a
	// protected and an unprotected host port through its gateway, then
	// serves the app directory.
	gw := "10.219.0.1"
	start := fmt.Sprintf(`echo "uid=$(id -u) gid=$(id -g) port=$PORT index=$CF_INSTANCE_INDEX greeting=$GREETING" > whoami.txt
if nc -w 2 %[1]s %[2]d </dev/null; then echo protected=open; else echo protected=closed; fi > probe.txt
if nc -w 2 %[1]s %[3]d </dev/null; then echo open=open; else echo open=closed; fi >> probe.txt
echo "serving on $PORT"
exec httpd -f -p $PORT -h /home/vcap/app`, gw, protected, open)
	d := droplet(t, map[string]string{
		"app/index.html":        "hello basin\n",
		"profile.d/greeting.sh": "export GREETING=from-profile\n",
		"staging_info.yml":      `{"detected_buildpack":"test","start_command":"true"}`,
	})
	spec := executor.Spec{
		InstanceGUID: "it-web-0", ProcessGUID: "it-web", Index: 3, Stack: "tiny",
		Droplet: d, StartCommand: start, MemoryMB: 64,
		HealthCheck: executor.HealthCheck{Type: executor.HealthHTTP, Path: "/index.html"},
	}
	t0 := time.Now()
	info, err := e.Start(ctx, spec)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	ev := e.nextEvent(t, spec.InstanceGUID, executor.EventHealthy, time.Minute)
	t.Logf("started and healthy in %s: %+v", time.Since(t0).Round(time.Millisecond), ev.Info)
	if len(info.Ports) != 1 || info.Ports[0].ContainerPort != 8080 || info.HostIP != "127.0.0.1" {
		t.Fatalf("ports %+v on %s: want 8080 mapped on 127.0.0.1", info.Ports, info.HostIP)
	}
	base := fmt.Sprintf("http://127.0.0.1:%d", info.Ports[0].HostPort)

	if code, body := get(t, base+"/index.html"); code != 200 || body != "hello basin\n" {
		t.Errorf("GET /index.html = %d %q, want 200 hello basin", code, body)
	}
	if _, body := get(t, base+"/whoami.txt"); !strings.Contains(body, "uid=2000 gid=2000 port=8080 index=3 greeting=from-profile") {
		t.Errorf("whoami.txt = %q: want uid 2000, PORT 8080, CF_INSTANCE_INDEX 3, profile.d sourced", body)
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", info.PID))
	if err != nil || !strings.Contains(string(status), "Uid:\t2000\t2000\t2000\t2000") || !strings.Contains(string(status), "CapEff:\t0000000000000000") || !strings.Contains(string(status), "NoNewPrivs:\t1") || !strings.Contains(string(status), "Seccomp:\t2") {
		t.Errorf("process %d status (uid 2000, no caps, no_new_privs, seccomp filter wanted):\n%s", info.PID, status)
	}
	if l, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", info.PID)); err != nil || !strings.Contains(string(l), "Max open files            16384                16384") {
		t.Errorf("process %d limits (want 16384 open files):\n%s", info.PID, l)
	}
	limits := []struct{ controller, file, want string }{
		{"memory", "memory.limit_in_bytes", strconv.Itoa(64 << 20)},
		{"cpu", "cpu.shares", "64"},
		{"pids", "pids.max", "1024"},
	}
	for _, l := range limits {
		if got, err := cgroupV1File(info.PID, l.controller, l.file); err != nil {
			t.Logf("cgroup v1 %s: %v (not checked)", l.file, err)
		} else if got != l.want {
			t.Errorf("%s = %s, want %s", l.file, got, l.want)
		}
	}
	if _, body := get(t, base+"/probe.txt"); body != "protected=closed\nopen=open\n" {
		t.Errorf("probe.txt = %q: want the protected port closed and the other open", body)
	}
	logs, err := e.Logs(spec.InstanceGUID)
	if err != nil {
		t.Fatal(err)
	}
	var sawApp, sawHealthy bool
	for _, l := range logs.Recent(100) {
		sawApp = sawApp || (l.Source == executor.SourceApp && l.Text == "serving on 8080")
		sawHealthy = sawHealthy || (l.Source == executor.SourceCell && strings.Contains(l.Text, "healthy"))
	}
	if !sawApp || !sawHealthy {
		t.Errorf("logs lack the app's line or the cell's healthy line: %+v", logs.Recent(100))
	}

	list, err := e.List(ctx)
	if err != nil || len(list) != 1 || list[0].InstanceGUID != spec.InstanceGUID || list[0].Index != 3 {
		t.Errorf("List = %+v, %v; want the one instance", list, err)
	}

	// A second instance of the same droplet reuses its layer.
	spec2 := spec
	spec2.InstanceGUID, spec2.Index = "it-web-1", 4
	if _, err := e.Start(ctx, spec2); err != nil {
		t.Fatalf("Start second: %v", err)
	}
	e.nextEvent(t, spec2.InstanceGUID, executor.EventHealthy, time.Minute)
	if n := e.DropletUnpacks(); n != 1 {
		t.Errorf("droplet unpacked %d times for two instances, want 1", n)
	}

	if removed, err := e.PruneDroplets(ctx, nil); err != nil || len(removed) != 0 {
		t.Errorf("PruneDroplets while instances run = %v, %v; want nothing removed", removed, err)
	}
	for _, s := range []executor.Spec{spec, spec2} {
		if err := e.Stop(ctx, s.InstanceGUID, 5*time.Second); err != nil {
			t.Fatalf("Stop %s: %v", s.InstanceGUID, err)
		}
		ev := e.nextEvent(t, s.InstanceGUID, executor.EventExited, 30*time.Second)
		if !ev.Exit.Stopped {
			t.Errorf("exit of %s %+v: want Stopped", s.InstanceGUID, ev.Exit)
		}
	}
	assertGone(t, env.client, spec.InstanceGUID)
	if c, err := net.DialTimeout("tcp", strings.TrimPrefix(base, "http://"), time.Second); err == nil {
		c.Close()
		t.Errorf("host port %s still answers after stop", base)
	}
	if list, err := e.List(ctx); err != nil || len(list) != 0 {
		t.Errorf("List after stop = %+v, %v; want none", list, err)
	}
	if removed, err := e.PruneDroplets(ctx, nil); err != nil || len(removed) != 1 || removed[0] != d.Digest {
		t.Errorf("PruneDroplets after stop = %v, %v; want [%s]", removed, err, d.Digest)
	}
}

func TestExecutorReportsOOMKill(t *testing.T) {
	env := startCell(t)
	e := startExecutor(t, env, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	d := droplet(t, map[string]string{"app/README": "memory hog\n"})
	spec := executor.Spec{
		InstanceGUID: "it-hog-0", ProcessGUID: "it-hog", Stack: "tiny", Droplet: d,
		// tail keeps its last line, which never ends: 512 MB in memory.
		StartCommand: "echo allocating; head -c 536870912 /dev/zero | tail -n 1 > /dev/null",
		MemoryMB:     32,
		HealthCheck:  executor.HealthCheck{Type: executor.HealthProcess},
	}
	if _, err := e.Start(ctx, spec); err != nil {
		t.Fatalf("Start: %v", err)
	}
	var ev executor.Event
	timeout := time.After(time.Minute)
	for ev.Type != executor.EventExited {
		select {
		case ev = <-e.events:
		case <-timeout:
			t.Fatal("the memory hog was not reported within a minute")
		}
	}
	t.Logf("exit: %s; last lines %+v", ev.Exit.Reason, ev.Exit.LastLines)
	if !ev.Exit.OOM || !strings.Contains(ev.Exit.Reason, "out of memory") || ev.Exit.Stopped {
		t.Errorf("exit %+v: want an OOM crash with its reason", ev.Exit)
	}
	var sawStart bool
	for _, l := range ev.Exit.LastLines {
		sawStart = sawStart || l.Text == "allocating"
	}
	if !sawStart {
		t.Errorf("last lines %+v lack the app's output", ev.Exit.LastLines)
	}
	assertGone(t, env.client, spec.InstanceGUID)
}

func assertGone(t *testing.T, c *client.Client, guid string) {
	t.Helper()
	ctx := namespaces.WithNamespace(context.Background(), stack.Namespace)
	if _, err := c.LoadContainer(ctx, guid); !errdefs.IsNotFound(err) {
		t.Errorf("container %s still exists (err %v)", guid, err)
	}
	if _, err := c.SnapshotService(stack.Snapshotter).Stat(ctx, guid); !errdefs.IsNotFound(err) {
		t.Errorf("snapshot %s still exists (err %v)", guid, err)
	}
}

func TestExecutorReportsCrash(t *testing.T) {
	env := startCell(t)
	e := startExecutor(t, env, nil)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	spec := executor.Spec{
		InstanceGUID: "it-crash-0", ProcessGUID: "it-crash", Stack: "tiny",
		Droplet:      droplet(t, map[string]string{"app/README": "crashes\n"}),
		StartCommand: "echo going down >&2; exit 3", MemoryMB: 32,
		HealthCheck: executor.HealthCheck{Type: executor.HealthProcess},
	}
	if _, err := e.Start(ctx, spec); err != nil {
		t.Fatalf("Start: %v", err)
	}
	var ev executor.Event
	for ev.Type != executor.EventExited {
		select {
		case ev = <-e.events:
		case <-ctx.Done():
			t.Fatal("no exit reported")
		}
	}
	if ev.Exit.Status != 3 || ev.Exit.OOM || ev.Exit.Stopped || ev.Exit.Reason != "app exited with status 3" {
		t.Errorf("exit %+v: want a crash with status 3", ev.Exit)
	}
	var saw bool
	for _, l := range ev.Exit.LastLines {
		saw = saw || (l.Stream == "stderr" && l.Text == "going down")
	}
	if !saw {
		t.Errorf("last lines %+v lack the app's stderr", ev.Exit.LastLines)
	}
	assertGone(t, env.client, spec.InstanceGUID)
}

func TestRestartedExecutorAdoptsInstances(t *testing.T) {
	env := startCell(t)
	state, err := os.MkdirTemp("", "basin-exec")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		exec.Command("ip", "link", "del", testBridge).Run()
		os.RemoveAll(state)
	})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	first, stopFirst := runExecutor(t, env, state, nil)
	spec := executor.Spec{
		InstanceGUID: "it-adopt-0", ProcessGUID: "it-adopt", Stack: "tiny",
		Droplet:      droplet(t, map[string]string{"app/index.html": "still here\n"}),
		StartCommand: "exec httpd -f -p $PORT -h .", MemoryMB: 32,
	}
	info, err := first.Start(ctx, spec)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	if _, err := first.WaitHealthy(ctx, spec.InstanceGUID); err != nil {
		t.Fatal(err)
	}
	// A second instance that the restarted cell no longer owns.
	orphan := spec
	orphan.InstanceGUID, orphan.Index = "it-adopt-1", 1
	orphanInfo, err := first.Start(ctx, orphan)
	if err != nil {
		t.Fatalf("Start orphan: %v", err)
	}
	if _, err := first.WaitHealthy(ctx, orphan.InstanceGUID); err != nil {
		t.Fatal(err)
	}
	stopFirst() // the cell process goes away; its containers stay

	second, stopSecond := runExecutor(t, env, state, nil)
	defer stopSecond()
	list, err := second.List(ctx)
	if err != nil || len(list) != 2 {
		t.Fatalf("List after restart = %+v, %v; want both instances", list, err)
	}
	for _, in := range list {
		if in.State != executor.StateRunning || (in.InstanceGUID == spec.InstanceGUID && in.PID != info.PID) {
			t.Errorf("listed %+v: want running, pid %d for %s", in, info.PID, spec.InstanceGUID)
		}
	}
	if err := second.Destroy(ctx, orphan.InstanceGUID); err != nil {
		t.Fatalf("Destroy orphan: %v", err)
	}
	assertGone(t, env.client, orphan.InstanceGUID)
	if c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", orphanInfo.Ports[0].HostPort), time.Second); err == nil {
		c.Close()
		t.Errorf("destroyed instance's host port still answers")
	}
	adopted, err := second.Adopt(ctx, spec.InstanceGUID)
	if err != nil {
		t.Fatalf("Adopt: %v", err)
	}
	if _, err := second.WaitHealthy(ctx, spec.InstanceGUID); err != nil {
		t.Fatal(err)
	}
	if adopted.PID != info.PID || adopted.Ports[0] != info.Ports[0] {
		t.Errorf("adopted %+v, started %+v: want the same process and port", adopted, info)
	}
	url := fmt.Sprintf("http://127.0.0.1:%d/index.html", adopted.Ports[0].HostPort)
	if code, body := get(t, url); code != 200 || body != "still here\n" {
		t.Errorf("GET after adoption = %d %q", code, body)
	}
	t0 := time.Now()
	if err := second.Stop(ctx, spec.InstanceGUID, 10*time.Second); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	t.Logf("stopped with SIGTERM in %s", time.Since(t0).Round(time.Millisecond))
	assertGone(t, env.client, spec.InstanceGUID)
}

func TestExecutorKillsAnInstanceThatFailsLiveness(t *testing.T) {
	env := startCell(t)
	e := startExecutor(t, env, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// httpd daemonizes, serves until the marker file appears, then dies;
	// the shell stays, so only the liveness check can notice.
	spec := executor.Spec{
		InstanceGUID: "it-live-0", ProcessGUID: "it-live", Stack: "tiny",
		Droplet:      droplet(t, map[string]string{"app/index.html": "ok\n"}),
		StartCommand: "httpd -p $PORT -h .; while [ ! -f /home/vcap/tmp/die ]; do sleep 0.1; done; killall httpd; exec sleep 3600",
		MemoryMB:     32,
		HealthCheck:  executor.HealthCheck{Type: executor.HealthPort, Interval: 100 * time.Millisecond},
	}
	info, err := e.Start(ctx, spec)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	e.nextEvent(t, spec.InstanceGUID, executor.EventHealthy, time.Minute)
	// Create the marker from the host, through the instance's own rootfs.
	if err := os.WriteFile(fmt.Sprintf("/proc/%d/root/home/vcap/tmp/die", info.PID), nil, 0o644); err != nil {
		t.Fatalf("write marker: %v", err)
	}
	ev := e.nextEvent(t, spec.InstanceGUID, executor.EventExited, time.Minute)
	if ev.Exit.Stopped || !strings.Contains(ev.Exit.Reason, "liveness check failed") {
		t.Errorf("exit %+v: want a crash by failed liveness", ev.Exit)
	}
	t.Logf("exit: %s", ev.Exit.Reason)
	assertGone(t, env.client, spec.InstanceGUID)
}

// cgroupV1File reads a limit from the cgroup v1 hierarchy a process is in.
func cgroupV1File(pid uint32, controller, file string) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(b), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		for _, c := range strings.Split(parts[1], ",") {
			if c == controller {
				v, err := os.ReadFile(filepath.Join("/sys/fs/cgroup", controller, parts[2], file))
				return strings.TrimSpace(string(v)), err
			}
		}
	}
	return "", fmt.Errorf("no %s controller for pid %d", controller, pid)
}
