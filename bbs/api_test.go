package bbs

import (
	"context"
	"strings"
	"testing"
	"time"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// startServer runs a BBS on loopback under a fresh prefix and returns a
// client that sends the token.
func startServer(t *testing.T, cfg Config) (*Server, *Client) {
	t.Helper()
	cfg.ListenAddress = "127.0.0.1:0"
	if cfg.Store.Prefix == "" {
		cfg.Store.Prefix = testPrefix()
	}
	srv, err := NewServer(testClient, cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); srv.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	cli, err := Dial(ClientConfig{Address: srv.Addr(), Token: cfg.Token})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	rctx, rcancel := context.WithTimeout(ctx, 10*time.Second)
	defer rcancel()
	if err := cli.WaitReady(rctx); err != nil {
		t.Fatal(err)
	}
	return srv, cli
}

func validDesire() *basinv1.DesireLRPRequest {
	return &basinv1.DesireLRPRequest{Schedule: testSchedule("app", 2), Run: testRun()}
}

func TestValidationNamesTheField(t *testing.T) {
	_, cli := startServer(t, Config{Limits: Limits{MaxInstances: 100}})
	ctx := context.Background()
	desire := func(mut func(*basinv1.DesireLRPRequest)) func() error {
		return func() error {
			r := validDesire()
			mut(r)
			_, err := cli.DesireLRP(ctx, r)
			return err
		}
	}
	fence := &basinv1.Fence{Key: "/x", CreateRevision: 1}
	tests := []struct {
		name  string
		call  func() error
		field string
	}{
		{"negative instances", desire(func(r *basinv1.DesireLRPRequest) { r.Schedule.Instances = -1 }), "schedule.instances"},
		{"too many instances", desire(func(r *basinv1.DesireLRPRequest) { r.Schedule.Instances = 101 }), "schedule.instances"},
		{"guid with slash", desire(func(r *basinv1.DesireLRPRequest) { r.Schedule.ProcessGuid = "a/b" }), "schedule.process_guid"},
		{"empty guid", desire(func(r *basinv1.DesireLRPRequest) { r.Schedule.ProcessGuid = "" }), "schedule.process_guid"},
		{"zero memory", desire(func(r *basinv1.DesireLRPRequest) { r.Schedule.Resources.MemoryMb = 0 }), "schedule.resources.memory_mb"},
		{"huge disk", desire(func(r *basinv1.DesireLRPRequest) { r.Schedule.Resources.DiskMb = 1 << 40 }), "schedule.resources.disk_mb"},
		{"zero pids", desire(func(r *basinv1.DesireLRPRequest) { r.Schedule.Resources.Pids = 0 }), "schedule.resources.pids"},
		{"no resources", desire(func(r *basinv1.DesireLRPRequest) { r.Schedule.Resources = nil }), "schedule.resources"},
		{"no stack", desire(func(r *basinv1.DesireLRPRequest) { r.Schedule.Stack = "" }), "schedule.stack"},
		{"bad route host", desire(func(r *basinv1.DesireLRPRequest) { r.Schedule.Routes[0].Host = "Bad_Host!" }), "schedule.routes[0].host"},
		{"wildcard in the middle", desire(func(r *basinv1.DesireLRPRequest) { r.Schedule.Routes[0].Host = "a.*.example.com" }), "schedule.routes[0].host"},
		{"bad route path", desire(func(r *basinv1.DesireLRPRequest) { r.Schedule.Routes[0].Path = "no-slash" }), "schedule.routes[0].path"},
		{"bad env name", desire(func(r *basinv1.DesireLRPRequest) {
			r.Run.Env = []*basinv1.EnvVar{{Name: "OK", Value: "1"}, {Name: "1BAD", Value: "x"}}
		}), "run.env[1].name"},
		{"huge env", desire(func(r *basinv1.DesireLRPRequest) {
			r.Run.Env = []*basinv1.EnvVar{{Name: "BIG", Value: strings.Repeat("x", 200*1024)}}
		}), "run.env"},
		{"bad droplet digest", desire(func(r *basinv1.DesireLRPRequest) { r.Run.Droplet = &basinv1.DropletRef{Digest: "md5:abc"} }), "run.droplet.digest"},
		{"http check without path", desire(func(r *basinv1.DesireLRPRequest) {
			r.Run.HealthCheck = &basinv1.HealthCheck{Type: basinv1.HealthCheckType_HEALTH_CHECK_TYPE_HTTP}
		}), "run.health_check.http_endpoint"},
		{"port zero", desire(func(r *basinv1.DesireLRPRequest) { r.Run.Ports = []uint32{0} }), "run.ports[0]"},
		{"no run", desire(func(r *basinv1.DesireLRPRequest) { r.Run = nil }), "run"},
		{"huge annotation", desire(func(r *basinv1.DesireLRPRequest) { r.Schedule.Annotation = strings.Repeat("a", 11*1024) }), "schedule.annotation"},
		{"claim without fence", func() error {
			_, err := cli.ClaimActualLRP(ctx, &basinv1.ClaimActualLRPRequest{
				Key: &basinv1.ActualLRPKey{ProcessGuid: "app"}, InstanceKey: &basinv1.ActualLRPInstanceKey{InstanceGuid: "i", CellId: "c"}})
			return err
		}, "fence"},
		{"claim fenced by another key", func() error {
			_, err := cli.ClaimActualLRP(ctx, &basinv1.ClaimActualLRPRequest{
				Key: &basinv1.ActualLRPKey{ProcessGuid: "app"}, InstanceKey: &basinv1.ActualLRPInstanceKey{InstanceGuid: "i", CellId: "c"}, Fence: fence})
			return err
		}, "fence.key"},
		{"claim negative index", func() error {
			_, err := cli.ClaimActualLRP(ctx, &basinv1.ClaimActualLRPRequest{
				Key: &basinv1.ActualLRPKey{ProcessGuid: "app", Index: -1}, InstanceKey: &basinv1.ActualLRPInstanceKey{InstanceGuid: "i", CellId: "c"}, Fence: fence})
			return err
		}, "key.index"},
		{"claim without instance guid", func() error {
			_, err := cli.ClaimActualLRP(ctx, &basinv1.ClaimActualLRPRequest{
				Key: &basinv1.ActualLRPKey{ProcessGuid: "app"}, InstanceKey: &basinv1.ActualLRPInstanceKey{CellId: "c"}, Fence: fence})
			return err
		}, "instance_key.instance_guid"},
		{"scale below zero", func() error {
			n := int32(-5)
			_, err := cli.UpdateDesiredLRP(ctx, &basinv1.UpdateDesiredLRPRequest{ProcessGuid: "app", Instances: &n})
			return err
		}, "instances"},
		{"task without command", func() error {
			_, err := cli.DesireTask(ctx, &basinv1.DesireTaskRequest{TaskGuid: "t", Definition: &basinv1.TaskDefinition{
				Stack: "tiny", Resources: &basinv1.ResourceLimits{MemoryMb: 1, DiskMb: 1, Pids: 1}}})
			return err
		}, "definition.command"},
		{"fail with a foreign fence", func() error {
			_, err := cli.FailActualLRP(ctx, &basinv1.FailActualLRPRequest{Key: &basinv1.ActualLRPKey{ProcessGuid: "app"}, PlacementError: "x", Fence: fence})
			return err
		}, "fence.key"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			if status.Code(err) != codes.InvalidArgument {
				t.Fatalf("got %v, want InvalidArgument", err)
			}
			if msg := status.Convert(err).Message(); !strings.HasPrefix(msg, tc.field+": ") {
				t.Errorf("message %q does not start with the field %q", msg, tc.field)
			}
		})
	}
}

