package main

import (
	"archive/zip"
	"bytes"
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/basinpaas/basin/bbs"
	"github.com/basinpaas/basin/cmd/basin/internal/ui"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"
	"google.golang.org/protobuf/encoding/protojson"
)

// The fakes stand in for the BBS process at the gRPC boundary: staging and
// logs land from another branch, and these tests pin the CLI's side of the
// staging.proto and logs.proto contracts.

type fakeStaging struct {
	basinv1.UnimplementedStagingServiceServer
	mu      sync.Mutex
	header  *basinv1.UploadBitsHeader
	archive []byte
	staged  *basinv1.StageAppRequest
}

func (f *fakeStaging) MatchResources(_ context.Context, req *basinv1.MatchResourcesRequest) (*basinv1.MatchResourcesResponse, error) {
	resp := &basinv1.MatchResourcesResponse{}
	for _, r := range req.GetFiles() {
		if r.GetPath() == "unchanged.txt" {
			resp.Matched = append(resp.Matched, r)
		}
	}
	return resp, nil
}

func (f *fakeStaging) UploadBits(stream basinv1.StagingService_UploadBitsServer) error {
	var buf bytes.Buffer
	var h *basinv1.UploadBitsHeader
	for {
		msg, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		if msg.GetHeader() != nil {
			h = msg.GetHeader()
		}
		buf.Write(msg.GetChunk())
	}
	f.mu.Lock()
	f.header, f.archive = h, buf.Bytes()
	f.mu.Unlock()
	return stream.SendAndClose(&basinv1.UploadBitsResponse{BitsDigest: "sha256:" + strings.Repeat("b", 64), Files: 2, FilesUploaded: 1})
}

func (f *fakeStaging) StageApp(_ context.Context, req *basinv1.StageAppRequest) (*basinv1.StageAppResponse, error) {
	f.mu.Lock()
	f.staged = req
	f.mu.Unlock()
	return &basinv1.StageAppResponse{TaskGuid: "staging-1"}, nil
}

type fakeLogs struct {
	basinv1.UnimplementedLogServiceServer
}

func (fakeLogs) StreamLogs(req *basinv1.StreamLogsRequest, stream basinv1.LogService_StreamLogsServer) error {
	for _, l := range []string{"-----> Ruby app detected", "-----> Compiling"} {
		stream.Send(&basinv1.StreamLogsResponse{Line: &basinv1.LogLine{Source: "STG", Text: l}})
	}
	return nil
}

type fakeBBS struct {
	basinv1.UnimplementedBBSServiceServer
	task *basinv1.Task
}

func (f *fakeBBS) GetTask(context.Context, *basinv1.GetTaskRequest) (*basinv1.GetTaskResponse, error) {
	return &basinv1.GetTaskResponse{Task: f.task}, nil
}

type fakeApps struct {
	basinv1.UnimplementedAppServiceServer
	mu      sync.Mutex
	droplet *basinv1.SetDropletRequest
}

func (f *fakeApps) SetPackage(_ context.Context, req *basinv1.SetPackageRequest) (*basinv1.SetPackageResponse, error) {
	return &basinv1.SetPackageResponse{}, nil
}

func (f *fakeApps) SetDroplet(_ context.Context, req *basinv1.SetDropletRequest) (*basinv1.SetDropletResponse, error) {
	f.mu.Lock()
	f.droplet = req
	f.mu.Unlock()
	return &basinv1.SetDropletResponse{}, nil
}

// fakeSession serves the fakes on an in-memory listener; staging nil
// leaves the StagingService unserved.
func fakeSession(t *testing.T, staging *fakeStaging, b *fakeBBS, a *fakeApps) (*session, *bytes.Buffer) {
	t.Helper()
	lis := bufconn.Listen(1 << 20)
	gs := grpc.NewServer()
	if staging != nil {
		basinv1.RegisterStagingServiceServer(gs, staging)
	}
	basinv1.RegisterLogServiceServer(gs, fakeLogs{})
	basinv1.RegisterBBSServiceServer(gs, b)
	basinv1.RegisterAppServiceServer(gs, a)
	go gs.Serve(lis)
	t.Cleanup(gs.Stop)
	conn, err := grpc.NewClient("passthrough:///fake", grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	var out bytes.Buffer
	return &session{
		bbs:     &bbs.Client{BBSServiceClient: basinv1.NewBBSServiceClient(conn)},
		apps:    basinv1.NewAppServiceClient(conn),
		staging: basinv1.NewStagingServiceClient(conn),
		logs:    basinv1.NewLogServiceClient(conn),
		ui:      &ui.UI{Out: &out, Err: &out},
	}, &out
}

func appDir(t *testing.T) string {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "unchanged.txt"), []byte("same as before"), 0o644)
	os.WriteFile(filepath.Join(dir, "app.rb"), []byte("puts 1"), 0o644)
	return dir
}

