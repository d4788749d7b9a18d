//go:build integration

package integration

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"

	"github.com/basinpaas/basin/bbs"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
)

// basinBinary builds cmd/basin with basin-launcher beside it, as make build does.
func basinBinary(t *testing.T) string {
	t.Helper()
	command(t, "basin-launcher")
	return command(t, "basin")
}

func freeLoopbackAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// devUp is a running `basin dev up`.
type devUp struct {
	api, router string
	home        string
	target      struct{ API, Token string }
	printed     string
	// stop sends SIGINT, as Ctrl-C does, and waits for dev up to exit.
	stop func()
}

// startDevUp runs `basin dev up` with cells cells as a newcomer would, on
// free loopback ports and a fresh BASIN_HOME, and stops it with SIGINT (as
// Ctrl-C does) when the test ends, checking that it exits.
func startDevUp(t *testing.T, cells int, extra ...string) *devUp {
	t.Helper()
	bin := basinBinary(t)
	d := &devUp{api: freeLoopbackAddr(t), router: freeLoopbackAddr(t), home: t.TempDir()}
	if !slices.Contains(extra, "--stacks") {
		// Only what these tests run: importing bookworm costs seconds and
		// a gigabyte per containerd.
		extra = append(extra, "--stacks", "tiny")
	}
	cmd := exec.Command(bin, append([]string{"dev", "up", "--api", d.api, "--etcd", freeLoopbackAddr(t), "--debug", freeLoopbackAddr(t),
		"--router", d.router, "--cells", strconvItoa(cells)}, extra...)...)
	d.start(t, cmd)
	return d
}

// start runs cmd (basin dev up, or what runs it) with d's BASIN_HOME in a
// process group of its own, and stops the group with SIGINT when the test
// ends, as Ctrl-C in a terminal does.
func (d *devUp) start(t *testing.T, cmd *exec.Cmd) {
	t.Helper()
	cmd.Env = append(os.Environ(), "BASIN_HOME="+d.home)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	// up receives what dev up printed until it said it is up.
	up := make(chan string, 1)
	go func() {
		var output strings.Builder
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			output.WriteString(sc.Text() + "\n")
			if strings.Contains(sc.Text(), "basin is up") {
				up <- output.String()
			}
		}
		io.Copy(io.Discard, stdout)
	}()
	d.stop = sync.OnceFunc(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGINT)
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-exited
			t.Error("basin dev up did not stop within 30s of SIGINT")
		}
	})
	t.Cleanup(d.stop)
	select {
	case d.printed = <-up:
	case err := <-exited:
		exited <- err // for the cleanup
		t.Fatalf("basin dev up exited: %v", err)
	case <-time.After(5 * time.Minute):
		t.Fatal("basin dev up did not come up in time")
	}
	b, err := os.ReadFile(filepath.Join(d.home, "target.json"))
	if err != nil {
		t.Fatalf("target file: %v", err)
	}
	if err := json.Unmarshal(b, &d.target); err != nil || d.target.API != d.api || d.target.Token == "" {
		t.Fatalf("target file %s: %+v %v", b, d.target, err)
	}
}

func strconvItoa(n int) string {
	b, _ := json.Marshal(n)
	return string(b)
}

func (d *devUp) client(t *testing.T) *bbs.Client {
	t.Helper()
	cli, err := bbs.Dial(bbs.ClientConfig{Address: d.api, Token: d.target.Token})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// routerGet sends GET / for host through the router.
func (d *devUp) routerGet(ctx context.Context, host string) (int, string, error) {
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+d.router+"/", nil)
	req.Host = host
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body), nil
}

