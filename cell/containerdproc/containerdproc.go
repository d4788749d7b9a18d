// Package containerdproc runs Debian's containerd daemon as a child process
// with its own root, state directory, socket and generated configuration.
//
// These machines have no systemd and no system containerd, so the test
// harness, `basin dev up` and a cell started without a socket flag start
// their own daemon here and stop it, by PID, when their context ends.
package containerdproc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/client"
)

// Config says where the daemon keeps its files and how to run it.
type Config struct {
	// Dir holds root/, state/, containerd.sock and config.toml. Keep it
	// short: a unix socket path is limited to 108 bytes.
	Dir string
	// Binary is the containerd executable; default "containerd" from PATH.
	Binary string
	// Output receives the daemon's stderr log; default discarded.
	Output io.Writer
	// StartTimeout bounds the wait for the daemon to answer; default 30 s.
	StartTimeout time.Duration
	// StopTimeout is how long SIGTERM may take before SIGKILL; default 10 s.
	StopTimeout time.Duration
	// Logger receives one line when the daemon exits unexpectedly.
	Logger *slog.Logger
}

// Daemon is a running containerd child process.
type Daemon struct {
	address string
	cmd     *exec.Cmd
	done    chan struct{} // closed when the process has exited
	waitErr error         // valid once done is closed
	stopped chan struct{} // closed once Run's stop sequence completed
}

// Address is the daemon's gRPC socket path.
func (d *Daemon) Address() string { return d.address }

// PID is the daemon's process id.
func (d *Daemon) PID() int { return d.cmd.Process.Pid }

// Done is closed when the daemon process has exited.
func (d *Daemon) Done() <-chan struct{} { return d.done }

// Stopped is closed once the daemon has exited after ctx ended (or on its
// own): callers wait on it before removing Dir.
func (d *Daemon) Stopped() <-chan struct{} { return d.stopped }

// Err is the process's exit error once Done is closed.
func (d *Daemon) Err() error {
	<-d.done
	return d.waitErr
}

// Binaries reports the first host binary containerd needs that is missing
// from PATH, so callers (tests) can skip with a clear reason.
func Binaries() error {
	for _, b := range []string{"containerd", "containerd-shim-runc-v2", "runc"} {
		if _, err := exec.LookPath(b); err != nil {
			return fmt.Errorf("%s not found in PATH (run scripts/setup.sh as root): %w", b, err)
		}
	}
	return nil
}

// configTOML is containerd 1.6's version 2 configuration. CRI and the
// snapshotters basin does not use are disabled so the daemon starts fast and
// quietly; the default runtime is runc through the v2 shim; overlayfs is the
// default snapshotter.
const configTOML = `version = 2
root = %q
state = %q
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = %q

[ttrpc]
  address = %q

[plugins."io.containerd.runtime.v1.linux"]
  shim_debug = false
`

// Start writes the configuration, starts containerd and waits until it
// answers. When ctx ends the daemon gets SIGTERM, then SIGKILL after
// StopTimeout; Stopped is closed once it has exited.
func Start(ctx context.Context, cfg Config) (*Daemon, error) {
	if cfg.Dir == "" {
		return nil, errors.New("start containerd: Config.Dir is empty")
	}
	if cfg.Binary == "" {
		cfg.Binary = "containerd"
	}
	if cfg.StartTimeout == 0 {
		cfg.StartTimeout = 30 * time.Second
	}
	if cfg.StopTimeout == 0 {
		cfg.StopTimeout = 10 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Output == nil {
		cfg.Output = io.Discard
	}
	dir, err := filepath.Abs(cfg.Dir)
	if err != nil {
		return nil, fmt.Errorf("start containerd in %s: %w", cfg.Dir, err)
	}
	address := filepath.Join(dir, "containerd.sock")
	if len(address) > 100 {
		return nil, fmt.Errorf("start containerd: socket path %s is longer than a unix socket allows", address)
	}
	for _, d := range []string{"root", "state"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o711); err != nil {
			return nil, fmt.Errorf("start containerd: %w", err)
		}
	}
	conf := fmt.Sprintf(configTOML, filepath.Join(dir, "root"), filepath.Join(dir, "state"), address, address+".ttrpc")
	confPath := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		return nil, fmt.Errorf("start containerd: write config: %w", err)
	}

	cmd := exec.Command(cfg.Binary, "--config", confPath)
	cmd.Stdout = cfg.Output
	cmd.Stderr = cfg.Output
	// Own process group so a terminal's ^C reaches us, not the daemon, and
	// we stop it in order; Pdeathsig stops it if we die without cleaning up.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	d := &Daemon{address: address, cmd: cmd, done: make(chan struct{}), stopped: make(chan struct{})}
	// Pdeathsig fires when the forking *thread* exits, and Go ends threads
	// that a goroutine locked and left (basin does that to create network
	// namespaces). Forking from a locked goroutine that lives as long as the
	// daemon keeps the signal for when this process really dies.
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		d.waitErr = cmd.Wait()
		close(d.done)
	}()
	if err := <-started; err != nil {
		return nil, fmt.Errorf("start containerd %s: %w", cfg.Binary, err)
	}
	// The stop goroutine is owned by the daemon: it ends when the process
	// has exited, which it forces once ctx is done.
	go func() {
		defer close(d.stopped)
		select {
		case <-d.done:
			if ctx.Err() == nil {
				cfg.Logger.Error("containerd exited", "pid", cmd.Process.Pid, "err", d.waitErr)
			}
			return
		case <-ctx.Done():
		}
		d.stop(cfg.StopTimeout)
	}()

	if err := d.waitReady(ctx, cfg.StartTimeout); err != nil {
		d.stop(cfg.StopTimeout)
		return nil, err
	}
	return d, nil
}

func (d *Daemon) stop(grace time.Duration) {
	select {
	case <-d.done:
		return
	default:
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-d.done:
	case <-t.C:
		_ = d.cmd.Process.Kill()
		<-d.done
	}
}

func (d *Daemon) waitReady(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		select {
		case <-d.done:
			return fmt.Errorf("start containerd on %s: exited before answering: %w", d.address, d.waitErr)
		case <-ctx.Done():
			return fmt.Errorf("start containerd on %s: not answering after %s: %w (last: %v)", d.address, timeout, ctx.Err(), last)
		case <-tick.C:
		}
		if _, err := os.Stat(d.address); err != nil {
			last = err
			continue
		}
		if last = probe(ctx, d.address); last == nil {
			return nil
		}
	}
}

func probe(ctx context.Context, address string) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	c, err := client.New(address, client.WithTimeout(2*time.Second))
	if err != nil {
		return err
	}
	defer c.Close()
	ok, err := c.IsServing(ctx)
	if err != nil {
		return err
	}
	if !ok {
		return errors.New("not serving")
	}
	return nil
}

// ShortDir makes a short temporary directory for a daemon (socket paths are
// limited to 108 bytes, and t.TempDir() paths can be long).
func ShortDir(prefix string) (string, error) {
	prefix = strings.NewReplacer("/", "-", " ", "-").Replace(prefix)
	if len(prefix) > 20 {
		prefix = prefix[:20]
	}
	return os.MkdirTemp("", prefix)
}
