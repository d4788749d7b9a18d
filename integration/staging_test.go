//go:build integration

package integration

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	"github.com/basinpaas/basin/bbs"
	"github.com/basinpaas/basin/bbs/blobstore"
	"github.com/basinpaas/basin/cell"
	"github.com/basinpaas/basin/cell/containerdproc"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

// fakeBuildpack is a Heroku-API buildpack for the fake builder: it detects
// an index.html, counts its runs in the build cache, fails to compile an app
// holding a FAIL file (as a syntax error would), and releases busybox httpd.
var fakeBuildpack = map[string]string{
	"bin/detect": `#!/bin/sh
[ -f "$1/index.html" ] && echo fake-static
`,
	"bin/compile": `#!/bin/sh
build=$1 cache=$2
n=$(cat "$cache/runs" 2>/dev/null || echo 0)
echo "-----> fake compile: previous stagings in cache: $n"
echo $((n + 1)) > "$cache/runs"
if [ -f "$build/FAIL" ]; then
	echo "compile error: syntax error in app.rb line 3" >&2
	exit 1
fi
if [ -n "${PROBE_GW:-}" ]; then
	if nc -w 2 "$PROBE_GW" "$PROBE_PROTECTED" </dev/null; then p=open; else p=closed; fi
	if nc -w 2 "$PROBE_GW" "$PROBE_OPEN" </dev/null; then o=open; else o=closed; fi
	echo "-----> fake compile: probe protected=$p open=$o"
fi
echo "-----> fake compile: compiling"
sleep 2
echo "-----> fake compile: done"
`,
	"bin/release": `#!/bin/sh
printf -- '---\ndefault_process_types:\n  web: exec httpd -f -p $PORT -h /home/vcap/app\n'
`,
}

// tgz packs files (executable when under bin/) as a tar.gz, inside dir when
// it is not empty (as GitHub's archives are).
func tgz(t *testing.T, dir string, files map[string]string) []byte {
	t.Helper()
	var raw bytes.Buffer
	zw := gzip.NewWriter(&raw)
	tw := tar.NewWriter(zw)
	for name, body := range files {
		mode := int64(0o644)
		if strings.HasPrefix(name, "bin/") {
			mode = 0o755
		}
		if dir != "" {
			name = dir + "/" + name
		}
		if err := tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: mode, Size: int64(len(body))}); err != nil {
			t.Fatal(err)
		}
		tw.Write([]byte(body))
	}
	tw.Close()
	zw.Close()
	return raw.Bytes()
}

// newStagingEnv is etcd, a BBS with a local blobstore in this process, and a
// client: a repEnv whose BBS also serves staging and logs.
func newStagingEnv(t *testing.T, ctx context.Context) *repEnv {
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
	prefix := fmt.Sprintf("/staging-test/%s-%d/", t.Name(), time.Now().UnixNano())
	blobs, err := blobstore.NewLocal(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv, err := bbs.NewServer(cli, bbs.Config{Listener: lis, Store: bbs.StoreConfig{Prefix: prefix}, Blobs: blobs,
		Staging: bbs.StagingConfig{TempDir: t.TempDir()}, Logger: slog.New(slog.NewTextHandler(testLog{t}, nil))})
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

// runStagingCell runs a cell with the fake builder on its own bridge and
// subnet until the test ends.
func runStagingCell(t *testing.T, cenv *cellEnv, env *repEnv, protected []int) *cell.Cell {
	t.Helper()
	builder, err := filepath.Abs("testdata/fake-builder.sh")
	if err != nil {
		t.Fatal(err)
	}
	state, err := containerdproc.ShortDir("bstg")
	if err != nil {
		t.Fatal(err)
	}
	const bridge = "basinstg0"
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c, err := cell.New(cell.Config{
		ID: "stg-cell", Zone: "z1", Capacity: &basinv1.CellCapacity{MemoryMb: 4096, DiskMb: 16384, Containers: 10},
		Listener: lis, Containerd: cenv.client, Etcd: env.etcd, BBSClient: env.bbs, Prefix: env.prefix,
		LauncherPath: cenv.launcher, BuilderPath: builder, StateDir: state,
		NetworkName: bridge, BridgeName: bridge, Subnet: "10.231.0.0/24", FirewallChain: "BASIN-STGTEST0",
		HostPortLow: 62800, HostPortHigh: 62899, StopGrace: 2 * time.Second, ProtectedPorts: protected,
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
			t.Errorf("cell Run: %v", err)
		}
		exec.Command("ip", "link", "del", bridge).Run()
		os.RemoveAll(state)
	})
	return c
}

// logRecorder follows a task's logs through the BBS's LogService.
type logRecorder struct {
	mu    sync.Mutex
	lines []*basinv1.LogLine
	done  chan error
}

func followLogs(ctx context.Context, env *repEnv, taskGUID string, onLine func(*basinv1.LogLine)) *logRecorder {
	r := &logRecorder{done: make(chan error, 1)}
	go func() {
		s, err := env.bbs.Logs.StreamLogs(ctx, &basinv1.StreamLogsRequest{Source: &basinv1.StreamLogsRequest_TaskGuid{TaskGuid: taskGUID}, Follow: true})
		if err != nil {
			r.done <- err
			return
		}
		for {
			m, err := s.Recv()
			if err == io.EOF {
				r.done <- nil
				return
			}
			if err != nil {
				r.done <- err
				return
			}
			r.mu.Lock()
			r.lines = append(r.lines, m.GetLine())
			r.mu.Unlock()
			if onLine != nil {
				onLine(m.GetLine())
			}
		}
	}()
	return r
}

func (r *logRecorder) text(source string) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var b strings.Builder
	for _, l := range r.lines {
		if source == "" || l.GetSource() == source {
			b.WriteString(l.GetText() + "\n")
		}
	}
	return b.String()
}

