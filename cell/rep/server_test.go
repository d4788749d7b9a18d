package rep

import (
	"context"
	"net"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/basinpaas/basin/cell/executor"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

// serve runs the rep's gRPC server on loopback and returns a client.
func (e *env) serve() basinv1.CellServiceClient {
	e.t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		e.t.Fatal(err)
	}
	gs, hs := NewGRPCServer(e.rep)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, e.rep, gs, hs, lis) }()
	e.t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			e.t.Errorf("Serve: %v", err)
		}
	})
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { conn.Close() })
	return basinv1.NewCellServiceClient(conn)
}

func TestLogsRecentThenFollow(t *testing.T) {
	e := newEnv(t)
	c := e.serve()
	e.desire("chatty", 1, 64)
	e.perform(lrpStart("chatty", 0, 64))
	a := e.waitState("chatty", 0, stateRunning)
	guid := a.GetInstanceKey().GetInstanceGuid()
	logs := e.exec.get(guid).logs
	logs.Append(executor.SourceApp, "stdout", "one")
	logs.Append(executor.SourceApp, "stdout", "two")

	recent, err := c.Logs(e.ctx, &basinv1.LogsRequest{ProcessGuid: "chatty", Recent: 2})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for {
		m, err := recent.Recv()
		if err != nil {
			break
		}
		got = append(got, m.GetLine().GetText())
		if l := m.GetLine(); l.GetInstanceGuid() != guid || l.GetSource() != "APP" || l.GetStream() != "stdout" || l.GetTimeUnixNano() == 0 {
			t.Errorf("line %v: want tagged with instance, source, stream and time", l)
		}
	}
	if len(got) != 2 || got[0] != "one" || got[1] != "two" {
		t.Errorf("recent 2 = %q, want [one two]", got)
	}

	ctx, cancel := context.WithCancel(e.ctx)
	defer cancel()
	follow, err := c.Logs(ctx, &basinv1.LogsRequest{ProcessGuid: "chatty", Recent: 1, Follow: true})
	if err != nil {
		t.Fatal(err)
	}
	if m, err := follow.Recv(); err != nil || m.GetLine().GetText() != "two" {
		t.Fatalf("first followed line %v %v, want the recent one", m, err)
	}
	logs.Append(executor.SourceCell, "", "Container became healthy")
	m, err := follow.Recv()
	if err != nil || m.GetLine().GetText() != "Container became healthy" || m.GetLine().GetSource() != "CELL" {
		t.Fatalf("followed line %v %v", m, err)
	}

	s, err := c.Logs(e.ctx, &basinv1.LogsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Recv(); status.Code(err) != codes.InvalidArgument {
		t.Errorf("Logs without a process guid: %v, want InvalidArgument", err)
	}
}

func TestDrainStopsWithoutReplacementAtTheTimeout(t *testing.T) {
	e := newEnv(t)
	c := e.serve()
	e.desire("lonely", 1, 64)
	e.perform(lrpStart("lonely", 0, 64))
	a := e.waitState("lonely", 0, stateRunning)
	if _, err := c.Drain(e.ctx, &basinv1.DrainRequest{TimeoutMs: 300}); err != nil {
		t.Fatalf("Drain: %v", err)
	}
	if !e.exec.wasStopped(a.GetInstanceKey().GetInstanceGuid()) {
		t.Error("instance still running after Drain returned")
	}
	if got := e.actual("lonely", 0); got.GetState() != stateUnclaimed {
		t.Errorf("actual %v: want UNCLAIMED for the auctioneer", got)
	}
	resp, err := e.etcd.Get(e.ctx, e.keys.Cell("cell-a"))
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("presence gone during drain: %v", err)
	}
	st, err := c.State(e.ctx, &basinv1.StateRequest{})
	if err != nil || !st.GetPresence().GetEvacuating() || len(st.GetLrps()) != 0 {
		t.Errorf("State after drain = %v, %v", st, err)
	}
	if _, err := c.Drain(e.ctx, &basinv1.DrainRequest{TimeoutMs: -1}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("Drain with a negative timeout: %v", err)
	}
}
