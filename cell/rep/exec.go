package rep

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/basinpaas/basin/cell/executor"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

// Exec limits of one request, checked before anything runs.
const (
	maxExecArgs     = 256
	maxExecArgBytes = 64 << 10
	maxExecEnv      = 256
)

// Exec runs a process in one of this cell's running instances and pipes
// the stream to it (see CellService.Exec).
func (s *Service) Exec(stream grpc.BidiStreamingServer[basinv1.ExecRequest, basinv1.ExecResponse]) error {
	first, err := stream.Recv()
	if errors.Is(err, io.EOF) {
		return status.Error(codes.InvalidArgument, "start: the first request must carry start")
	}
	if err != nil {
		return err
	}
	start := first.GetStart()
	if err := validateExecStart(start); err != nil {
		return status.Error(codes.InvalidArgument, err.Error())
	}
	guid, err := s.rep.execTarget(start)
	if err != nil {
		return err
	}
	run := func(ctx context.Context, spec executor.ExecSpec) (int, error) {
		return s.rep.exec.Exec(ctx, guid, spec)
	}
	err = pipeExec(stream.Context(), start, stream.Recv, stream.Send, run)
	if err != nil {
		return execStatus(err)
	}
	return nil
}

// validateExecStart checks an ExecStart's fields, naming the wrong one.
func validateExecStart(s *basinv1.ExecStart) error {
	switch {
	case s == nil:
		return errors.New("start: the first request must carry start")
	case s.GetProcessGuid() == "":
		return errors.New("start.process_guid: is required")
	case s.GetIndex() < 0:
		return fmt.Errorf("start.index: must not be negative, got %d", s.GetIndex())
	case len(s.GetCommand()) > maxExecArgs:
		return fmt.Errorf("start.command: at most %d arguments, got %d", maxExecArgs, len(s.GetCommand()))
	case len(s.GetEnv()) > maxExecEnv:
		return fmt.Errorf("start.env: at most %d entries, got %d", maxExecEnv, len(s.GetEnv()))
	case s.GetSize().GetRows() > 0xffff || s.GetSize().GetCols() > 0xffff:
		return fmt.Errorf("start.size: rows and cols must be at most 65535, got %dx%d", s.GetSize().GetRows(), s.GetSize().GetCols())
	}
	n := 0
	for i, a := range s.GetCommand() {
		if i == 0 && a == "" {
			return errors.New("start.command[0]: must not be empty")
		}
		n += len(a)
	}
	if n > maxExecArgBytes {
		return fmt.Errorf("start.command: at most %d bytes in all, got %d", maxExecArgBytes, n)
	}
	for _, kv := range s.GetEnv() {
		if k, _, ok := strings.Cut(kv, "="); !ok || k == "" {
			return fmt.Errorf("start.env: entries must be KEY=VALUE, got %q", kv)
		}
	}
	return nil
}

// execTarget finds the instance guid of a running instance this cell holds.
func (r *Rep) execTarget(s *basinv1.ExecStart) (string, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for guid, l := range r.lrps {
		if l.key.GetProcessGuid() != s.GetProcessGuid() {
			continue
		}
		if s.GetInstanceGuid() != "" && guid != s.GetInstanceGuid() {
			continue
		}
		if s.GetInstanceGuid() == "" && l.key.GetIndex() != s.GetIndex() {
			continue
		}
		if !l.isRunning() || !l.started {
			return "", status.Errorf(codes.FailedPrecondition, "instance %d of %s is not running on cell %s (it is %s)",
				l.key.GetIndex(), s.GetProcessGuid(), r.cfg.CellID, l.phase)
		}
		return guid, nil
	}
	if s.GetInstanceGuid() != "" {
		return "", status.Errorf(codes.NotFound, "instance %s of %s is not on cell %s", s.GetInstanceGuid(), s.GetProcessGuid(), r.cfg.CellID)
	}
	return "", status.Errorf(codes.NotFound, "instance %d of %s is not on cell %s", s.GetIndex(), s.GetProcessGuid(), r.cfg.CellID)
}

