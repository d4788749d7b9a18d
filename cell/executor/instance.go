package executor

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"

	cgroup1stats "github.com/containerd/cgroups/v3/cgroup1/stats"
	cgroup2stats "github.com/containerd/cgroups/v3/cgroup2/stats"
	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/contrib/seccomp"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/basinpaas/basin/stack"
)

// specOpts is the OCI spec of an app container: basin-launcher as vcap, no
// capabilities, no new privileges, the default seccomp profile, limits, the
// CF environment and the instance's network namespace.
func (e *Executor) specOpts(spec Spec, netnsPath string, ports []PortMapping) []oci.SpecOpts {
	args := []string{launcherPath}
	if spec.StartCommand != "" {
		args = append(args, spec.StartCommand)
	}
	if len(spec.Args) > 0 {
		args = spec.Args
	}
	mounts := []specs.Mount{{
		Destination: launcherPath, Type: "bind", Source: e.cfg.LauncherPath,
		Options: []string{"rbind", "ro", "nosuid", "nodev"},
	}}
	for _, m := range spec.Mounts {
		opts := []string{"rbind", "rw", "nosuid", "nodev"}
		if m.ReadOnly {
			opts[1] = "ro"
		}
		mounts = append(mounts, specs.Mount{Destination: m.Destination, Type: "bind", Source: m.Source, Options: opts})
	}
	if _, err := os.Stat("/etc/resolv.conf"); err == nil {
		mounts = append(mounts, specs.Mount{Destination: "/etc/resolv.conf", Type: "bind", Source: "/etc/resolv.conf", Options: []string{"rbind", "ro", "nosuid", "nodev", "noexec"}})
	}
	hostname := spec.InstanceGUID
	if len(hostname) > 63 {
		hostname = hostname[:63]
	}
	mem := uint64(spec.MemoryMB) << 20
	return []oci.SpecOpts{
		oci.WithDefaultSpec(),
		oci.WithProcessArgs(args...),
		oci.WithProcessCwd(spec.Cwd),
		oci.WithEnv(spec.env(e.cfg.AdvertiseAddress, ports)),
		oci.WithUIDGID(stack.VcapUID, stack.VcapGID),
		oci.WithCapabilities([]string{}),
		oci.WithAmbientCapabilities([]string{}),
		oci.WithNoNewPrivileges,
		// After the capabilities: the profile allows syscalls by the
		// capabilities the process has.
		seccomp.WithDefaultProfile(),
		oci.WithMemoryLimit(mem),
		oci.WithCPUShares(spec.CPUShares),
		oci.WithPidsLimit(spec.PidsLimit),
		// Cloud Foundry's default file descriptor limit (VCAP_APPLICATION
		// says so); containerd's default is 1024.
		oci.WithRlimit(&specs.POSIXRlimit{Type: "RLIMIT_NOFILE", Hard: fdLimit, Soft: fdLimit}),
		oci.WithHostname(hostname),
		oci.WithMounts(mounts),
		oci.WithLinuxNamespace(specs.LinuxNamespace{Type: specs.NetworkNamespace, Path: netnsPath}),
	}
}

const fdLimit = 16384

// instance is the executor's record of one container it manages.
type instance struct {
	e    *Executor
	id   string
	logs *LogBuffer

	healthy chan struct{} // closed on the first passing health check
	done    chan struct{} // closed once the instance is gone

	mu        sync.Mutex
	info      Info
	hc        HealthCheck
	memoryMB  int64
	netnsPath string
	killWhy   string // set by whoever kills it first (stop, health)
	stopped   bool
	exit      ExitInfo
	task      client.Task
	stdout    *lineWriter
	stderr    *lineWriter
	execs     int // running Exec sessions
}

func newInstance(e *Executor, id string, logs *LogBuffer) *instance {
	return &instance{
		e: e, id: id, logs: logs, healthy: make(chan struct{}), done: make(chan struct{}),
		stdout: &lineWriter{buf: logs, source: SourceApp, stream: "stdout"}, stderr: &lineWriter{buf: logs, source: SourceApp, stream: "stderr"},
	}
}

func (i *instance) setMeta(process string, index int, hc HealthCheck, memoryMB int64, info Info, netnsPath string) {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.info, i.hc, i.memoryMB, i.netnsPath = info, hc, memoryMB, netnsPath
}

// started records the running task, so Stop can signal it from now on.
func (i *instance) started(task client.Task) Info {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.task = task
	i.info.PID = task.Pid()
	return i.info
}

