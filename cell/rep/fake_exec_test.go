package rep

import (
	"context"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/basinpaas/basin/cell/executor"
)

// fakeExec stands in for the executor (the process boundary to containerd):
// instances are records, health and exits are driven by the test.
type fakeExec struct {
	onEvent func(executor.Event)

	mu          sync.Mutex
	instances   map[string]*fakeInst
	preexist    map[string]executor.Info // containers left by an earlier process
	nextPort    uint16
	autoHealthy bool
	startErr    error
	stopped     []string
	stopCalls   map[string]time.Time // first Stop of each instance
	destroyed   []string
	adopted     []string
	gone        map[string]*executor.LogBuffer // logs outlive instances, as in the executor
	blocked     int                            // Exec sessions waiting for their context
}

type fakeInst struct {
	spec    executor.Spec
	info    executor.Info
	healthy chan struct{}
	done    chan struct{}
	logs    *executor.LogBuffer
}

func newFakeExec() *fakeExec {
	return &fakeExec{instances: map[string]*fakeInst{}, preexist: map[string]executor.Info{}, gone: map[string]*executor.LogBuffer{}, nextPort: 40000, autoHealthy: true}
}

var _ Executor = (*fakeExec)(nil)

func (f *fakeExec) Start(_ context.Context, spec executor.Spec) (executor.Info, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.startErr != nil {
		return executor.Info{}, f.startErr
	}
	if _, ok := f.instances[spec.InstanceGUID]; ok {
		return executor.Info{}, executor.ErrExists
	}
	ports := spec.Ports
	if len(ports) == 0 {
		ports = []uint16{8080}
	}
	info := executor.Info{InstanceGUID: spec.InstanceGUID, ProcessGUID: spec.ProcessGUID, Index: spec.Index,
		State: executor.StateStarting, HostIP: "127.0.0.1", ContainerIP: "10.0.0.2", PID: 1000, Labels: spec.Labels}
	for _, p := range ports {
		f.nextPort++
		info.Ports = append(info.Ports, executor.PortMapping{ContainerPort: p, HostPort: f.nextPort})
	}
	in := &fakeInst{spec: spec, info: info, healthy: make(chan struct{}), done: make(chan struct{}), logs: executor.NewLogBuffer(100, nil)}
	in.logs.Append(executor.SourceCell, "", "Creating container")
	f.instances[spec.InstanceGUID] = in
	if f.autoHealthy {
		close(in.healthy)
	}
	return info, nil
}

func (f *fakeExec) get(guid string) *fakeInst {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.instances[guid]
}

func (f *fakeExec) WaitHealthy(ctx context.Context, guid string) (executor.Info, error) {
	in := f.get(guid)
	if in == nil {
		return executor.Info{}, executor.ErrNotFound
	}
	select {
	case <-in.healthy:
		return in.info, nil
	case <-in.done:
		return executor.Info{}, fmt.Errorf("wait for %s: exited before healthy", guid)
	case <-ctx.Done():
		return executor.Info{}, ctx.Err()
	}
}

// exit ends an instance as the executor would: resources freed, then the
// event.
func (f *fakeExec) exit(guid string, x executor.ExitInfo) {
	f.mu.Lock()
	in := f.instances[guid]
	if in == nil {
		f.mu.Unlock()
		return
	}
	delete(f.instances, guid)
	f.gone[guid] = in.logs
	if x.Stopped {
		f.stopped = append(f.stopped, guid)
	}
	f.mu.Unlock()
	x.LastLines = in.logs.Recent(20)
	in.logs.Close()
	close(in.done)
	f.onEvent(executor.Event{Type: executor.EventExited, InstanceGUID: guid, ProcessGUID: in.info.ProcessGUID, Index: in.info.Index, Info: in.info, Exit: &x})
}