// execStatus converts the executor's errors to status codes.
func execStatus(err error) error {
	if _, ok := status.FromError(err); ok {
		return err
	}
	code := codes.Internal
	switch {
	case errors.Is(err, executor.ErrNotFound):
		code = codes.NotFound
	case errors.Is(err, executor.ErrNotReady):
		code = codes.FailedPrecondition
	case errors.Is(err, executor.ErrTooManyExecs):
		code = codes.ResourceExhausted
	case errors.Is(err, executor.ErrInvalidSpec):
		code = codes.InvalidArgument
	case errors.Is(err, executor.ErrNotRunning):
		code = codes.Unavailable
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	}
	return status.Error(code, err.Error())
}

// pipeExec runs run with the stream's stdin, resizes and output, then
// sends the exit. recv yields the requests after start; send is called
// from one goroutine at a time. Stdin is not buffered: a process that does
// not read it slows its sender down. The process's context ends when ctx
// does, or when recv fails other than at the client's end of sending.
func pipeExec(ctx context.Context, start *basinv1.ExecStart, recv func() (*basinv1.ExecRequest, error),
	send func(*basinv1.ExecResponse) error, run func(context.Context, executor.ExecSpec) (int, error)) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	stdinR, stdinW := io.Pipe()
	defer stdinR.CloseWithError(io.ErrClosedPipe)
	resize := make(chan executor.WindowSize, 1)

	go func() {
		for {
			m, err := recv()
			if errors.Is(err, io.EOF) {
				stdinW.Close()
				return
			}
			if err != nil {
				stdinW.CloseWithError(err)
				cancel(err)
				return
			}
			switch msg := m.GetMsg().(type) {
			case *basinv1.ExecRequest_Stdin:
				// After the process closed its stdin, later input goes
				// nowhere, as in a terminal.
				_, _ = stdinW.Write(msg.Stdin)
			case *basinv1.ExecRequest_StdinClose:
				stdinW.Close()
			case *basinv1.ExecRequest_Resize:
				sz := executor.WindowSize{Rows: uint16(min(msg.Resize.GetRows(), 0xffff)), Cols: uint16(min(msg.Resize.GetCols(), 0xffff))}
				// Only the latest size matters.
				select {
				case <-resize:
				default:
				}
				resize <- sz
			case *basinv1.ExecRequest_Start:
				err := status.Error(codes.InvalidArgument, "start: only the first request may carry start")
				stdinW.CloseWithError(err)
				cancel(err)
				return
			}
		}
	}()

	var mu sync.Mutex
	done := false
	out := func(wrap func([]byte) *basinv1.ExecResponse) io.Writer {
		return writerFunc(func(p []byte) (int, error) {
			mu.Lock()
			defer mu.Unlock()
			if done {
				return 0, io.ErrClosedPipe
			}
			if err := send(wrap(append([]byte(nil), p...))); err != nil {
				return 0, err
			}
			return len(p), nil
		})
	}
	spec := executor.ExecSpec{
		Args: start.GetCommand(), Env: start.GetEnv(), TTY: start.GetTty(),
		Size:   executor.WindowSize{Rows: uint16(start.GetSize().GetRows()), Cols: uint16(start.GetSize().GetCols())},
		Resize: resize, Stdin: stdinR,
		Stdout: out(func(b []byte) *basinv1.ExecResponse {
			return &basinv1.ExecResponse{Msg: &basinv1.ExecResponse_Stdout{Stdout: b}}
		}),
		Stderr: out(func(b []byte) *basinv1.ExecResponse {
			return &basinv1.ExecResponse{Msg: &basinv1.ExecResponse_Stderr{Stderr: b}}
		}),
	}
	code, err := run(ctx, spec)
	mu.Lock()
	done = true
	mu.Unlock()
	if err != nil {
		if cause := context.Cause(ctx); cause != nil && !errors.Is(cause, context.Canceled) {
			if _, ok := status.FromError(cause); ok {
				return cause
			}
		}
		return err
	}
	return send(&basinv1.ExecResponse{Msg: &basinv1.ExecResponse_Exit{Exit: &basinv1.ExecExit{Code: int32(code)}}})
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }
