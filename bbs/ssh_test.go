package bbs

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// fakeCell is a rep's CellService.Exec at the process boundary: it echoes
// stdin to stdout and exits 3 at stdin's end; command "fail" is refused.
type fakeCell struct {
	basinv1.UnimplementedCellServiceServer
	mu     sync.Mutex
	starts []*basinv1.ExecStart
	ended  chan struct{}
}

func (f *fakeCell) Exec(stream grpc.BidiStreamingServer[basinv1.ExecRequest, basinv1.ExecResponse]) error {
	defer func() { f.ended <- struct{}{} }()
	m, err := stream.Recv()
	if err != nil {
		return err
	}
	f.mu.Lock()
	f.starts = append(f.starts, m.GetStart())
	f.mu.Unlock()
	if c := m.GetStart().GetCommand(); len(c) > 0 && c[0] == "fail" {
		return status.Error(codes.FailedPrecondition, "instance 0 of app is not running on cell cell-a")
	}
	for {
		m, err := stream.Recv()
		if errors.Is(err, io.EOF) || m.GetStdinClose() {
			return stream.Send(&basinv1.ExecResponse{Msg: &basinv1.ExecResponse_Exit{Exit: &basinv1.ExecExit{Code: 3}}})
		}
		if err != nil {
			return err
		}
		if err := stream.Send(&basinv1.ExecResponse{Msg: &basinv1.ExecResponse_Stdout{Stdout: m.GetStdin()}}); err != nil {
			return err
		}
	}
}

