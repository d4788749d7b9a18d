package apps

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/basinpaas/basin/bbs"
	"github.com/basinpaas/basin/bbs/embeddedetcd"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"
)

// The app layer's tests run against one real embedded etcd and a real BBS
// store; each test has its own key prefix.
var (
	testClient *clientv3.Client
	prefixSeq  atomic.Int64
)

func TestMain(m *testing.M) { os.Exit(runTests(m)) }

func runTests(m *testing.M) int {
	dir, err := os.MkdirTemp("", "apps-etcd-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	e, err := embeddedetcd.Start(ctx, embeddedetcd.Config{Dir: dir})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer e.Close()
	if testClient, err = e.Client(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer testClient.Close()
	return m.Run()
}

type env struct {
	ctx   context.Context
	store *bbs.Store
	api   *bbs.API
	svc   *Service
	cfg   Config
}

func newEnv(t *testing.T, cfg Config) *env {
	t.Helper()
	cfg.Prefix = fmt.Sprintf("/apps-test-%d/", prefixSeq.Add(1))
	if cfg.Domain == "" {
		cfg.Domain = "apps.example.com"
	}
	if cfg.DefaultStack == "" {
		cfg.DefaultStack = "tiny"
	}
	cfg.PollInterval, cfg.RouteSettle = 20*time.Millisecond, 50*time.Millisecond
	store := bbs.NewStore(testClient, bbs.StoreConfig{Prefix: cfg.Prefix})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); store.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	rctx, rcancel := context.WithTimeout(ctx, 10*time.Second)
	defer rcancel()
	if err := store.WaitReady(rctx); err != nil {
		t.Fatal(err)
	}
	api := bbs.NewAPI(store, bbs.Limits{})
	return &env{ctx: ctx, store: store, api: api, svc: New(testClient, api, store, cfg), cfg: cfg}
}

const digest = "sha256:0000000000000000000000000000000000000000000000000000000000000001"

func (e *env) pushed(t *testing.T, name string, instances int32) *basinv1.App {
	t.Helper()
	a, err := e.svc.CreateApp(e.ctx, &basinv1.CreateAppRequest{App: &basinv1.App{Name: name, Instances: instances, MemoryMb: 64,
		Routes: []*basinv1.Route{{Host: name + ".apps.example.com"}}, Env: map[string]string{"B": "2", "A": "1"}}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.svc.SetDroplet(e.ctx, &basinv1.SetDropletRequest{Name: name, DropletDigest: digest, StagedCommand: "./run"}); err != nil {
		t.Fatal(err)
	}
	r, err := e.svc.StartApp(e.ctx, &basinv1.StartAppRequest{Name: name})
	if err != nil {
		t.Fatal(err)
	}
	if r.GetApp().GetGuid() != a.GetApp().GetGuid() {
		t.Fatalf("start changed the app's guid")
	}
	return r.GetApp()
}

func (e *env) lrp(t *testing.T, pg string) *basinv1.DesiredLRP {
	t.Helper()
	d, err := e.api.GetDesiredLRP(e.ctx, &basinv1.GetDesiredLRPRequest{ProcessGuid: pg})
	if err != nil {
		t.Fatalf("LRP %s: %v", pg, err)
	}
	return d.GetDesiredLrp()
}

func (e *env) lrpGone(t *testing.T, pg string) {
	t.Helper()
	if _, err := e.api.GetDesiredLRP(e.ctx, &basinv1.GetDesiredLRPRequest{ProcessGuid: pg}); !errors.Is(err, bbs.ErrNotFound) {
		t.Errorf("LRP %s still there (%v)", pg, err)
	}
}

func TestCreateValidatesAndNamesTheField(t *testing.T) {
	e := newEnv(t, Config{})
	tests := []struct {
		name  string
		app   *basinv1.App
		field string
	}{
		{"no app", nil, "app"},
		{"no name", &basinv1.App{}, "app.name"},
		{"bad name", &basinv1.App{Name: "my app"}, "app.name"},
		{"negative instances", &basinv1.App{Name: "a", Instances: -1}, "app.instances"},
		{"huge memory", &basinv1.App{Name: "a", MemoryMb: 1 << 30}, "app.memory_mb"},
		{"bad env", &basinv1.App{Name: "a", Env: map[string]string{"1X": "y"}}, "app.env"},
		{"bad route", &basinv1.App{Name: "a", Routes: []*basinv1.Route{{Host: "Not_A_Host"}}}, "app.routes[0].host"},
		{"http check without path", &basinv1.App{Name: "a", HealthCheck: &basinv1.HealthCheck{Type: basinv1.HealthCheckType_HEALTH_CHECK_TYPE_HTTP}}, "app.health_check.http_endpoint"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := e.svc.CreateApp(e.ctx, &basinv1.CreateAppRequest{App: tt.app})
			var fe *bbs.FieldError
			if !errors.As(err, &fe) || fe.Field != tt.field || !errors.Is(err, bbs.ErrInvalid) {
				t.Fatalf("error %v, want an invalid-argument error naming %s", err, tt.field)
			}
		})
	}
	a, err := e.svc.CreateApp(e.ctx, &basinv1.CreateAppRequest{App: &basinv1.App{Name: "web"}})
	if err != nil {
		t.Fatal(err)
	}
	got := a.GetApp()
	if got.GetState() != basinv1.AppState_APP_STATE_STOPPED || got.GetMemoryMb() != 256 || got.GetStack() != "tiny" || got.GetGuid() == "" {
		t.Errorf("defaults not applied: %v", got)
	}
	if _, err := e.svc.CreateApp(e.ctx, &basinv1.CreateAppRequest{App: &basinv1.App{Name: "web"}}); !errors.Is(err, bbs.ErrAlreadyExists) {
		t.Errorf("second create: %v, want AlreadyExists", err)
	}
	if _, err := e.svc.GetApp(e.ctx, &basinv1.GetAppRequest{Name: "nope"}); !errors.Is(err, bbs.ErrNotFound) {
		t.Errorf("get missing app: %v, want NotFound", err)
	}
	if _, err := e.svc.StartApp(e.ctx, &basinv1.StartAppRequest{Name: "web"}); !errors.Is(err, bbs.ErrTransition) || !strings.Contains(err.Error(), "no droplet") {
		t.Errorf("start without droplet: %v, want FailedPrecondition saying there is no droplet", err)
	}
}

func TestStartDesiresTheAppsLRP(t *testing.T) {
	e := newEnv(t, Config{})
	a := e.pushed(t, "web", 2)
	pg := current(a)
	if a.GetState() != basinv1.AppState_APP_STATE_STARTED || pg != a.GetGuid()+"-v1" {
		t.Fatalf("started app: %v", a)
	}
	d := e.lrp(t, pg)
	s, r := d.GetSchedule(), d.GetRun()
	if s.GetDomain() != Domain || s.GetInstances() != 2 || s.GetStack() != "tiny" || s.GetResources().GetMemoryMb() != 64 ||
		len(s.GetRoutes()) != 1 || s.GetRoutes()[0].GetHost() != "web.apps.example.com" {
		t.Errorf("schedule %v", s)
	}
	if r.GetDroplet().GetDigest() != digest || r.GetAppName() != "web" || r.GetAppGuid() != a.GetGuid() || r.GetAppVersion() != pg || len(r.GetEnv()) != 2 || r.GetEnv()[0].GetName() != "A" || r.GetPorts()[0] != AppPort {
		t.Errorf("run %v", r)
	}
	// Starting a started app changes nothing.
	again, err := e.svc.StartApp(e.ctx, &basinv1.StartAppRequest{Name: "web"})
	if err != nil || current(again.GetApp()) != pg {
		t.Errorf("second start: %v %v", again, err)
	}
	// Stop removes the LRP and keeps the settings.
	stopped, err := e.svc.StopApp(e.ctx, &basinv1.StopAppRequest{Name: "web"})
	if err != nil || stopped.GetApp().GetState() != basinv1.AppState_APP_STATE_STOPPED || stopped.GetApp().GetInstances() != 2 {
		t.Fatalf("stop: %v %v", stopped, err)
	}
	e.lrpGone(t, pg)
}

func TestRestartWithNewEnvIsANewVersion(t *testing.T) {
	e := newEnv(t, Config{})
	a := e.pushed(t, "web", 1)
	old := current(a)
	if _, err := e.svc.UpdateEnv(e.ctx, &basinv1.UpdateEnvRequest{Name: "web", Set: map[string]string{"GREETING": "hi"}, Unset: []string{"B"}}); err != nil {
		t.Fatal(err)
	}
	// The running version keeps its env until the restart.
	if env := e.lrp(t, old).GetRun().GetEnv(); len(env) != 2 {
		t.Errorf("env changed before restart: %v", env)
	}
	r, err := e.svc.RestartApp(e.ctx, &basinv1.RestartAppRequest{Name: "web"})
	if err != nil {
		t.Fatal(err)
	}
	pg := current(r.GetApp())
	if pg == old || len(r.GetApp().GetProcessGuids()) != 1 {
		t.Fatalf("restart kept %v", r.GetApp().GetProcessGuids())
	}
	e.lrpGone(t, old)
	env := e.lrp(t, pg).GetRun().GetEnv()
	if len(env) != 2 || env[0].GetName() != "A" || env[1].GetName() != "GREETING" || env[1].GetValue() != "hi" {
		t.Errorf("new version's env %v", env)
	}
}

func TestScale(t *testing.T) {
	e := newEnv(t, Config{})
	a := e.pushed(t, "web", 1)
	pg := current(a)
	n := int32(4)
	r, err := e.svc.ScaleApp(e.ctx, &basinv1.ScaleAppRequest{Name: "web", Instances: &n})
	if err != nil || r.GetRestarted() || current(r.GetApp()) != pg {
		t.Fatalf("scale out: %v %v", r, err)
	}
	if got := e.lrp(t, pg).GetSchedule().GetInstances(); got != 4 {
		t.Errorf("LRP has %d instances, want 4", got)
	}
	mem := int64(128)
	r, err = e.svc.ScaleApp(e.ctx, &basinv1.ScaleAppRequest{Name: "web", MemoryMb: &mem})
	if err != nil || !r.GetRestarted() || current(r.GetApp()) == pg {
		t.Fatalf("scale memory: %v %v", r, err)
	}
	if d := e.lrp(t, current(r.GetApp())); d.GetSchedule().GetResources().GetMemoryMb() != 128 || d.GetSchedule().GetInstances() != 4 {
		t.Errorf("new version %v", d.GetSchedule())
	}
	e.lrpGone(t, pg)
	bad := int32(-2)
	if _, err := e.svc.ScaleApp(e.ctx, &basinv1.ScaleAppRequest{Name: "web", Instances: &bad}); !errors.Is(err, bbs.ErrInvalid) {
		t.Errorf("negative scale: %v", err)
	}
}

// cell plays a cell for the app layer: it claims and starts every
// unclaimed instance of the apps domain and writes its route endpoints,
// as a real cell does once an instance is healthy.
type cell struct {
	e     *env
	fence *basinv1.Fence
	id    string
	mu    sync.Mutex
	seq   int
}

func startCell(t *testing.T, e *env, id string) *cell {
	t.Helper()
	key := e.store.Keys().Cell(id)
	resp, err := testClient.Put(e.ctx, key, "")
	if err != nil {
		t.Fatal(err)
	}
	c := &cell{e: e, id: id, fence: &basinv1.Fence{Key: key, CreateRevision: resp.Header.Revision}}
	ctx, cancel := context.WithCancel(e.ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			c.step(ctx)
			select {
			case <-ctx.Done():
			case <-time.After(10 * time.Millisecond):
			}
		}
	}()
	t.Cleanup(func() { cancel(); <-done })
	return c
}

func (c *cell) step(ctx context.Context) {
	list, err := c.e.api.ListActualLRPs(ctx, &basinv1.ListActualLRPsRequest{Domain: Domain})
	if err != nil {
		return
	}
	for _, a := range list.GetActualLrps() {
		if a.GetState() != basinv1.ActualLRPState_ACTUAL_LRP_STATE_UNCLAIMED {
			continue
		}
		c.mu.Lock()
		c.seq++
		ik := &basinv1.ActualLRPInstanceKey{InstanceGuid: fmt.Sprintf("i-%d", c.seq), CellId: c.id}
		c.mu.Unlock()
		if _, err := c.e.api.ClaimActualLRP(ctx, &basinv1.ClaimActualLRPRequest{Key: a.GetKey(), InstanceKey: ik, Fence: c.fence}); err != nil {
			continue
		}
		ni := &basinv1.ActualLRPNetInfo{Address: "127.0.0.1", Ports: []*basinv1.PortMapping{{ContainerPort: 8080, HostPort: 40000}}}
		if _, err := c.e.api.StartActualLRP(ctx, &basinv1.StartActualLRPRequest{Key: a.GetKey(), InstanceKey: ik, NetInfo: ni, Fence: c.fence}); err != nil {
			continue
		}
		d, err := c.e.api.GetDesiredLRP(ctx, &basinv1.GetDesiredLRPRequest{ProcessGuid: a.GetKey().GetProcessGuid()})
		if err != nil {
			continue
		}
		for _, r := range d.GetDesiredLrp().GetSchedule().GetRoutes() {
			ep := &basinv1.RouteEndpoint{Host: r.GetHost(), ProcessGuid: a.GetKey().GetProcessGuid(), Index: a.GetKey().GetIndex(), InstanceGuid: ik.GetInstanceGuid(), Address: "127.0.0.1", Port: 40000}
			b, _ := proto.Marshal(ep)
			testClient.Put(ctx, c.e.store.Keys().Route(r.GetHost(), r.GetPath(), a.GetKey().GetProcessGuid(), a.GetKey().GetIndex()), string(b))
		}
	}
}

func (c *cell) crash(t *testing.T, pg string, index int32) {
	t.Helper()
	a, err := c.e.api.GetActualLRP(c.e.ctx, &basinv1.GetActualLRPRequest{ProcessGuid: pg, Index: index})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.e.api.CrashActualLRP(c.e.ctx, &basinv1.CrashActualLRPRequest{Key: a.GetActualLrp().GetKey(), InstanceKey: a.GetActualLrp().GetInstanceKey(),
		Reason: "exited with status 3; last output:\nboom", Fence: c.fence}); err != nil {
		t.Fatal(err)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (e *env) running(t *testing.T, name string) (cur, all int) {
	r, err := e.svc.GetApp(e.ctx, &basinv1.GetAppRequest{Name: name})
	if err != nil {
		t.Fatal(err)
	}
	for _, in := range r.GetInstances() {
		if in.GetState() == basinv1.ActualLRPState_ACTUAL_LRP_STATE_RUNNING {
			all++
			if in.GetCurrent() && in.GetRoutable() {
				cur++
			}
		}
	}
	return cur, all
}

// runTwoReplicas runs e's app layer and a second one on the same store (two
// BBS replicas) until the test ends.
func (e *env) runTwoReplicas(t *testing.T) {
	other := New(testClient, e.api, e.store, e.cfg)
	ctx, cancel := context.WithCancel(e.ctx)
	var wg sync.WaitGroup
	for _, s := range []*Service{e.svc, other} {
		wg.Go(func() { s.Run(ctx) })
	}
	t.Cleanup(func() { cancel(); wg.Wait() })
}

// TestCrashesAreRecordedOnce runs two app layers (two BBS replicas) on one
// store: a crash shows up once in the app's events, with index and reason.
func TestCrashesAreRecordedOnce(t *testing.T) {
	e := newEnv(t, Config{})
	e.runTwoReplicas(t)
	c := startCell(t, e, "cell-1")
	a := e.pushed(t, "crashy", 2)
	waitFor(t, "2 running instances", func() bool { n, _ := e.running(t, "crashy"); return n == 2 })
	time.Sleep(50 * time.Millisecond) // both recorders subscribed well before the crash
	c.crash(t, current(a), 1)
	var crashes []*basinv1.AppEvent
	waitFor(t, "the crash event", func() bool {
		r, err := e.svc.ListAppEvents(e.ctx, &basinv1.ListAppEventsRequest{Name: "crashy"})
		if err != nil {
			t.Fatal(err)
		}
		crashes = slices.DeleteFunc(r.GetEvents(), func(ev *basinv1.AppEvent) bool { return ev.GetType() != "app.crash" })
		return len(crashes) > 0
	})
	time.Sleep(200 * time.Millisecond)
	r, _ := e.svc.ListAppEvents(e.ctx, &basinv1.ListAppEventsRequest{Name: "crashy"})
	crashes = slices.DeleteFunc(r.GetEvents(), func(ev *basinv1.AppEvent) bool { return ev.GetType() != "app.crash" })
	if len(crashes) != 1 {
		t.Fatalf("%d crash events, want 1: %v", len(crashes), crashes)
	}
	ev := crashes[0]
	if ev.GetIndex() != 1 || !strings.Contains(ev.GetExitReason(), "exited with status 3") || ev.GetCrashCount() != 1 ||
		!strings.Contains(ev.GetDescription(), "index: 1") {
		t.Errorf("crash event %v", ev)
	}
}

// A completed task moves into its app's history once, however many app
// layers follow the BBS, and is resolved there; tasks keep listing it.
func TestCompletedTasksAreKeptAndResolved(t *testing.T) {
	e := newEnv(t, Config{})
	e.runTwoReplicas(t)
	c := startCell(t, e, "cell-1")
	e.pushed(t, "jobs", 1)
	time.Sleep(50 * time.Millisecond) // both followers subscribed
	run, err := e.svc.RunTask(e.ctx, &basinv1.RunTaskRequest{Name: "jobs", Command: "exit 3", TaskName: "migrate"})
	if err != nil {
		t.Fatal(err)
	}
	guid := run.GetTask().GetTaskGuid()
	if _, err := e.api.StartTask(e.ctx, &basinv1.StartTaskRequest{TaskGuid: guid, CellId: c.id, Fence: c.fence}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.api.CompleteTask(e.ctx, &basinv1.CompleteTaskRequest{TaskGuid: guid, CellId: c.id, Failed: true,
		FailureReason: "exited with status 3", Fence: c.fence}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the task resolved in the BBS", func() bool {
		_, err := e.api.GetTask(e.ctx, &basinv1.GetTaskRequest{TaskGuid: guid})
		return errors.Is(err, bbs.ErrNotFound)
	})
	time.Sleep(100 * time.Millisecond) // the other replica has seen it too
	r, err := e.svc.ListAppTasks(e.ctx, &basinv1.ListAppTasksRequest{Name: "jobs"})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.GetTasks()) != 1 {
		t.Fatalf("%d tasks listed, want the completed one once: %v", len(r.GetTasks()), r.GetTasks())
	}
	got := r.GetTasks()[0]
	if got.GetTaskName() != "migrate" || got.GetTask().GetState() != basinv1.TaskState_TASK_STATE_COMPLETED ||
		!got.GetTask().GetFailed() || got.GetTask().GetFailureReason() != "exited with status 3" {
		t.Errorf("listed %v", got)
	}
	if _, err := e.svc.DeleteApp(e.ctx, &basinv1.DeleteAppRequest{Name: "jobs"}); err != nil {
		t.Fatal(err)
	}
	if n := countKeys(t, e.cfg.Prefix+"apptasks/"); n != 0 {
		t.Errorf("%d kept tasks left after delete", n)
	}
}

func TestEventsAreBounded(t *testing.T) {
	e := newEnv(t, Config{MaxEvents: 5})
	if _, err := e.svc.CreateApp(e.ctx, &basinv1.CreateAppRequest{App: &basinv1.App{Name: "web"}}); err != nil {
		t.Fatal(err)
	}
	for i := range 10 {
		if _, err := e.svc.UpdateEnv(e.ctx, &basinv1.UpdateEnvRequest{Name: "web", Set: map[string]string{"N": fmt.Sprint(i)}}); err != nil {
			t.Fatal(err)
		}
	}
	r, err := e.svc.ListAppEvents(e.ctx, &basinv1.ListAppEventsRequest{Name: "web"})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.GetEvents()) != 5 {
		t.Fatalf("%d events kept, want 5", len(r.GetEvents()))
	}
	for i := 1; i < len(r.GetEvents()); i++ {
		if r.GetEvents()[i].GetTimeUnixNano() < r.GetEvents()[i-1].GetTimeUnixNano() {
			t.Errorf("events out of order: %v", r.GetEvents())
		}
	}
}

func TestRoutesAndDelete(t *testing.T) {
	e := newEnv(t, Config{})
	a := e.pushed(t, "web", 1)
	extra := &basinv1.Route{Host: "www.example.com", Path: "/api"}
	if _, err := e.svc.MapRoute(e.ctx, &basinv1.MapRouteRequest{Name: "web", Route: extra}); err != nil {
		t.Fatal(err)
	}
	if rs := e.lrp(t, current(a)).GetSchedule().GetRoutes(); len(rs) != 2 {
		t.Errorf("running LRP routes %v, want the new one too", rs)
	}
	if _, err := e.svc.UnmapRoute(e.ctx, &basinv1.UnmapRouteRequest{Name: "web", Route: &basinv1.Route{Host: "other.example.com"}}); !errors.Is(err, bbs.ErrNotFound) {
		t.Errorf("unmap of an unmapped route: %v", err)
	}
	if _, err := e.svc.MapRoute(e.ctx, &basinv1.MapRouteRequest{Name: "web", Route: &basinv1.Route{Host: "UPPER"}}); !errors.Is(err, bbs.ErrInvalid) {
		t.Errorf("bad route mapped: %v", err)
	}
	routes := func() map[string][]string {
		r, err := e.svc.ListRoutes(e.ctx, &basinv1.ListRoutesRequest{})
		if err != nil {
			t.Fatal(err)
		}
		m := map[string][]string{}
		for _, b := range r.GetRoutes() {
			m[RouteString(b.GetRoute())] = b.GetApps()
		}
		return m
	}
	if got := routes(); len(got) != 2 || len(got["www.example.com/api"]) != 1 {
		t.Errorf("routes %v", got)
	}
	// delete keeps the routes, unmapped; delete -r removes them.
	if _, err := e.svc.DeleteApp(e.ctx, &basinv1.DeleteAppRequest{Name: "web"}); err != nil {
		t.Fatal(err)
	}
	e.lrpGone(t, current(a))
	if got := routes(); len(got) != 2 || len(got["web.apps.example.com"]) != 0 {
		t.Errorf("after delete: routes %v, want both kept without apps", got)
	}
	if n := countKeys(t, e.cfg.Prefix+"appevents/"); n != 0 {
		t.Errorf("%d events left after delete", n)
	}
	b := e.pushed(t, "shop", 1)
	if _, err := e.svc.DeleteApp(e.ctx, &basinv1.DeleteAppRequest{Name: "shop", DeleteRoutes: true}); err != nil {
		t.Fatal(err)
	}
	e.lrpGone(t, current(b))
	if _, ok := routes()["shop.apps.example.com"]; ok {
		t.Error("delete -r kept the app's route")
	}
}

func TestDeleteRoute(t *testing.T) {
	e := newEnv(t, Config{})
	a := e.pushed(t, "api", 1)
	e.pushed(t, "admin", 1)
	shared := &basinv1.Route{Host: "shared.example.com"}
	for _, app := range []string{"api", "admin"} {
		if _, err := e.svc.MapRoute(e.ctx, &basinv1.MapRouteRequest{Name: app, Route: shared}); err != nil {
			t.Fatal(err)
		}
	}
	resp, err := e.svc.DeleteRoute(e.ctx, &basinv1.DeleteRouteRequest{Route: shared})
	if err != nil {
		t.Fatal(err)
	}
	if got := resp.GetApps(); len(got) != 2 {
		t.Errorf("unmapped from %v, want both apps", got)
	}
	for _, app := range []string{"api", "admin"} {
		got, err := e.svc.GetApp(e.ctx, &basinv1.GetAppRequest{Name: app})
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range got.GetApp().GetRoutes() {
			if r.GetHost() == shared.GetHost() {
				t.Errorf("app %s still has the deleted route", app)
			}
		}
	}
	if rs := e.lrp(t, current(a)).GetSchedule().GetRoutes(); len(rs) != 1 {
		t.Errorf("running LRP routes %v, want only the app's own", rs)
	}
	rs, err := e.svc.ListRoutes(e.ctx, &basinv1.ListRoutesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range rs.GetRoutes() {
		if b.GetRoute().GetHost() == shared.GetHost() {
			t.Errorf("the route is still listed: %v", b)
		}
	}
	for _, tc := range []struct {
		name  string
		route *basinv1.Route
		want  error
	}{
		{"again", shared, bbs.ErrNotFound},
		{"never existed", &basinv1.Route{Host: "nope.example.com"}, bbs.ErrNotFound},
		{"invalid", &basinv1.Route{Host: "UPPER"}, bbs.ErrInvalid},
	} {
		if _, err := e.svc.DeleteRoute(e.ctx, &basinv1.DeleteRouteRequest{Route: tc.route}); !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
		}
	}
}

func countKeys(t *testing.T, prefix string) int {
	t.Helper()
	resp, err := testClient.Get(context.Background(), prefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	return int(resp.Count)
}

// TestRollingDeploy checks the rolling deploy's invariant: at every step the
// routed new instances plus the old instances still desired cover the app's
// instance count, and the old version goes at the end.
func TestRollingDeploy(t *testing.T) {
	e := newEnv(t, Config{})
	startCell(t, e, "cell-1")
	a := e.pushed(t, "web", 3)
	old := current(a)
	waitFor(t, "3 running instances", func() bool { n, _ := e.running(t, "web"); return n == 3 })
	var steps []*basinv1.RollAppResponse
	got, err := e.svc.roll(e.ctx, "web", 10*time.Second, func(p *basinv1.RollAppResponse) error {
		steps = append(steps, p)
		if p.GetNewRoutable()+p.GetOldInstances() < p.GetInstances() {
			t.Errorf("capacity dipped: %d new routed + %d old < %d", p.GetNewRoutable(), p.GetOldInstances(), p.GetInstances())
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	last := steps[len(steps)-1]
	if !last.GetDone() || last.GetOldInstances() != 0 || last.GetNewRoutable() != 3 || last.GetOldProcessGuid() != old {
		t.Errorf("last step %v", last)
	}
	if pgs := got.GetProcessGuids(); len(pgs) != 1 || pgs[0] == old {
		t.Errorf("process guids after the deploy: %v", pgs)
	}
	e.lrpGone(t, old)

	// A new version that crashes is rolled back: the old one is whole again.
	cur := current(got)
	stop := make(chan struct{})
	go func() {
		// Crash the new version's instance 0 as soon as it runs.
		defer close(stop)
		for range 500 {
			r, _ := e.svc.GetApp(e.ctx, &basinv1.GetAppRequest{Name: "web"})
			for _, in := range r.GetInstances() {
				if in.GetCurrent() && in.GetProcessGuid() != cur && in.GetState() == basinv1.ActualLRPState_ACTUAL_LRP_STATE_RUNNING {
					key := e.store.Keys().Cell("cell-1")
					kv, _ := testClient.Get(e.ctx, key)
					f := &basinv1.Fence{Key: key, CreateRevision: kv.Kvs[0].CreateRevision}
					al, _ := e.api.GetActualLRP(e.ctx, &basinv1.GetActualLRPRequest{ProcessGuid: in.GetProcessGuid(), Index: in.GetIndex()})
					e.api.CrashActualLRP(e.ctx, &basinv1.CrashActualLRPRequest{Key: al.GetActualLrp().GetKey(), InstanceKey: al.GetActualLrp().GetInstanceKey(), Reason: "boom", Fence: f})
					return
				}
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()
	e.svc.cfg.RouteSettle = time.Second // the crash lands before any old instance goes
	_, err = e.svc.roll(e.ctx, "web", 10*time.Second, func(*basinv1.RollAppResponse) error { return nil })
	<-stop
	if !errors.Is(err, bbs.ErrTransition) || !strings.Contains(err.Error(), "crashed") {
		t.Fatalf("roll onto a crashing version: %v, want a failure naming the crash", err)
	}
	r, err := e.svc.GetApp(e.ctx, &basinv1.GetAppRequest{Name: "web"})
	if err != nil {
		t.Fatal(err)
	}
	if pgs := r.GetApp().GetProcessGuids(); len(pgs) != 1 || pgs[0] != cur {
		t.Errorf("after the failed deploy the app runs %v, want %s", pgs, cur)
	}
	if n := e.lrp(t, cur).GetSchedule().GetInstances(); n != 3 {
		t.Errorf("old version has %d instances after the rollback, want 3", n)
	}
}

// TestReconcileRepairsAppsAndLRPs: a started app whose LRP went gets it
// back; an old LRP of the apps domain that no app names is removed; a young
// one (being desired right now) is left alone.
func TestReconcileRepairsAppsAndLRPs(t *testing.T) {
	e := newEnv(t, Config{})
	a := e.pushed(t, "web", 2)
	pg := current(a)
	if _, err := e.api.RemoveDesiredLRP(e.ctx, &basinv1.RemoveDesiredLRPRequest{ProcessGuid: pg}); err != nil {
		t.Fatal(err)
	}
	orphan := desireRequest(a, "someone-v9", 1)
	if _, err := e.api.DesireLRP(e.ctx, orphan); err != nil {
		t.Fatal(err)
	}
	if err := e.svc.reconcile(e.ctx); err != nil {
		t.Fatal(err)
	}
	if n := e.lrp(t, pg).GetSchedule().GetInstances(); n != 2 {
		t.Errorf("the app's LRP came back with %d instances, want 2", n)
	}
	e.lrp(t, "someone-v9") // too young to go
	e.svc.now = func() time.Time { return time.Now().Add(2 * time.Minute) }
	if err := e.svc.reconcile(e.ctx); err != nil {
		t.Fatal(err)
	}
	e.lrpGone(t, "someone-v9")
	e.lrp(t, pg)
}

// A completion no follower saw (here none runs) is kept by the reconciler.
func TestReconcileKeepsMissedTaskCompletions(t *testing.T) {
	e := newEnv(t, Config{})
	c := startCell(t, e, "cell-1")
	e.pushed(t, "jobs", 1)
	run, err := e.svc.RunTask(e.ctx, &basinv1.RunTaskRequest{Name: "jobs", Command: "true"})
	if err != nil {
		t.Fatal(err)
	}
	guid := run.GetTask().GetTaskGuid()
	if _, err := e.api.StartTask(e.ctx, &basinv1.StartTaskRequest{TaskGuid: guid, CellId: c.id, Fence: c.fence}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.api.CompleteTask(e.ctx, &basinv1.CompleteTaskRequest{TaskGuid: guid, CellId: c.id, Fence: c.fence}); err != nil {
		t.Fatal(err)
	}
	if err := e.svc.reconcile(e.ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := e.api.GetTask(e.ctx, &basinv1.GetTaskRequest{TaskGuid: guid}); !errors.Is(err, bbs.ErrNotFound) {
		t.Errorf("the completed task is still in the BBS: %v", err)
	}
	r, err := e.svc.ListAppTasks(e.ctx, &basinv1.ListAppTasksRequest{Name: "jobs"})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.GetTasks()) != 1 || r.GetTasks()[0].GetTask().GetState() != basinv1.TaskState_TASK_STATE_COMPLETED || r.GetTasks()[0].GetTask().GetFailed() {
		t.Errorf("tasks %v, want the one that succeeded", r.GetTasks())
	}
}

// TestRollStoppedApp: a rolling deploy of an app with no LRP running has no
// old version to remove at the end.
func TestRollStoppedApp(t *testing.T) {
	e := newEnv(t, Config{})
	startCell(t, e, "cell-1")
	e.pushed(t, "web", 1)
	if _, err := e.svc.StopApp(e.ctx, &basinv1.StopAppRequest{Name: "web"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.svc.roll(e.ctx, "web", 10*time.Second, func(*basinv1.RollAppResponse) error { return nil }); err != nil {
		t.Fatalf("roll of a stopped app: %v", err)
	}
}