func TestTransitionCodes(t *testing.T) {
	srv, cli := startServer(t, Config{})
	ctx := context.Background()
	s := srv.Store()
	if _, err := cli.DesireLRP(ctx, validDesire()); err != nil {
		t.Fatal(err)
	}
	fa, fb := registerCell(t, s, "cell-a"), registerCell(t, s, "cell-b")
	ika := &basinv1.ActualLRPInstanceKey{InstanceGuid: "ia", CellId: "cell-a"}
	ikb := &basinv1.ActualLRPInstanceKey{InstanceGuid: "ib", CellId: "cell-b"}
	k0 := &basinv1.ActualLRPKey{ProcessGuid: "app", Index: 0}
	k1 := &basinv1.ActualLRPKey{ProcessGuid: "app", Index: 1}
	net := &basinv1.ActualLRPNetInfo{Address: "127.0.0.1", Ports: []*basinv1.PortMapping{{ContainerPort: 8080, HostPort: 61000}}}
	if _, err := cli.ClaimActualLRP(ctx, &basinv1.ClaimActualLRPRequest{Key: k0, InstanceKey: ika, Fence: fa}); err != nil {
		t.Fatal(err)
	}
	staleFence := proto.Clone(fa).(*basinv1.Fence)
	staleFence.CreateRevision--

	tests := []struct {
		name string
		call func() error
		want codes.Code
	}{
		{"desire twice", func() error { _, err := cli.DesireLRP(ctx, validDesire()); return err }, codes.AlreadyExists},
		{"get unknown desired", func() error {
			_, err := cli.GetDesiredLRP(ctx, &basinv1.GetDesiredLRPRequest{ProcessGuid: "nope"})
			return err
		}, codes.NotFound},
		{"update unknown", func() error {
			n := int32(1)
			_, err := cli.UpdateDesiredLRP(ctx, &basinv1.UpdateDesiredLRPRequest{ProcessGuid: "nope", Instances: &n})
			return err
		}, codes.NotFound},
		{"claim unknown instance", func() error {
			_, err := cli.ClaimActualLRP(ctx, &basinv1.ClaimActualLRPRequest{Key: &basinv1.ActualLRPKey{ProcessGuid: "app", Index: 7}, InstanceKey: ika, Fence: fa})
			return err
		}, codes.NotFound},
		{"claim what another cell claimed", func() error {
			_, err := cli.ClaimActualLRP(ctx, &basinv1.ClaimActualLRPRequest{Key: k0, InstanceKey: ikb, Fence: fb})
			return err
		}, codes.FailedPrecondition},
		{"start what another cell claimed", func() error {
			_, err := cli.StartActualLRP(ctx, &basinv1.StartActualLRPRequest{Key: k0, InstanceKey: ikb, NetInfo: net, Fence: fb})
			return err
		}, codes.FailedPrecondition},
		{"crash what another cell claimed", func() error {
			_, err := cli.CrashActualLRP(ctx, &basinv1.CrashActualLRPRequest{Key: k0, InstanceKey: ikb, Reason: "x", Fence: fb})
			return err
		}, codes.FailedPrecondition},
		{"crash an unclaimed instance", func() error {
			_, err := cli.CrashActualLRP(ctx, &basinv1.CrashActualLRPRequest{Key: k1, InstanceKey: ika, Reason: "x", Fence: fa})
			return err
		}, codes.FailedPrecondition},
		{"fail placement of a claimed instance", func() error {
			_, err := cli.FailActualLRP(ctx, &basinv1.FailActualLRPRequest{Key: k0, PlacementError: "x"})
			return err
		}, codes.FailedPrecondition},
		{"remove another incarnation", func() error {
			_, err := cli.RemoveActualLRP(ctx, &basinv1.RemoveActualLRPRequest{Key: k0, InstanceKey: ikb})
			return err
		}, codes.FailedPrecondition},
		{"claim with a stale fence", func() error {
			_, err := cli.ClaimActualLRP(ctx, &basinv1.ClaimActualLRPRequest{Key: k1, InstanceKey: ika, Fence: staleFence})
			return err
		}, codes.FailedPrecondition},
		{"complete an unknown task", func() error {
			_, err := cli.CompleteTask(ctx, &basinv1.CompleteTaskRequest{TaskGuid: "nope", CellId: "cell-a", Fence: fa})
			return err
		}, codes.NotFound},
		{"conditional update on an old revision", func() error {
			n := int32(3)
			_, err := cli.UpdateDesiredLRP(ctx, &basinv1.UpdateDesiredLRPRequest{ProcessGuid: "app", Instances: &n, IfRevision: 1})
			return err
		}, codes.Aborted},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.call(); status.Code(err) != tc.want {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
		})
	}

	// And the legal path still works after all those refusals.
	a, err := cli.StartActualLRP(ctx, &basinv1.StartActualLRPRequest{Key: k0, InstanceKey: ika, NetInfo: net, Fence: fa})
	if err != nil || a.GetActualLrp().GetState() != basinv1.ActualLRPState_ACTUAL_LRP_STATE_RUNNING {
		t.Fatalf("start by the claiming cell: %v %v", a, err)
	}
	c, err := cli.CrashActualLRP(ctx, &basinv1.CrashActualLRPRequest{Key: k0, InstanceKey: ika, Reason: "exited with status 137: out of memory", Fence: fa})
	if err != nil || c.GetActualLrp().GetCrashCount() != 1 {
		t.Fatalf("crash by the claiming cell: %v %v", c, err)
	}
	if _, err := cli.StartActualLRP(ctx, &basinv1.StartActualLRPRequest{Key: k0, InstanceKey: ika, NetInfo: net, Fence: fa}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("start a crashed instance: %v, want FailedPrecondition", err)
	}
}