func (i *instance) snapshot() Info {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.info
}

func (i *instance) exitInfo() ExitInfo {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.exit
}

func (i *instance) ioCreator(fifoDir string) cio.Creator {
	return cio.NewCreator(cio.WithStreams(nil, i.stdout, i.stderr), cio.WithFIFODir(fifoDir))
}

func (i *instance) ioAttach() cio.Attach {
	return cio.NewAttach(cio.WithStreams(nil, i.stdout, i.stderr))
}

// kill records why the instance is being killed (the first reason wins) and
// sends sig to all its processes.
func (i *instance) kill(ctx context.Context, why string, sig syscall.Signal, stop bool) error {
	i.mu.Lock()
	if i.killWhy == "" {
		i.killWhy = why
	}
	if stop {
		i.stopped = true
	}
	t := i.task
	i.mu.Unlock()
	if t == nil {
		return nil
	}
	if err := t.Kill(ctx, sig, client.WithKillAll); err != nil {
		return ignoreNotFound(err)
	}
	return nil
}

func (i *instance) stop(ctx context.Context, grace time.Duration) error {
	i.logs.Append(SourceCell, "", "Stopping instance")
	if err := i.kill(ctx, "stopped", killSignal, true); err != nil {
		return fmt.Errorf("stop %s: %w", i.id, err)
	}
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-i.done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("stop %s: %w", i.id, ctx.Err())
	case <-t.C:
	}
	i.logs.Append(SourceCell, "", "Grace period over, sending SIGKILL")
	if err := i.kill(ctx, "stopped", syscall.SIGKILL, true); err != nil {
		return fmt.Errorf("stop %s: %w", i.id, err)
	}
	select {
	case <-i.done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("stop %s: %w", i.id, ctx.Err())
	}
}

// monitor owns the instance from its start to its end: it runs the health
// checks, and on exit it works out why, frees everything and reports. When
// ctx ends (the cell shuts down) it returns and leaves the container be.
func (i *instance) monitor(ctx context.Context, container client.Container, task client.Task, exitC <-chan client.ExitStatus, adopted bool) {
	i.mu.Lock()
	hc, stopped := i.hc, i.stopped
	i.mu.Unlock()
	if stopped {
		// Stop came while the container was being created, before there
		// was a task to signal.
		_ = i.kill(ctx, "stopped", syscall.SIGKILL, true)
	}

	hctx, stopHealth := context.WithCancel(ctx)
	healthDone := make(chan struct{})
	go func() {
		defer close(healthDone)
		i.checkHealth(hctx, hc, adopted)
	}()

	var status client.ExitStatus
	select {
	case <-ctx.Done():
		stopHealth()
		<-healthDone
		return
	case status = <-exitC:
	}
	stopHealth()
	<-healthDone

	cctx := context.WithoutCancel(ctx)
	x := ExitInfo{Status: status.ExitCode(), Time: status.ExitTime()}
	if x.Time.IsZero() {
		x.Time = time.Now()
	}
	x.OOM = i.e.oomKilled(i.id) || oomFromMetrics(cctx, task)
	i.mu.Lock()
	why, stopped := i.killWhy, i.stopped
	i.mu.Unlock()
	switch {
	case stopped:
		x.Stopped, x.Reason = true, "stopped"
	case x.OOM:
		x.Reason = fmt.Sprintf("out of memory: killed at the %d MB memory limit (exit status %d)", i.memoryMB, x.Status)
	case why != "":
		x.Reason = fmt.Sprintf("%s (exit status %d)", why, x.Status)
	default:
		x.Reason = fmt.Sprintf("app exited with status %d", x.Status)
	}
	// Delete the task first: that closes the output FIFOs, so the last
	// lines are in the buffer before the report takes them.
	i.mu.Lock()
	netnsPath, ports := i.netnsPath, i.info.Ports
	i.mu.Unlock()
	if _, err := task.Delete(cctx); err != nil && !isNotFoundOrStopped(err) {
		i.e.log.Error("delete task", "instance", i.id, "err", err)
	}
	i.stdout.flush()
	i.stderr.flush()
	i.logs.Append(SourceCell, "", "Exited: "+x.Reason)
	x.LastLines = i.logs.Recent(i.e.cfg.ExitLines)
	if err := i.e.teardown(cctx, container, ports, netnsPath); err != nil {
		i.e.log.Error("tear down instance", "instance", i.id, "err", err)
	}
	i.mu.Lock()
	i.exit = x
	i.info.State = StateExited
	info := i.info
	i.mu.Unlock()
	i.logs.Close()
	i.e.forget(i)
	close(i.done)
	i.e.cfg.OnEvent(Event{Type: EventExited, InstanceGUID: i.id, ProcessGUID: info.ProcessGUID, Index: info.Index, Info: info, Exit: &x})
}