// waitTask waits for the task to complete and decodes its StagingResult.
func waitTask(t *testing.T, env *repEnv, guid string, within time.Duration) (*basinv1.Task, *basinv1.StagingResult) {
	t.Helper()
	deadline := time.Now().Add(within)
	var last *basinv1.Task
	for time.Now().Before(deadline) {
		r, err := env.bbs.GetTask(env.ctx, &basinv1.GetTaskRequest{TaskGuid: guid})
		if err == nil {
			last = r.GetTask()
			if last.GetState() == basinv1.TaskState_TASK_STATE_COMPLETED {
				res := &basinv1.StagingResult{}
				if err := protojson.Unmarshal([]byte(last.GetResult()), res); err != nil {
					t.Fatalf("task %s result %q is not a StagingResult: %v", guid, last.GetResult(), err)
				}
				return last, res
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("task %s not COMPLETED within %s: %v", guid, within, last)
	return nil, nil
}

func uploadApp(t *testing.T, env *repEnv, app string, files map[string]string) string {
	t.Helper()
	resp, err := env.bbs.UploadBits(env.ctx, &basinv1.UploadBitsHeader{AppGuid: app, Format: "tgz"}, bytes.NewReader(tgz(t, "", files)))
	if err != nil {
		t.Fatalf("upload bits of %s: %v", app, err)
	}
	return resp.GetBitsDigest()
}

// TestStagingOnARealCell: bits uploaded, staged by the fake builder in a
// container on a real cell (tiny stack) through the real auctioneer, its
// output followed live through the BBS, the droplet run as an LRP that
// answers HTTP 200; the build cache of the first staging is seen by the
// second; a failing compile fails the task with exit code 223 and the
// output's tail; an app nothing detects fails with 222.
func TestStagingOnARealCell(t *testing.T) {
	cenv := startCell(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	env := newStagingEnv(t, ctx)
	// Staging containers reach what the host serves (as they reach package
	// registries through the bridge's NAT) but not the components' ports.
	_, bbsPort, _ := net.SplitHostPort(env.bbsURL)
	protected, _ := strconv.Atoi(bbsPort)
	open := listen(t)
	c := runStagingCell(t, cenv, env, []int{protected})
	waitServing(t, ctx, c.Addr())
	startLeaders(t, env)

	// The buildpack, nested in a top-level directory as GitHub's archives
	// are, as the only admin buildpack.
	bpDigest, _, err := env.bbs.UploadBlob(ctx, bytes.NewReader(tgz(t, "fake-static-buildpack-main", fakeBuildpack)), "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := env.bbs.Staging.CreateBuildpack(ctx, &basinv1.CreateBuildpackRequest{Buildpack: &basinv1.Buildpack{
		Name: "fake_static", Digest: bpDigest, Enabled: true}}); err != nil {
		t.Fatal(err)
	}
	probe := []*basinv1.EnvVar{{Name: "PROBE_GW", Value: "10.231.0.1"}, {Name: "PROBE_PROTECTED", Value: strconv.Itoa(protected)},
		{Name: "PROBE_OPEN", Value: strconv.Itoa(open)}}
	stage := func(app, bits string, buildpacks ...string) string {
		t.Helper()
		resp, err := env.bbs.Staging.StageApp(ctx, &basinv1.StageAppRequest{AppGuid: app, BitsDigest: bits, Stack: "tiny",
			Env: probe, Buildpacks: buildpacks, Resources: &basinv1.ResourceLimits{MemoryMb: 256, DiskMb: 512}, TimeoutMs: 120000})
		if err != nil {
			t.Fatalf("StageApp %s: %v", app, err)
		}
		return resp.GetTaskGuid()
	}
	const body = "hello from a staged droplet\n"
	bits := uploadApp(t, env, "stg-app", map[string]string{"index.html": body})

	var result *basinv1.StagingResult
	t.Run("stage and run", func(t *testing.T) {
		t0 := time.Now()
		guid := stage("stg-app", bits)
		liveChecked := make(chan string, 1)
		rec := followLogs(ctx, env, guid, func(l *basinv1.LogLine) {
			if strings.Contains(l.GetText(), "fake compile: compiling") {
				// compile sleeps after this line: the task must still run.
				r, err := env.bbs.GetTask(ctx, &basinv1.GetTaskRequest{TaskGuid: guid})
				select {
				case liveChecked <- fmt.Sprintf("%v %v", r.GetTask().GetState(), err):
				default:
				}
			}
		})
		task, res := waitTask(t, env, guid, 2*time.Minute)
		t.Logf("staged in %s: %v", time.Since(t0).Round(time.Millisecond), res)
		if task.GetFailed() || !strings.HasPrefix(res.GetDropletDigest(), "sha256:") || res.GetDetectedBuildpack() != "fake-static" ||
			res.GetBuildpackKey() != "fake_static" || res.GetStartCommand() != "exec httpd -f -p $PORT -h /home/vcap/app" ||
			res.GetProcessTypes()["web"] != res.GetStartCommand() || res.GetStack() != "tiny" || task.GetCellId() != "stg-cell" {
			t.Fatalf("task %v\nresult %v: want a droplet staged by fake_static on stg-cell", task, res)
		}
		select {
		case err := <-rec.done:
			if err != nil {
				t.Fatalf("StreamLogs: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("StreamLogs did not end once the task completed")
		}
		stg := rec.text("STG")
		t.Logf("staging output:\n%s", stg)
		for _, want := range []string{"fake builder running as 2000:2000 in /tmp/app", "previous stagings in cache: 0", "fake compile: compiling", "fake compile: done",
			"probe protected=closed open=open"} {
			if !strings.Contains(stg, want) {
				t.Errorf("staging logs lack %q", want)
			}
		}
		select {
		case s := <-liveChecked:
			if !strings.HasPrefix(s, "TASK_STATE_RUNNING") {
				t.Errorf("the compile line arrived when the task was %s: not live", s)
			}
		default:
			t.Error("never saw the compile line while following")
		}
		result = res

		// The droplet runs as an LRP, fetched from the blobstore by digest.
		if _, err := env.bbs.DesireLRP(ctx, &basinv1.DesireLRPRequest{
			Schedule: &basinv1.DesiredLRPSchedule{ProcessGuid: "stg-app", Instances: 1, Stack: "tiny",
				Resources: &basinv1.ResourceLimits{MemoryMb: 64, DiskMb: 64, Pids: 64}},
			Run: &basinv1.DesiredLRPRun{StartCommand: res.GetStartCommand(), Ports: []uint32{8080}, AppName: "stg-app",
				HealthCheck: &basinv1.HealthCheck{Type: basinv1.HealthCheckType_HEALTH_CHECK_TYPE_HTTP, HttpEndpoint: "/index.html"},
				Droplet:     &basinv1.DropletRef{Digest: res.GetDropletDigest()}},
		}); err != nil {
			t.Fatal(err)
		}
		a := env.waitActual("stg-app", basinv1.ActualLRPState_ACTUAL_LRP_STATE_RUNNING, time.Minute)
		url := fmt.Sprintf("http://127.0.0.1:%d/index.html", a.GetNetInfo().GetPorts()[0].GetHostPort())
		if code, got := getRetry(t, url, 10*time.Second); code != 200 || got != body {
			t.Errorf("GET %s = %d %q, want 200 %q", url, code, got, body)
		}
		// The LRP's logs come through the BBS from the cell that runs it.
		ls, err := env.bbs.Logs.StreamLogs(ctx, &basinv1.StreamLogsRequest{Source: &basinv1.StreamLogsRequest_ProcessGuid{ProcessGuid: "stg-app"}})
		if err != nil {
			t.Fatal(err)
		}
		sawHealthy := false
		for {
			m, err := ls.Recv()
			if err != nil {
				if err != io.EOF {
					t.Fatalf("StreamLogs of the LRP: %v", err)
				}
				break
			}
			sawHealthy = sawHealthy || (m.GetLine().GetSource() == "CELL" && strings.Contains(m.GetLine().GetText(), "healthy"))
		}
		if !sawHealthy {
			t.Error("the LRP's logs through the BBS lack the cell's healthy event")
		}
		if _, err := env.bbs.ResolveTask(ctx, &basinv1.ResolveTaskRequest{TaskGuid: guid}); err != nil {
			t.Errorf("resolve: %v", err)
		}
	})

	t.Run("cache survives a restage", func(t *testing.T) {
		if result == nil {
			t.Fatal("cannot restage: the first staging failed")
		}
		guid := stage("stg-app", bits, "fake_static")
		task, res := waitTask(t, env, guid, 2*time.Minute)
		if task.GetFailed() || res.GetDropletDigest() == "" {
			t.Fatalf("restage: %v %v", task, res)
		}
		// Recent lines of the finished task, without following.
		s, err := env.bbs.Logs.StreamLogs(ctx, &basinv1.StreamLogsRequest{Source: &basinv1.StreamLogsRequest_TaskGuid{TaskGuid: guid}})
		if err != nil {
			t.Fatal(err)
		}
		var out strings.Builder
		for {
			m, err := s.Recv()
			if err != nil {
				if err != io.EOF {
					t.Fatalf("StreamLogs: %v", err)
				}
				break
			}
			out.WriteString(m.GetLine().GetText() + "\n")
		}
		if !strings.Contains(out.String(), "previous stagings in cache: 1") {
			t.Errorf("the restage did not see the first staging's cache:\n%s", out.String())
		}
		env.bbs.ResolveTask(ctx, &basinv1.ResolveTaskRequest{TaskGuid: guid})
	})

	t.Run("compile failure", func(t *testing.T) {
		bad := uploadApp(t, env, "stg-bad", map[string]string{"index.html": "x", "FAIL": "syntax error here"})
		guid := stage("stg-bad", bad, "fake_static")
		task, res := waitTask(t, env, guid, 2*time.Minute)
		t.Logf("failure: %q %v", task.GetFailureReason(), res)
		if !task.GetFailed() || res.GetExitCode() != 223 || res.GetFailedPhase() != "compile" || res.GetDropletDigest() != "" ||
			!strings.Contains(res.GetOutputTail(), "syntax error in app.rb line 3") || !strings.Contains(task.GetFailureReason(), "compile phase (exit status 223)") {
			t.Errorf("task %v\nresult %v: want failed in compile with 223 and the output", task, res)
		}
		env.bbs.ResolveTask(ctx, &basinv1.ResolveTaskRequest{TaskGuid: guid})
	})

	t.Run("nothing detected", func(t *testing.T) {
		none := uploadApp(t, env, "stg-none", map[string]string{"main.go": "package main\n"})
		guid := stage("stg-none", none)
		task, res := waitTask(t, env, guid, 2*time.Minute)
		if !task.GetFailed() || res.GetExitCode() != 222 || res.GetFailedPhase() != "detect" ||
			!strings.Contains(res.GetOutputTail(), "None of the buildpacks detected") {
			t.Errorf("task %v\nresult %v: want failed in detect with 222", task, res)
		}
		env.bbs.ResolveTask(ctx, &basinv1.ResolveTaskRequest{TaskGuid: guid})
	})

	if _, err := env.bbs.RemoveDesiredLRP(ctx, &basinv1.RemoveDesiredLRPRequest{ProcessGuid: "stg-app"}); err != nil {
		t.Fatal(err)
	}
	waitNoContainers(t, ctx, cenv.client, 30*time.Second)
}
