package executor

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/basinpaas/basin/stack"
)

// Errors of Exec, besides ErrNotFound.
var (
	// ErrNotReady: the instance has no running process to join (it is
	// still being created or has exited).
	ErrNotReady = errors.New("instance is not running")
	// ErrTooManyExecs: the instance already runs Config.MaxExecs processes
	// for Exec.
	ErrTooManyExecs = errors.New("too many exec sessions on the instance")
)

// LoginShell is what Exec runs when ExecSpec.Args is empty: bash when the
// stack has it (bookworm), else busybox's sh (tiny).
var LoginShell = []string{"/bin/sh", "-c", `if [ -x /bin/bash ]; then exec /bin/bash -l; fi; exec /bin/sh -l`}

// WindowSize is a terminal's size in character cells.
type WindowSize struct {
	Rows, Cols uint16
}

// ExecSpec is a process to run in an instance's container.
type ExecSpec struct {
	// Args is the argv, run without a shell; empty runs LoginShell.
	Args []string
	// Env ("K=V") is added to the container's environment.
	Env []string
	// TTY gives the process a pseudo-terminal of Size; its output then all
	// goes to Stdout.
	TTY  bool
	Size WindowSize
	// Resize, when set, delivers new terminal sizes until the process ends.
	Resize <-chan WindowSize
	// Stdin is copied to the process; at its EOF the process's stdin is
	// closed, except with TTY (a terminal's input does not end: the
	// session ends with the process or ctx). Nil gives an empty stdin.
	Stdin          io.Reader
	Stdout, Stderr io.Writer
}

// execCwd is where Exec's processes start, as `cf ssh` does.
const execCwd = "/home/vcap/app"