func isNotFoundOrStopped(err error) bool {
	return ignoreNotFound(err) == nil
}

// oomFromMetrics asks the memory cgroup whether the kernel killed anything
// for lack of memory: the OOM event may arrive after the exit, or not at all
// when the cell was restarted in between.
func oomFromMetrics(ctx context.Context, task client.Task) bool {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	m, err := task.Metrics(ctx)
	if err != nil || m == nil || m.Data == nil {
		return false
	}
	v, err := typeurl.UnmarshalAny(m.Data)
	if err != nil {
		return false
	}
	switch s := v.(type) {
	case *cgroup1stats.Metrics:
		return s.GetMemoryOomControl().GetOomKill() > 0
	case *cgroup2stats.Metrics:
		return s.GetMemoryEvents().GetOomKill() > 0
	}
	return false
}

// checkHealth polls fast until the first success (or kills the instance at
// the start timeout), reports it healthy, then checks liveness every
// Interval and kills the instance on the first failure.
func (i *instance) checkHealth(ctx context.Context, hc HealthCheck, adopted bool) {
	info := i.snapshot()
	check := i.checker(hc, info)
	deadline := time.NewTimer(hc.StartTimeout)
	defer deadline.Stop()
	poll := time.NewTicker(i.e.cfg.StartPollInterval)
	defer poll.Stop()
	var last error
	for {
		if last = check(ctx); last == nil {
			break
		}
		select {
		case <-ctx.Done():
			return
		case <-deadline.C:
			msg := fmt.Sprintf("failed to become healthy within %s: %v", hc.StartTimeout, last)
			i.logs.Append(SourceCell, "", "Instance "+msg)
			_ = i.kill(context.WithoutCancel(ctx), msg, syscall.SIGKILL, false)
			return
		case <-poll.C:
		}
	}
	i.mu.Lock()
	i.info.State = StateRunning
	info = i.info
	i.mu.Unlock()
	close(i.healthy)
	i.logs.Append(SourceCell, "", "Container became healthy")
	i.e.cfg.OnEvent(Event{Type: EventHealthy, InstanceGUID: i.id, ProcessGUID: info.ProcessGUID, Index: info.Index, Info: info})
	if hc.Type == HealthProcess {
		return
	}
	live := time.NewTicker(hc.Interval)
	defer live.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-live.C:
		}
		if err := check(ctx); err != nil && ctx.Err() == nil {
			msg := "liveness check failed: " + err.Error()
			i.logs.Append(SourceCell, "", "Instance "+msg)
			_ = i.kill(context.WithoutCancel(ctx), msg, syscall.SIGKILL, false)
			return
		}
	}
}

// checker returns one health check against the container's own address,
// which the host reaches over the bridge.
func (i *instance) checker(hc HealthCheck, info Info) func(context.Context) error {
	addr := net.JoinHostPort(info.ContainerIP, strconv.Itoa(int(hc.Port)))
	switch hc.Type {
	case HealthProcess:
		return func(context.Context) error { return nil }
	case HealthHTTP:
		hcl := &http.Client{
			Timeout: hc.Timeout,
			Transport: &http.Transport{
				DisableKeepAlives: true, Proxy: nil,
				DialContext: (&net.Dialer{Timeout: hc.Timeout}).DialContext,
			},
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		}
		url := "http://" + addr + hc.Path
		return func(ctx context.Context) error {
			req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
			if err != nil {
				return err
			}
			resp, err := hcl.Do(req)
			if err != nil {
				return err
			}
			resp.Body.Close()
			if resp.StatusCode < 200 || resp.StatusCode > 299 {
				return fmt.Errorf("GET %s: status %d", hc.Path, resp.StatusCode)
			}
			return nil
		}
	default:
		d := &net.Dialer{Timeout: hc.Timeout}
		return func(ctx context.Context) error {
			c, err := d.DialContext(ctx, "tcp", addr)
			if err != nil {
				var op *net.OpError
				if errors.As(err, &op) {
					return fmt.Errorf("port %d: %w", hc.Port, op.Err)
				}
				return err
			}
			return c.Close()
		}
	}
}
