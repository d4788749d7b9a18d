//go:build integration

package integration

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/basinpaas/basin/cell"
	"github.com/basinpaas/basin/cell/containerdproc"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

// TestSSHThroughTheBBS runs a real cell on containerd with one instance of
// an app on the tiny stack, then execs in it through the BBS's SSHService
// (as basin ssh does): the process runs as vcap in /home/vcap/app with the
// app's environment, its exit status, stdin and a terminal come through,
// and the real `basin ssh -c` binary exits with the command's status.
// It needs root and containerd's binaries (it skips otherwise, saying so).
func TestSSHThroughTheBBS(t *testing.T) {
	cenv := startCell(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	env := newRepEnv(t, ctx)

	// This test's own bridge, subnet, chain and ports.
	state, err := containerdproc.ShortDir("bssh")
	if err != nil {
		t.Fatal(err)
	}
	const bridge = "basinssh0"
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg := cell.Config{
		ID: "ssh-cell", Zone: "z1", Capacity: &basinv1.CellCapacity{MemoryMb: 1024, DiskMb: 4096, Containers: 10},
		Listener: lis, Containerd: cenv.client, Etcd: env.etcd, BBSClient: env.bbs, Prefix: env.prefix,
		LauncherPath: cenv.launcher, StateDir: state,
		NetworkName: bridge, BridgeName: bridge, Subnet: "10.233.0.0/24", FirewallChain: "BASIN-SSHTEST0",
		HostPortLow: 63400, HostPortHigh: 63499, StopGrace: 2 * time.Second,
		Logger: slog.New(slog.NewTextHandler(testLog{t}, nil)),
	}
	c, err := cell.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	cctx, stopCell := context.WithCancel(context.Background())
	runErr := make(chan error, 1)
	go func() { runErr <- c.Run(cctx) }()
	t.Cleanup(func() {
		stopCell()
		if err := <-runErr; err != nil {
			t.Errorf("cell Run: %v", err)
		}
		// A stopped cell leaves its containers for the next one to adopt:
		// remove them, as basin dev down does.
		if err := cell.Purge(context.Background(), cfg); err != nil {
			t.Errorf("purge the cell's containers: %v", err)
		}
		exec.Command("ip", "link", "del", bridge).Run()
		os.RemoveAll(state)
	})
	waitServing(t, ctx, c.Addr())

	env.desireApp("it-ssh", "exec httpd -f -p $PORT -h /home/vcap/app", nil, map[string]string{"app/index.html": "hi\n"})
	performOne(t, ctx, cellClient(t, c.Addr()), "it-ssh")
	env.waitActual("it-ssh", basinv1.ActualLRPState_ACTUAL_LRP_STATE_RUNNING, time.Minute)

	type result struct {
		stdout, stderr string
		code           int32
		err            error
	}
	run := func(t *testing.T, start *basinv1.ExecStart, stdin string) result {
		t.Helper()
		s, err := env.bbs.SSH.Exec(ctx)
		if err != nil {
			t.Fatal(err)
		}
		send := func(r *basinv1.ExecRequest) {
			if err := s.Send(&basinv1.SSHServiceExecRequest{Request: r}); err != nil {
				t.Fatalf("send: %v", err)
			}
		}
		send(&basinv1.ExecRequest{Msg: &basinv1.ExecRequest_Start{Start: start}})
		if stdin != "" {
			send(&basinv1.ExecRequest{Msg: &basinv1.ExecRequest_Stdin{Stdin: []byte(stdin)}})
		}
		send(&basinv1.ExecRequest{Msg: &basinv1.ExecRequest_StdinClose{StdinClose: true}})
		var r result
		r.code = -1
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
			out.Write(m.GetResponse().GetStdout())
			errb.Write(m.GetResponse().GetStderr())
			if x := m.GetResponse().GetExit(); x != nil {
				r.code = x.GetCode()
			}
		}
		r.stdout, r.stderr = out.String(), errb.String()
		return r
	}
	sh := func(cmd string) *basinv1.ExecStart {
		return &basinv1.ExecStart{ProcessGuid: "it-ssh", Command: []string{"/bin/sh", "-c", cmd}}
	}

	tests := []struct {
		name   string
		start  *basinv1.ExecStart
		stdin  string
		stdout string
		code   int32
	}{
		{"as vcap", sh("id -u; id -g"), "", "2000\n2000\n", 0},
		{"in the app directory", sh("pwd"), "", "/home/vcap/app\n", 0},
		{"with the app's env", sh(`echo $PORT; echo "$VCAP_APPLICATION" | grep -o '"instance_index":0'`), "", "8080\n\"instance_index\":0\n", 0},
		{"exit status", sh("echo out; echo err >&2; exit 3"), "", "out\n", 3},
		{"stdin", sh("cat"), "hello from stdin\n", "hello from stdin\n", 0},
		{"no capabilities", sh("grep CapEff /proc/self/status"), "", "CapEff:\t0000000000000000\n", 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := run(t, tt.start, tt.stdin)
			if r.err != nil || r.stdout != tt.stdout || r.code != tt.code {
				t.Errorf("got stdout %q stderr %q code %d err %v; want stdout %q code %d", r.stdout, r.stderr, r.code, r.err, tt.stdout, tt.code)
			}
		})
	}

	t.Run("stderr apart", func(t *testing.T) {
		if r := run(t, sh("echo err >&2"), ""); r.stderr != "err\n" || r.stdout != "" {
			t.Errorf("stdout %q stderr %q", r.stdout, r.stderr)
		}
	})

	t.Run("tty", func(t *testing.T) {
		start := sh("tty; stty size")
		start.Tty, start.Size = true, &basinv1.TerminalSize{Rows: 33, Cols: 99}
		r := run(t, start, "")
		if r.err != nil || r.code != 0 || !strings.HasPrefix(r.stdout, "/dev/pts/") || !strings.Contains(r.stdout, "33 99") {
			t.Errorf("tty session: stdout %q code %d err %v; want a /dev/pts path and size 33 99", r.stdout, r.code, r.err)
		}
	})

	t.Run("interactive login shell", func(t *testing.T) {
		start := &basinv1.ExecStart{ProcessGuid: "it-ssh", Tty: true, Size: &basinv1.TerminalSize{Rows: 24, Cols: 80}}
		r := run(t, start, "echo answer=$((6*7)); exit 5\n")
		if r.err != nil || r.code != 5 || !strings.Contains(r.stdout, "answer=42") {
			t.Errorf("shell: stdout %q code %d err %v; want answer=42 and exit 5", r.stdout, r.code, r.err)
		}
	})

	t.Run("not running", func(t *testing.T) {
		r := run(t, &basinv1.ExecStart{ProcessGuid: "it-ssh", Index: 3}, "")
		if r.err == nil || !strings.Contains(r.err.Error(), "has no instance 3") {
			t.Errorf("exec in a missing instance: %v", r.err)
		}
	})

	t.Run("bounded and killed when the client goes", func(t *testing.T) {
		sctx, cancelSessions := context.WithCancel(ctx)
		defer cancelSessions()
		open := func() (basinv1.SSHService_ExecClient, error) {
			s, err := env.bbs.SSH.Exec(sctx)
			if err != nil {
				return nil, err
			}
			start := sh("echo started; exec sleep 313")
			if err := s.Send(&basinv1.SSHServiceExecRequest{Request: &basinv1.ExecRequest{Msg: &basinv1.ExecRequest_Start{Start: start}}}); err != nil {
				return nil, err
			}
			m, err := s.Recv()
			if err != nil {
				return nil, err
			}
			if got := string(m.GetResponse().GetStdout()); got != "started\n" {
				return nil, fmt.Errorf("first output %q", got)
			}
			return s, nil
		}
		for i := range 5 { // the executor's default limit per instance
			if _, err := open(); err != nil {
				t.Fatalf("session %d: %v", i, err)
			}
		}
		if _, err := open(); status.Code(err) != codes.ResourceExhausted {
			t.Errorf("a 6th session: %v, want ResourceExhausted", err)
		}
		cancelSessions()
		deadline := time.Now().Add(15 * time.Second)
		for {
			r := run(t, sh("ps -o args | grep -c '^sleep 313' || true"), "")
			if r.stdout == "0\n" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("sessions' processes still run after their clients went: %q %v", r.stdout, r.err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	})
}