// TestDevUpServesTheBBS runs `basin dev up` without cells and talks to it the
// way grpcurl does: server reflection lists the BBS service, and an LRP
// desired through the API shows its UNCLAIMED instances.
func TestDevUpServesTheBBS(t *testing.T) {
	d := startDevUp(t, 0)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if !strings.Contains(d.printed, d.api) || !strings.Contains(d.printed, d.router) {
		t.Errorf("dev up did not print the API and router addresses:\n%s", d.printed)
	}
	// The router is up and names a host it has no route for.
	code, body, err := d.routerGet(ctx, "nosuchapp.apps.localhost")
	if err != nil || code != http.StatusNotFound || !strings.Contains(body, "nosuchapp.apps.localhost") {
		t.Errorf("router answered %d %q %v for an unknown host, want 404 naming it", code, body, err)
	}

	// grpcurl's list: server reflection without a token.
	conn, err := grpc.NewClient(d.api, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	rs, err := reflectionpb.NewServerReflectionClient(conn).ServerReflectionInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := rs.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}); err != nil {
		t.Fatal(err)
	}
	rresp, err := rs.Recv()
	if err != nil {
		t.Fatal(err)
	}
	var services []string
	for _, s := range rresp.GetListServicesResponse().GetService() {
		services = append(services, s.GetName())
	}
	if !strings.Contains(strings.Join(services, " "), "basin.v1.BBSService") {
		t.Fatalf("reflection lists %v, not basin.v1.BBSService", services)
	}

	cli := d.client(t)
	if _, err := cli.DesireLRP(ctx, &basinv1.DesireLRPRequest{
		Schedule: &basinv1.DesiredLRPSchedule{ProcessGuid: "demo", Instances: 3, Stack: "tiny",
			Resources: &basinv1.ResourceLimits{MemoryMb: 128, DiskMb: 256, Pids: 64}},
		Run: &basinv1.DesiredLRPRun{StartCommand: "./server", Ports: []uint32{8080}},
	}); err != nil {
		t.Fatal(err)
	}
	list, err := cli.ListActualLRPs(ctx, &basinv1.ListActualLRPsRequest{ProcessGuid: "demo"})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.GetActualLrps()) != 3 {
		t.Fatalf("%d actual LRPs, want 3", len(list.GetActualLrps()))
	}
	for _, a := range list.GetActualLrps() {
		if a.GetState() != basinv1.ActualLRPState_ACTUAL_LRP_STATE_UNCLAIMED {
			t.Errorf("instance %d is %v, want UNCLAIMED", a.GetKey().GetIndex(), a.GetState())
		}
	}
}

// staticDroplet is a Cloud Foundry droplet whose start command serves
// app/index.html with busybox httpd.
func staticDroplet(t *testing.T, body string) []byte {
	t.Helper()
	var buf bytes.Buffer
	gz := gzip.NewWriter(&buf)
	tw := tar.NewWriter(gz)
	for _, dir := range []string{"app/", "deps/", "profile.d/", "tmp/", "logs/"} {
		tw.WriteHeader(&tar.Header{Name: dir, Typeflag: tar.TypeDir, Mode: 0o755})
	}
	files := map[string]string{
		"app/index.html":   body,
		"staging_info.yml": `{"detected_buildpack":"staticfile","start_command":"httpd -f -p $PORT -h /home/vcap/app"}`,
	}
	for name, content := range files {
		tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(content)), Typeflag: tar.TypeReg})
		tw.Write([]byte(content))
	}
	tw.Close()
	gz.Close()
	return buf.Bytes()
}