func (f *fakeExec) Stop(_ context.Context, guid string, _ time.Duration) error {
	f.mu.Lock()
	if f.stopCalls == nil {
		f.stopCalls = map[string]time.Time{}
	}
	if _, ok := f.stopCalls[guid]; !ok {
		f.stopCalls[guid] = time.Now()
	}
	f.mu.Unlock()
	if f.get(guid) == nil {
		return executor.ErrNotFound
	}
	go f.exit(guid, executor.ExitInfo{Status: 143, Reason: "stopped", Stopped: true, Time: time.Now()})
	return nil
}

func (f *fakeExec) List(context.Context) ([]executor.Info, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []executor.Info
	for _, in := range f.preexist {
		out = append(out, in)
	}
	for _, in := range f.instances {
		out = append(out, in.info)
	}
	return out, nil
}

func (f *fakeExec) Adopt(_ context.Context, guid string) (executor.Info, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	info, ok := f.preexist[guid]
	if !ok {
		return executor.Info{}, executor.ErrNotFound
	}
	delete(f.preexist, guid)
	in := &fakeInst{info: info, healthy: make(chan struct{}), done: make(chan struct{}), logs: executor.NewLogBuffer(100, nil)}
	close(in.healthy)
	f.instances[guid] = in
	f.adopted = append(f.adopted, guid)
	return info, nil
}

func (f *fakeExec) Destroy(_ context.Context, guid string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.preexist[guid]; !ok {
		if _, ok := f.instances[guid]; !ok {
			return executor.ErrNotFound
		}
	}
	delete(f.preexist, guid)
	delete(f.instances, guid)
	f.destroyed = append(f.destroyed, guid)
	return nil
}

func (f *fakeExec) Logs(guid string) (*executor.LogBuffer, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if in := f.instances[guid]; in != nil {
		return in.logs, nil
	}
	if b := f.gone[guid]; b != nil {
		return b, nil
	}
	return nil, executor.ErrNotFound
}

func (f *fakeExec) running() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for g := range f.instances {
		out = append(out, g)
	}
	return out
}

// stopCalled says when Stop was first called for guid.
func (f *fakeExec) stopCalled(guid string) (time.Time, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	t, ok := f.stopCalls[guid]
	return t, ok
}

func (f *fakeExec) wasStopped(guid string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, g := range f.stopped {
		if g == guid {
			return true
		}
	}
	return false
}

// Exec plays a few commands on a running fake instance: "echo ARGS...",
// "cat" (stdin to stdout), "stderr TEXT", "exit N", "resizes N" (prints the
// first N sizes), "block" (until ctx ends, counting in blocked).
func (f *fakeExec) Exec(ctx context.Context, guid string, spec executor.ExecSpec) (int, error) {
	if f.get(guid) == nil {
		return 0, fmt.Errorf("exec in %s: %w", guid, executor.ErrNotFound)
	}
	if len(spec.Args) == 0 {
		spec.Args = []string{"echo", "login shell"}
	}
	switch spec.Args[0] {
	case "echo":
		fmt.Fprintln(spec.Stdout, strings.Join(spec.Args[1:], " "))
	case "stderr":
		fmt.Fprintln(spec.Stderr, strings.Join(spec.Args[1:], " "))
	case "cat":
		if _, err := io.Copy(spec.Stdout, spec.Stdin); err != nil {
			return 0, err
		}
	case "exit":
		n, _ := strconv.Atoi(spec.Args[1])
		return n, nil
	case "resizes":
		n, _ := strconv.Atoi(spec.Args[1])
		fmt.Fprintf(spec.Stdout, "tty=%v %dx%d\n", spec.TTY, spec.Size.Rows, spec.Size.Cols)
		for range n {
			sz := <-spec.Resize
			fmt.Fprintf(spec.Stdout, "%dx%d\n", sz.Rows, sz.Cols)
		}
	case "block":
		f.mu.Lock()
		f.blocked++
		f.mu.Unlock()
		<-ctx.Done()
		f.mu.Lock()
		f.blocked--
		f.mu.Unlock()
		return 0, ctx.Err()
	default:
		return 127, nil
	}
	return 0, nil
}

func (f *fakeExec) blockedExecs() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.blocked
}