func stagingTask(t *testing.T, failed bool, res *basinv1.StagingResult, reason string) *basinv1.Task {
	b, err := protojson.Marshal(res)
	if err != nil {
		t.Fatal(err)
	}
	return &basinv1.Task{TaskGuid: "staging-1", State: basinv1.TaskState_TASK_STATE_COMPLETED, Failed: failed, FailureReason: reason, Result: string(b)}
}

func TestPushUploadsOnlyChangedFilesAndStages(t *testing.T) {
	st := &fakeStaging{}
	apps := &fakeApps{}
	s, out := fakeSession(t, st, &fakeBBS{task: stagingTask(t, false, &basinv1.StagingResult{
		DropletDigest: "sha256:" + strings.Repeat("d", 64), DetectedBuildpack: "ruby", StartCommand: "ruby app.rb"}, "")}, apps)
	app := &basinv1.App{Guid: "g-1", Name: "web", Stack: "bookworm", Buildpacks: []string{"ruby"}, Env: map[string]string{"K": "v"}}
	digest, err := uploadBits(context.Background(), s, app, appDir(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(st.header.GetMatched()) != 1 || st.header.GetMatched()[0].GetPath() != "unchanged.txt" || st.header.GetFormat() != "zip" || st.header.GetAppGuid() != "g-1" {
		t.Errorf("upload header %v", st.header)
	}
	zr, err := zip.NewReader(bytes.NewReader(st.archive), int64(len(st.archive)))
	if err != nil || len(zr.File) != 1 || zr.File[0].Name != "app.rb" {
		t.Fatalf("uploaded archive should hold only app.rb: %v %v", zr, err)
	}
	if !strings.Contains(out.String(), "Uploaded 1 file(s), 6B sent; 1 skipped as unchanged") {
		t.Errorf("upload summary:\n%s", out)
	}
	if err := stage(context.Background(), s, app, digest); err != nil {
		t.Fatal(err)
	}
	if st.staged.GetBitsDigest() != digest || st.staged.GetStack() != "bookworm" || st.staged.GetBuildpacks()[0] != "ruby" || st.staged.GetEnv()[0].GetName() != "K" {
		t.Errorf("StageApp got %v", st.staged)
	}
	for _, w := range []string{"Ruby app detected", "Compiling", "Staged with ruby; start command: ruby app.rb"} {
		if !strings.Contains(out.String(), w) {
			t.Errorf("output lacks %q:\n%s", w, out)
		}
	}
	if apps.droplet.GetDropletDigest() != "sha256:"+strings.Repeat("d", 64) || apps.droplet.GetStagedCommand() != "ruby app.rb" {
		t.Errorf("droplet recorded as %v", apps.droplet)
	}
}

func TestFailedStagingSaysWhereAndDesiresNothing(t *testing.T) {
	apps := &fakeApps{}
	tests := []struct {
		name string
		task *basinv1.Task
		want []string
	}{
		{"compile error", stagingTask(t, true, &basinv1.StagingResult{FailedPhase: "compile", ExitCode: 223, OutputTail: "app.rb:1: syntax error"}, "staging failed"),
			[]string{"staging failed in compile with exit code 223", "app.rb:1: syntax error", "Fix the app"}},
		{"nothing detected", stagingTask(t, true, &basinv1.StagingResult{FailedPhase: "detect", ExitCode: 222}, ""),
			[]string{"exit code 222", "No buildpack recognised the app"}},
		{"no result at all", &basinv1.Task{State: basinv1.TaskState_TASK_STATE_COMPLETED, Failed: true, FailureReason: "task timed out"},
			[]string{"staging failed: task timed out"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, _ := fakeSession(t, &fakeStaging{}, &fakeBBS{task: tt.task}, apps)
			err := stage(context.Background(), s, &basinv1.App{Name: "web"}, "sha256:"+strings.Repeat("b", 64))
			if err == nil {
				t.Fatal("failed staging returned no error")
			}
			msg := ui.Explain(err, "api")
			for _, w := range tt.want {
				if !strings.Contains(msg, w) {
					t.Errorf("message %q lacks %q", msg, w)
				}
			}
			if apps.droplet != nil {
				t.Error("a droplet was recorded for a failed staging")
			}
		})
	}
}

func TestPushWithoutStagingServiceAdvisesDroplet(t *testing.T) {
	s, _ := fakeSession(t, nil, &fakeBBS{}, &fakeApps{})
	_, err := uploadBits(context.Background(), s, &basinv1.App{Name: "web"}, appDir(t))
	if err == nil || !strings.Contains(ui.Explain(err, "api"), "--droplet") {
		t.Errorf("error %v does not advise --droplet", err)
	}
}

// TestEveryCommandHasHelpWithAnExample walks the command tree.
func TestEveryCommandHasHelpWithAnExample(t *testing.T) {
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		for _, sub := range c.Commands() {
			walk(sub)
		}
		if !c.Runnable() || c.Name() == "help" || c.Name() == "completion" || (c.HasParent() && c.Parent().Name() == "completion") {
			return
		}
		if c.Example == "" || c.Short == "" {
			t.Errorf("basin %s has no example or short help", c.CommandPath())
		}
	}
	walk(newRootCommand())
}

func TestPushPlansFromManifestAndFlags(t *testing.T) {
	dir := t.TempDir()
	mf := filepath.Join(dir, "m.yml")
	os.WriteFile(mf, []byte("applications:\n- name: a\n  instances: 2\n  memory: 128M\n  routes:\n  - route: a.example.com/api\n- name: b\n  no-route: true\n"), 0o644)
	cmd := newPushCommand()
	cmd.ParseFlags([]string{"-f", mf, "-m", "256M"})
	o := pushOptions{manifestPath: mf, memory: "256M"}
	ps, err := plans(cmd, nil, o)
	if err != nil {
		t.Fatal(err)
	}
	if len(ps) != 2 || *ps[0].Instances != 2 || *ps[0].MemoryMB != 256 || !ps[1].NoRoute {
		t.Fatalf("plans %+v", ps)
	}
	if rs := planRoutes(ps[0], "a", "apps.localhost", nil); len(rs) != 1 || rs[0].GetHost() != "a.example.com" || rs[0].GetPath() != "/api" {
		t.Errorf("routes %v", rs)
	}
	if rs := planRoutes(ps[1], "b", "apps.localhost", nil); rs == nil || len(rs) != 0 {
		t.Errorf("no-route gave %v", rs)
	}
	if rs := planRoutes(pushPlan{}, "My_App", "apps.localhost", nil); rs[0].GetHost() != "my-app.apps.localhost" {
		t.Errorf("default route %v", rs)
	}
	if rs := planRoutes(pushPlan{}, "a", "d", []*basinv1.Route{{Host: "kept"}}); rs != nil {
		t.Errorf("an app with routes got new ones: %v", rs)
	}
	// One app named from a several-app manifest; an unknown one fails.
	if ps, err := plans(cmd, []string{"b"}, o); err != nil || len(ps) != 1 || ps[0].Name != "b" {
		t.Errorf("named app: %v %v", ps, err)
	}
	if _, err := plans(cmd, []string{"c"}, o); err == nil {
		t.Error("an app missing from the manifest was accepted")
	}
}

func TestBuildpackPathsAreToldFromNames(t *testing.T) {
	dir := t.TempDir()
	os.Mkdir(filepath.Join(dir, "my-buildpack"), 0o755)
	os.WriteFile(filepath.Join(dir, "bp.tgz"), []byte("x"), 0o644)
	os.Mkdir(filepath.Join(dir, "ruby"), 0o755)
	t.Chdir(dir)
	for bp, want := range map[string]bool{
		"./my-buildpack": true, filepath.Join(dir, "my-buildpack"): true, "bp.tgz": true, "./bp.tgz": true,
		"ruby":      false, // an admin name, even with a directory of that name here
		"./missing": false, "sha256:" + strings.Repeat("a", 64): false,
	} {
		if got := isBuildpackPath(bp); got != want {
			t.Errorf("isBuildpackPath(%q) = %v, want %v", bp, got, want)
		}
	}
}