func TestSSHRelaysToTheInstancesCell(t *testing.T) {
	srv, cli := startServer(t, Config{Token: "secret"})
	ctx := context.Background()
	s := srv.Store()

	cell := &fakeCell{ended: make(chan struct{}, 16)}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	basinv1.RegisterCellServiceServer(gs, cell)
	go gs.Serve(lis)
	t.Cleanup(gs.Stop)

	run := testRun()
	run.AppName = "myapp"
	if _, err := cli.DesireLRP(ctx, &basinv1.DesireLRPRequest{Schedule: testSchedule("app-guid", 2), Run: run}); err != nil {
		t.Fatal(err)
	}
	presence, _ := proto.Marshal(&basinv1.CellPresence{CellId: "cell-a", RepAddress: lis.Addr().String()})
	key := s.Keys().Cell("cell-a")
	put, err := testClient.Put(ctx, key, string(presence))
	if err != nil {
		t.Fatal(err)
	}
	fence := &basinv1.Fence{Key: key, CreateRevision: put.Header.Revision}
	k0 := &basinv1.ActualLRPKey{ProcessGuid: "app-guid", Index: 0}
	ik := &basinv1.ActualLRPInstanceKey{InstanceGuid: "inst-0", CellId: "cell-a"}
	if _, err := cli.ClaimActualLRP(ctx, &basinv1.ClaimActualLRPRequest{Key: k0, InstanceKey: ik, Fence: fence}); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.StartActualLRP(ctx, &basinv1.StartActualLRPRequest{Key: k0, InstanceKey: ik, Fence: fence,
		NetInfo: &basinv1.ActualLRPNetInfo{Address: "127.0.0.1", Ports: []*basinv1.PortMapping{{ContainerPort: 8080, HostPort: 61000}}}}); err != nil {
		t.Fatal(err)
	}

	exec := func(t *testing.T, c *Client, start *basinv1.ExecStart, stdin ...string) (string, int32, error) {
		t.Helper()
		st, err := c.SSH.Exec(ctx)
		if err != nil {
			t.Fatal(err)
		}
		wrap := func(r *basinv1.ExecRequest) *basinv1.SSHServiceExecRequest {
			return &basinv1.SSHServiceExecRequest{Request: r}
		}
		if start != nil {
			st.Send(wrap(&basinv1.ExecRequest{Msg: &basinv1.ExecRequest_Start{Start: start}}))
		}
		for _, in := range stdin {
			st.Send(wrap(&basinv1.ExecRequest{Msg: &basinv1.ExecRequest_Stdin{Stdin: []byte(in)}}))
		}
		st.CloseSend()
		var out strings.Builder
		code := int32(-1)
		for {
			m, err := st.Recv()
			if errors.Is(err, io.EOF) {
				return out.String(), code, nil
			}
			if err != nil {
				return out.String(), code, err
			}
			out.Write(m.GetResponse().GetStdout())
			if x := m.GetResponse().GetExit(); x != nil {
				code = x.GetCode()
			}
		}
	}

	t.Run("relays both ways", func(t *testing.T) {
		out, code, err := exec(t, cli, &basinv1.ExecStart{ProcessGuid: "app-guid", Command: []string{"cat"}}, "hello ", "cell")
		if err != nil || out != "hello cell" || code != 3 {
			t.Fatalf("exec = %q, %d, %v; want the echo and exit 3", out, code, err)
		}
		cell.mu.Lock()
		got := cell.starts[len(cell.starts)-1]
		cell.mu.Unlock()
		if got.GetInstanceGuid() != "inst-0" || got.GetIndex() != 0 || got.GetCommand()[0] != "cat" {
			t.Errorf("the cell got start %v: want instance inst-0 resolved by the BBS", got)
		}
	})

	t.Run("errors", func(t *testing.T) {
		tests := []struct {
			name  string
			start *basinv1.ExecStart
			code  codes.Code
			msg   string
		}{
			{"not running", &basinv1.ExecStart{ProcessGuid: "app-guid", Index: 1}, codes.FailedPrecondition, "instance 1 of app myapp (app-guid) is not running (it is waiting for a cell)"},
			{"no such index", &basinv1.ExecStart{ProcessGuid: "app-guid", Index: 5}, codes.NotFound, "has no instance 5 (it has 2 instances)"},
			{"no such instance guid", &basinv1.ExecStart{ProcessGuid: "app-guid", InstanceGuid: "nope"}, codes.NotFound, "has no instance nope"},
			{"no such app", &basinv1.ExecStart{ProcessGuid: "ghost"}, codes.NotFound, "app ghost does not exist"},
			{"invalid", &basinv1.ExecStart{ProcessGuid: "app-guid", Index: -2}, codes.InvalidArgument, "start.index"},
			{"no start", nil, codes.InvalidArgument, "request.start: the first request must carry start"},
			{"the cell's refusal", &basinv1.ExecStart{ProcessGuid: "app-guid", Command: []string{"fail"}}, codes.FailedPrecondition, "cell cell-a at"},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				_, _, err := exec(t, cli, tt.start)
				if status.Code(err) != tt.code || !strings.Contains(err.Error(), tt.msg) {
					t.Errorf("err %v, want %v mentioning %q", err, tt.code, tt.msg)
				}
			})
		}
	})

	t.Run("needs the token", func(t *testing.T) {
		anon, err := Dial(ClientConfig{Address: srv.Addr()})
		if err != nil {
			t.Fatal(err)
		}
		defer anon.Close()
		if _, _, err := exec(t, anon, &basinv1.ExecStart{ProcessGuid: "app-guid"}); status.Code(err) != codes.Unauthenticated {
			t.Errorf("without a token: %v, want Unauthenticated", err)
		}
	})

	t.Run("client gone ends the cell's stream", func(t *testing.T) {
		for len(cell.ended) > 0 {
			<-cell.ended
		}
		cctx, cancel := context.WithCancel(ctx)
		st, err := cli.SSH.Exec(cctx)
		if err != nil {
			t.Fatal(err)
		}
		st.Send(&basinv1.SSHServiceExecRequest{Request: &basinv1.ExecRequest{Msg: &basinv1.ExecRequest_Start{Start: &basinv1.ExecStart{ProcessGuid: "app-guid"}}}})
		st.Send(&basinv1.SSHServiceExecRequest{Request: &basinv1.ExecRequest{Msg: &basinv1.ExecRequest_Stdin{Stdin: []byte("x")}}})
		if m, err := st.Recv(); err != nil || string(m.GetResponse().GetStdout()) != "x" {
			t.Fatalf("first echo %v %v", m, err)
		}
		cancel()
		select {
		case <-cell.ended:
		case <-time.After(5 * time.Second):
			t.Fatal("the cell's Exec still runs after the client went away")
		}
	})
}