func TestTokenRequired(t *testing.T) {
	srv, _ := startServer(t, Config{Token: "s3cret"})
	ctx := context.Background()
	anon, err := Dial(ClientConfig{Address: srv.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	defer anon.Close()
	if _, err := anon.ListCells(ctx, &basinv1.ListCellsRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("call without token: %v, want Unauthenticated", err)
	}
	wrong, err := Dial(ClientConfig{Address: srv.Addr(), Token: "guess"})
	if err != nil {
		t.Fatal(err)
	}
	defer wrong.Close()
	if _, err := wrong.ListCells(ctx, &basinv1.ListCellsRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("call with a wrong token: %v, want Unauthenticated", err)
	}
	// Health stays open for probes.
	hc := healthpb.NewHealthClient(anon.conn)
	resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: basinv1.BBSService_ServiceDesc.ServiceName})
	if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health: %v %v", resp, err)
	}
}

func TestEventsOverGRPC(t *testing.T) {
	_, cli := startServer(t, Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := cli.SubscribeToEvents(ctx, &basinv1.SubscribeToEventsRequest{Guid: "app"})
	if err != nil {
		t.Fatal(err)
	}
	// Headers arrive once the server has subscribed.
	if _, err := stream.Header(); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.DesireLRP(ctx, validDesire()); err != nil {
		t.Fatal(err)
	}
	created := make(chan *basinv1.Event, 1)
	go func() {
		for {
			resp, err := stream.Recv()
			if err != nil {
				return
			}
			if resp.GetEvent().GetDesiredLrpCreated() != nil {
				created <- resp.GetEvent()
				return
			}
		}
	}()
	select {
	case ev := <-created:
		if ev.GetRevision() == 0 {
			t.Error("event without revision")
		}
	case <-ctx.Done():
		t.Fatal("no created event over the stream")
	}
}
