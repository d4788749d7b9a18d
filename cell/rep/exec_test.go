package rep

import (
	"context"
	"errors"
	"io"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

// execResult is what an Exec stream produced.
type execResult struct {
	stdout, stderr string
	code           int32
	exited         bool
	err            error
}

func drainExec(s interface {
	Recv() (*basinv1.ExecResponse, error)
}) execResult {
	var r execResult
	var out, errb strings.Builder
	for {
		m, err := s.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			r.err = err
			break
		}
		switch msg := m.GetMsg().(type) {
		case *basinv1.ExecResponse_Stdout:
			out.Write(msg.Stdout)
		case *basinv1.ExecResponse_Stderr:
			errb.Write(msg.Stderr)
		case *basinv1.ExecResponse_Exit:
			r.code, r.exited = msg.Exit.GetCode(), true
		}
	}
	r.stdout, r.stderr = out.String(), errb.String()
	return r
}

func startReq(s *basinv1.ExecStart) *basinv1.ExecRequest {
	return &basinv1.ExecRequest{Msg: &basinv1.ExecRequest_Start{Start: s}}
}

func TestExecPipesOutputStdinResizesAndExit(t *testing.T) {
	e := newEnv(t)
	c := e.serve()
	e.desire("shell", 2, 64)
	e.perform(lrpStart("shell", 0, 64), lrpStart("shell", 1, 64))
	e.waitState("shell", 0, stateRunning)
	a1 := e.waitState("shell", 1, stateRunning)

	run := func(t *testing.T, start *basinv1.ExecStart, reqs ...*basinv1.ExecRequest) execResult {
		t.Helper()
		s, err := c.Exec(e.ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range append([]*basinv1.ExecRequest{startReq(start)}, reqs...) {
			if err := s.Send(r); err != nil {
				t.Fatal(err)
			}
		}
		s.CloseSend()
		return drainExec(s)
	}

	t.Run("output and exit", func(t *testing.T) {
		r := run(t, &basinv1.ExecStart{ProcessGuid: "shell", Index: 1, Command: []string{"echo", "hi", "there"}})
		if r.err != nil || !r.exited || r.code != 0 || r.stdout != "hi there\n" {
			t.Errorf("echo = %+v, want stdout and exit 0", r)
		}
		r = run(t, &basinv1.ExecStart{ProcessGuid: "shell", Command: []string{"stderr", "oops"}})
		if r.stderr != "oops\n" || r.stdout != "" {
			t.Errorf("stderr = %+v: want it apart from stdout", r)
		}
		r = run(t, &basinv1.ExecStart{ProcessGuid: "shell", Command: []string{"exit", "3"}})
		if r.err != nil || !r.exited || r.code != 3 {
			t.Errorf("exit 3 = %+v", r)
		}
		r = run(t, &basinv1.ExecStart{ProcessGuid: "shell", InstanceGuid: a1.GetInstanceKey().GetInstanceGuid(), Command: []string{"echo", "by guid"}})
		if r.stdout != "by guid\n" {
			t.Errorf("by instance guid = %+v", r)
		}
	})

	t.Run("stdin", func(t *testing.T) {
		stdin := func(s string) *basinv1.ExecRequest {
			return &basinv1.ExecRequest{Msg: &basinv1.ExecRequest_Stdin{Stdin: []byte(s)}}
		}
		closeIn := &basinv1.ExecRequest{Msg: &basinv1.ExecRequest_StdinClose{StdinClose: true}}
		r := run(t, &basinv1.ExecStart{ProcessGuid: "shell", Command: []string{"cat"}}, stdin("one "), stdin("two\n"), closeIn)
		if r.err != nil || r.stdout != "one two\n" || !r.exited {
			t.Errorf("cat with stdin_close = %+v", r)
		}
		// Closing the sending side also ends stdin.
		r = run(t, &basinv1.ExecStart{ProcessGuid: "shell", Command: []string{"cat"}}, stdin("three\n"))
		if r.err != nil || r.stdout != "three\n" {
			t.Errorf("cat with CloseSend = %+v", r)
		}
	})

	t.Run("tty and resizes", func(t *testing.T) {
		resize := func(rows, cols uint32) *basinv1.ExecRequest {
			return &basinv1.ExecRequest{Msg: &basinv1.ExecRequest_Resize{Resize: &basinv1.TerminalSize{Rows: rows, Cols: cols}}}
		}
		s, err := c.Exec(e.ctx)
		if err != nil {
			t.Fatal(err)
		}
		s.Send(startReq(&basinv1.ExecStart{ProcessGuid: "shell", Command: []string{"resizes", "2"}, Tty: true, Size: &basinv1.TerminalSize{Rows: 24, Cols: 80}}))
		// One at a time: only the latest pending size is kept.
		s.Send(resize(30, 100))
		buf := make([]byte, 0)
		for !strings.Contains(string(buf), "30x100") {
			m, err := s.Recv()
			if err != nil {
				t.Fatalf("waiting for the first resize: %v (got %q)", err, buf)
			}
			buf = append(buf, m.GetStdout()...)
		}
		s.Send(resize(50, 200))
		s.CloseSend()
		r := drainExec(s)
		got := string(buf) + r.stdout
		if got != "tty=true 24x80\n30x100\n50x200\n" || !r.exited {
			t.Errorf("resizes = %q %+v", got, r)
		}
	})

	t.Run("errors", func(t *testing.T) {
		tests := []struct {
			name  string
			start *basinv1.ExecStart
			code  codes.Code
			msg   string
		}{
			{"no process guid", &basinv1.ExecStart{}, codes.InvalidArgument, "start.process_guid"},
			{"negative index", &basinv1.ExecStart{ProcessGuid: "shell", Index: -1}, codes.InvalidArgument, "start.index"},
			{"bad env", &basinv1.ExecStart{ProcessGuid: "shell", Env: []string{"NOEQUALS"}}, codes.InvalidArgument, "start.env"},
			{"empty argv0", &basinv1.ExecStart{ProcessGuid: "shell", Command: []string{""}}, codes.InvalidArgument, "start.command[0]"},
			{"no such index", &basinv1.ExecStart{ProcessGuid: "shell", Index: 7}, codes.NotFound, "instance 7 of shell is not on cell"},
			{"no such lrp", &basinv1.ExecStart{ProcessGuid: "nope"}, codes.NotFound, "instance 0 of nope"},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				r := run(t, tt.start)
				if status.Code(r.err) != tt.code || !strings.Contains(r.err.Error(), tt.msg) {
					t.Errorf("err %v, want %v mentioning %q", r.err, tt.code, tt.msg)
				}
			})
		}
		s, _ := c.Exec(e.ctx)
		s.Send(&basinv1.ExecRequest{Msg: &basinv1.ExecRequest_Stdin{Stdin: []byte("x")}})
		s.CloseSend()
		if r := drainExec(s); status.Code(r.err) != codes.InvalidArgument {
			t.Errorf("stdin before start: %v, want InvalidArgument", r.err)
		}
	})

	t.Run("not running", func(t *testing.T) {
		e.exec.mu.Lock()
		e.exec.autoHealthy = false
		e.exec.mu.Unlock()
		e.desire("slow", 1, 64)
		e.perform(lrpStart("slow", 0, 64))
		e.waitState("slow", 0, stateClaimed)
		r := run(t, &basinv1.ExecStart{ProcessGuid: "slow", Command: []string{"echo"}})
		if status.Code(r.err) != codes.FailedPrecondition || !strings.Contains(r.err.Error(), "instance 0 of slow is not running") {
			t.Errorf("exec in a starting instance: %v, want FailedPrecondition", r.err)
		}
	})

	t.Run("client gone kills the process", func(t *testing.T) {
		ctx, cancel := context.WithCancel(e.ctx)
		s, err := c.Exec(ctx)
		if err != nil {
			t.Fatal(err)
		}
		s.Send(startReq(&basinv1.ExecStart{ProcessGuid: "shell", Command: []string{"block"}}))
		e.waitFor("the exec to run", func() bool { return e.exec.blockedExecs() == 1 })
		cancel()
		e.waitFor("the exec to end with its stream", func() bool { return e.exec.blockedExecs() == 0 })
	})
}
