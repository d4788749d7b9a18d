//go:build integration

package integration

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/basinpaas/basin/bbs"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
)

var (
	basinBinOnce sync.Once
	basinBinPath string
	basinBinErr  error
)

// basinBinary builds cmd/basin once per test run.
func basinBinary(t *testing.T) string {
	t.Helper()
	basinBinOnce.Do(func() {
		dir, err := os.MkdirTemp("", "basin-bin-")
		if err != nil {
			basinBinErr = err
			return
		}
		basinBinPath = filepath.Join(dir, "basin")
		out, err := exec.Command("go", "build", "-o", basinBinPath, "../cmd/basin").CombinedOutput()
		if err != nil {
			basinBinErr = err
			t.Logf("go build: %s", out)
		}
	})
	if basinBinErr != nil {
		t.Fatalf("build basin: %v", basinBinErr)
	}
	return basinBinPath
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

// TestDevUpServesTheBBS runs `basin dev up` as a newcomer would and talks to
// it the way grpcurl does: server reflection lists the BBS service, and an
// LRP desired through the API shows its UNCLAIMED instances.
func TestDevUpServesTheBBS(t *testing.T) {
	bin := basinBinary(t)
	home := t.TempDir()
	api := freeLoopbackAddr(t)
	routerAddr := freeLoopbackAddr(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.Command(bin, "dev", "up", "--api", api, "--etcd", freeLoopbackAddr(t), "--debug", freeLoopbackAddr(t), "--router", routerAddr)
	cmd.Env = append(os.Environ(), "BASIN_HOME="+home)
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
	defer func() {
		cmd.Process.Signal(os.Interrupt)
		select {
		case <-exited:
		case <-time.After(15 * time.Second):
			cmd.Process.Kill()
			t.Error("basin dev up did not stop within 15s of SIGINT")
		}
	}()
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
	var printed string
	select {
	case printed = <-up:
	case err := <-exited:
		t.Fatalf("basin dev up exited: %v", err)
	case <-ctx.Done():
		t.Fatal("basin dev up did not come up in time")
	}
	if !strings.Contains(printed, api) {
		t.Errorf("dev up did not print the API address %s:\n%s", api, printed)
	}

	// The router is up and names a host it has no route for.
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+routerAddr+"/", nil)
	req.Host = "nosuchapp.apps.localhost"
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("router: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound || !strings.Contains(string(body), "nosuchapp.apps.localhost") {
		t.Errorf("router answered %d %q for an unknown host, want 404 naming it", resp.StatusCode, body)
	}

	var tgt struct{ API, Token string }
	b, err := os.ReadFile(filepath.Join(home, "target.json"))
	if err != nil {
		t.Fatalf("target file: %v", err)
	}
	if err := json.Unmarshal(b, &tgt); err != nil || tgt.API != api || tgt.Token == "" {
		t.Fatalf("target file %s: %+v %v", b, tgt, err)
	}

	// grpcurl's list: server reflection without a token.
	conn, err := grpc.NewClient(api, grpc.WithTransportCredentials(insecure.NewCredentials()))
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

	cli, err := bbs.Dial(bbs.ClientConfig{Address: api, Token: tgt.Token})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
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