// TestDevUpRunsAnApp is the newcomer's path on one machine: `basin dev up`
// with two real cells, a droplet uploaded to its blobstore, an LRP desired
// through the API, and the app answering through the router by host name.
func TestDevUpRunsAnApp(t *testing.T) {
	needCell(t)
	var home string
	// Runs after dev up stopped (cleanups run last first): whatever a
	// failing test left behind goes, and so do dev up's bridges.
	t.Cleanup(func() {
		if home != "" {
			cleanupCellState(t, filepath.Join(home, "dev"))
		}
		for i := range 2 {
			exec.Command("ip", "link", "del", "basin-dev"+strconvItoa(i)).Run()
		}
	})
	d := startDevUp(t, 2)
	home = d.home
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cli := d.client(t)

	drop := staticDroplet(t, "hello from basin dev up")
	sum := sha256.Sum256(drop)
	digest := "sha256:" + hex.EncodeToString(sum[:])
	if got, _, err := cli.UploadBlob(ctx, bytes.NewReader(drop), digest); err != nil || got != digest {
		t.Fatalf("upload droplet: %s %v", got, err)
	}
	host := "hello.apps.localhost"
	if _, err := cli.DesireLRP(ctx, &basinv1.DesireLRPRequest{
		Schedule: &basinv1.DesiredLRPSchedule{ProcessGuid: "hello", Instances: 2, Stack: "tiny",
			Resources: &basinv1.ResourceLimits{MemoryMb: 64, DiskMb: 128, Pids: 64},
			Routes:    []*basinv1.Route{{Host: host}}},
		Run: &basinv1.DesiredLRPRun{Ports: []uint32{8080}, Droplet: &basinv1.DropletRef{Digest: digest}},
	}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	cells := map[string]bool{}
	for {
		list, err := cli.ListActualLRPs(ctx, &basinv1.ListActualLRPsRequest{ProcessGuid: "hello"})
		if err != nil {
			t.Fatal(err)
		}
		running := 0
		clear(cells)
		for _, a := range list.GetActualLrps() {
			if a.GetState() == basinv1.ActualLRPState_ACTUAL_LRP_STATE_RUNNING {
				running++
				cells[a.GetInstanceKey().GetCellId()] = true
			}
		}
		if running == 2 {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("instances never all RUNNING: %v", list.GetActualLrps())
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("desire to 2 RUNNING instances: %s", time.Since(start))
	if len(cells) != 2 {
		t.Errorf("both instances run on %v, want one per cell", cells)
	}
	for {
		code, body, err := d.routerGet(ctx, host)
		if err == nil && code == http.StatusOK {
			if !strings.Contains(body, "hello from basin dev up") {
				t.Fatalf("router gave %q", body)
			}
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("app never answered through the router: %d %q %v", code, body, err)
		}
		time.Sleep(50 * time.Millisecond)
	}

	// Removing the LRP stops its route, then its containers.
	if _, err := cli.RemoveDesiredLRP(ctx, &basinv1.RemoveDesiredLRPRequest{ProcessGuid: "hello"}); err != nil {
		t.Fatal(err)
	}
	for {
		code, _, err := d.routerGet(ctx, host)
		if err == nil && code == http.StatusNotFound {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("route still served after the LRP was removed: %d %v", code, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	ctrd, err := client.New(filepath.Join(d.home, "dev", "containerd", "containerd.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer ctrd.Close()
	waitNoContainers(t, ctx, ctrd, 30*time.Second)
}

// TestDevDownRemovesWhatDevUpLeft: after Ctrl-C the apps' containers keep
// running (for the next dev up to adopt); basin dev down removes them, the
// cells' bridges and the platform's state.
func TestDevDownRemovesWhatDevUpLeft(t *testing.T) {
	needCell(t)
	d := startDevUp(t, 1)
	t.Cleanup(func() {
		cleanupCellState(t, filepath.Join(d.home, "dev"))
		exec.Command("ip", "link", "del", "basin-dev0").Run()
	})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cli := d.client(t)
	drop := staticDroplet(t, "soon gone")
	digest, _, err := cli.UploadBlob(ctx, bytes.NewReader(drop), "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.DesireLRP(ctx, &basinv1.DesireLRPRequest{
		Schedule: &basinv1.DesiredLRPSchedule{ProcessGuid: "leftover", Instances: 1, Stack: "tiny",
			Resources: &basinv1.ResourceLimits{MemoryMb: 64, DiskMb: 128, Pids: 64}},
		Run: &basinv1.DesiredLRPRun{Ports: []uint32{8080}, Droplet: &basinv1.DropletRef{Digest: digest}},
	}); err != nil {
		t.Fatal(err)
	}
	for {
		list, err := cli.ListActualLRPs(ctx, &basinv1.ListActualLRPsRequest{ProcessGuid: "leftover"})
		if err == nil && len(list.GetActualLrps()) == 1 && list.GetActualLrps()[0].GetState() == basinv1.ActualLRPState_ACTUAL_LRP_STATE_RUNNING {
			break
		}
		if ctx.Err() != nil {
			t.Fatal("instance never RUNNING")
		}
		time.Sleep(50 * time.Millisecond)
	}
	d.stop()
	sock := filepath.Join(d.home, "dev", "containerd", "containerd.sock")
	if n := shimsFor(t, sock); n == 0 {
		t.Fatal("the app's container did not outlive dev up: nothing for dev down to remove")
	}

	cmd := exec.Command(basinBinary(t), "dev", "down")
	cmd.Env = append(os.Environ(), "BASIN_HOME="+d.home)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("basin dev down: %v\n%s", err, out)
	}
	t.Logf("basin dev down:\n%s", out)
	deadline := time.Now().Add(10 * time.Second)
	for shimsFor(t, sock) > 0 {
		if time.Now().After(deadline) {
			t.Fatal("containers still running after dev down")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := exec.Command("ip", "link", "show", "basin-dev0").Run(); err == nil {
		t.Error("bridge basin-dev0 still exists after dev down")
	}
	if _, err := os.Stat(filepath.Join(d.home, "dev")); !os.IsNotExist(err) {
		t.Errorf("state dir still there after dev down: %v", err)
	}
}

// shimsFor counts the live containerd shims serving the daemon at sock.
func shimsFor(t *testing.T, sock string) int {
	t.Helper()
	out, _ := exec.Command("pgrep", "-f", "containerd-shim-runc-v2 .*-address "+sock).Output()
	n := 0
	for _, f := range strings.Fields(string(out)) {
		if st, err := os.ReadFile("/proc/" + f + "/stat"); err == nil && !strings.Contains(string(st), ") Z ") {
			n++
		}
	}
	return n
}