// Exec runs a process in the running instance guid's container, as vcap
// (uid 2000) in /home/vcap/app with the container's environment plus
// spec.Env, no capabilities, no new privileges, under the container's
// seccomp profile and limits. It returns the exit status (128+n when killed
// by signal n) once the process has exited and its output was written.
// When ctx ends first the process is killed.
func (e *Executor) Exec(ctx context.Context, guid string, spec ExecSpec) (int, error) {
	if _, err := e.waitReady(ctx); err != nil {
		return 0, err
	}
	ctx = namespaces.WithNamespace(ctx, stack.Namespace)
	if len(spec.Args) == 0 {
		spec.Args = LoginShell
	}
	for _, kv := range spec.Env {
		if k, _, ok := strings.Cut(kv, "="); !ok || k == "" {
			return 0, fmt.Errorf("exec in %s: %w: env: entries must be KEY=VALUE, got %q", guid, ErrInvalidSpec, kv)
		}
	}
	e.mu.Lock()
	inst := e.instances[guid]
	e.mu.Unlock()
	if inst == nil {
		return 0, fmt.Errorf("exec in %s: %w", guid, ErrNotFound)
	}
	release, err := inst.acquireExec(e.cfg.MaxExecs)
	if err != nil {
		return 0, fmt.Errorf("exec in %s: %w", guid, err)
	}
	defer release()
	inst.mu.Lock()
	task, state := inst.task, inst.info.State
	inst.mu.Unlock()
	if task == nil || state == StateExited {
		return 0, fmt.Errorf("exec in %s: %w", guid, ErrNotReady)
	}
	container, err := e.c.LoadContainer(ctx, guid)
	if err != nil {
		return 0, fmt.Errorf("exec in %s: %w", guid, errors.Join(ErrNotFound, err))
	}
	cs, err := container.Spec(ctx)
	if err != nil {
		return 0, fmt.Errorf("exec in %s: container spec: %w", guid, err)
	}
	pspec := execProcess(cs.Process, spec)

	// Stdin's EOF must reach the process: the copy closes only cio's end
	// of the FIFO, so the shim is told to close its end too.
	if spec.Stdin == nil {
		spec.Stdin = strings.NewReader("")
	}
	stdinDone := make(chan struct{})
	stdin := eofReader{r: spec.Stdin, once: &sync.Once{}, done: stdinDone}
	stdout, stderr := spec.Stdout, spec.Stderr
	if stdout == nil {
		stdout = io.Discard
	}
	if stderr == nil {
		stderr = io.Discard
	}
	opts := []cio.Opt{cio.WithStreams(stdin, stdout, stderr), cio.WithFIFODir(e.fifoDir())}
	if spec.TTY {
		opts = append(opts, cio.WithTerminal)
	}
	id := execID()
	log := e.log.With("instance", guid, "exec", id)
	// Cleanup must happen even when ctx ended.
	cctx := context.WithoutCancel(ctx)
	proc, err := task.Exec(ctx, id, pspec, cio.NewCreator(opts...))
	if err != nil {
		return 0, fmt.Errorf("exec in %s: %w", guid, err)
	}
	defer func() {
		dctx, cancel := context.WithTimeout(cctx, 10*time.Second)
		defer cancel()
		if _, err := proc.Delete(dctx, client.WithProcessKill); err != nil && !isNotFoundOrStopped(err) {
			log.Warn("delete exec process", "err", err)
		}
	}()
	exitC, err := proc.Wait(cctx)
	if err != nil {
		return 0, fmt.Errorf("exec in %s: wait: %w", guid, err)
	}
	if err := proc.Start(ctx); err != nil {
		return 0, fmt.Errorf("exec in %s: start %q: %w", guid, spec.Args[0], err)
	}
	if spec.TTY && spec.Size.Rows > 0 && spec.Size.Cols > 0 {
		if err := proc.Resize(ctx, uint32(spec.Size.Cols), uint32(spec.Size.Rows)); err != nil {
			log.Debug("resize terminal", "err", err)
		}
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	watchCtx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	wg.Go(func() {
		if spec.TTY {
			// A terminal has no end of input: closing it would hang up
			// the session before the process read what came before.
			return
		}
		select {
		case <-stdinDone:
			if err := proc.CloseIO(cctx, client.WithStdinCloser); err != nil {
				log.Debug("close exec stdin", "err", err)
			}
		case <-watchCtx.Done():
		}
	})
	wg.Go(func() {
		for {
			select {
			case <-watchCtx.Done():
				return
			case sz, ok := <-spec.Resize:
				if !ok {
					return
				}
				if spec.TTY && sz.Rows > 0 && sz.Cols > 0 {
					if err := proc.Resize(watchCtx, uint32(sz.Cols), uint32(sz.Rows)); err != nil && watchCtx.Err() == nil {
						log.Debug("resize terminal", "err", err)
					}
				}
			}
		}
	})

	var st client.ExitStatus
	select {
	case st = <-exitC:
	case <-ctx.Done():
		if err := proc.Kill(cctx, syscall.SIGKILL); err != nil && !isNotFoundOrStopped(err) {
			log.Warn("kill exec process", "err", err)
		}
		select {
		case <-exitC:
		case <-time.After(10 * time.Second):
		}
		return 0, fmt.Errorf("exec in %s: %w", guid, ctx.Err())
	}
	stopWatch()
	// The output FIFOs close once every holder of the process's output
	// (its children too) is gone: wait for the copy, but not for a
	// daemonised child that keeps them open.
	copied := make(chan struct{})
	go func() { proc.IO().Wait(); close(copied) }()
	select {
	case <-copied:
	case <-time.After(2 * time.Second):
	case <-ctx.Done():
	}
	code, _, err := st.Result()
	if err != nil {
		return 0, fmt.Errorf("exec in %s: %w", guid, err)
	}
	return int(code), nil
}

// execProcess is the container's process spec with Exec's argv, cwd, user,
// environment and terminal: still no capabilities, no new privileges, the
// same rlimits, apparmor and seccomp (which are the container's).
func execProcess(base *specs.Process, spec ExecSpec) *specs.Process {
	p := &specs.Process{}
	if base != nil {
		*p = *base
		p.Env = append([]string(nil), base.Env...)
	}
	p.Args = append([]string(nil), spec.Args...)
	p.Cwd = execCwd
	p.Env = append(p.Env, spec.Env...)
	p.Terminal = spec.TTY
	p.ConsoleSize = nil
	if spec.TTY {
		p.Env = setEnv(p.Env, "TERM", "xterm-256color")
		if spec.Size.Rows > 0 && spec.Size.Cols > 0 {
			p.ConsoleSize = &specs.Box{Height: uint(spec.Size.Rows), Width: uint(spec.Size.Cols)}
		}
	}
	p.User = specs.User{UID: stack.VcapUID, GID: stack.VcapGID}
	p.Capabilities = &specs.LinuxCapabilities{}
	p.NoNewPrivileges = true
	return p
}

// setEnv sets k unless env already has it.
func setEnv(env []string, k, v string) []string {
	for _, kv := range env {
		if strings.HasPrefix(kv, k+"=") {
			return env
		}
	}
	return append(env, k+"="+v)
}

func execID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return "exec-" + hex.EncodeToString(b)
}

func (e *Executor) fifoDir() string { return filepath.Join(e.cfg.StateDir, "fifo") }

// eofReader closes done when r reaches EOF (or fails).
type eofReader struct {
	r    io.Reader
	once *sync.Once
	done chan struct{}
}

func (r eofReader) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if err != nil {
		r.once.Do(func() { close(r.done) })
	}
	return n, err
}

// acquireExec counts an Exec session against max.
func (i *instance) acquireExec(max int) (func(), error) {
	i.mu.Lock()
	defer i.mu.Unlock()
	if i.execs >= max {
		return nil, fmt.Errorf("%w (at most %d at once)", ErrTooManyExecs, max)
	}
	i.execs++
	return func() {
		i.mu.Lock()
		i.execs--
		i.mu.Unlock()
	}, nil
}
