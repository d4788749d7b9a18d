// Command bench measures how fast a cell starts app instances, against the
// raw containerd client doing only what any container start needs (snapshot,
// CNI, task start, first HTTP 200) in the same run on the same machine.
//
// It needs root, containerd, runc, the CNI plugins and busybox-static (run
// scripts/setup.sh); it starts its own containerd. `make bench-cell` runs it.
package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	cni "github.com/containerd/go-cni"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/basinpaas/basin/cell/containerdproc"
	"github.com/basinpaas/basin/cell/executor"
	"github.com/basinpaas/basin/stack"
)

func main() {
	n := flag.Int("n", 20, "instances started at once")
	iters := flag.Int("iterations", 10, "sequential single starts for the p50")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *n, *iters); err != nil {
		fmt.Fprintf(os.Stderr, "bench-cell: %v\n", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, n, iters int) error {
	if os.Geteuid() != 0 {
		return errors.New("needs root (containers, CNI)")
	}
	if err := containerdproc.Binaries(); err != nil {
		return err
	}
	dir, err := containerdproc.ShortDir("basin-bench")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	dctx, stopDaemon := context.WithCancel(ctx)
	d, err := containerdproc.Start(dctx, containerdproc.Config{Dir: filepath.Join(dir, "ctrd")})
	if err != nil {
		stopDaemon()
		return err
	}
	defer func() { stopDaemon(); <-d.Stopped() }()
	c, err := client.New(d.Address())
	if err != nil {
		return fmt.Errorf("containerd client: %w", err)
	}
	defer c.Close()

	launcher := filepath.Join(dir, "basin-launcher")
	build := exec.CommandContext(ctx, "go", "build", "-o", launcher, "github.com/basinpaas/basin/cmd/basin-launcher")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("build basin-launcher: %w\n%s", err, out)
	}
	stackSnap, err := stack.Ensure(ctx, c, "tiny", dir)
	if err != nil {
		return err
	}
	drop, err := writeDroplet(dir)
	if err != nil {
		return err
	}

	raw, err := newRaw(ctx, c, dir, stackSnap, drop)
	if err != nil {
		return err
	}
	defer raw.close()
	b, err := newBasin(ctx, c, dir, launcher, drop)
	if err != nil {
		return err
	}
	defer b.close()
	w, err := newWholeCell(ctx, c, dir, launcher, drop)
	if err != nil {
		return fmt.Errorf("cell (rep + executor): %w", err)
	}
	defer w.close()

	// Raw and basin alternate, start by start and batch by batch, so both
	// see the same machine: other work on it shifts both figures alike.
	var rawDs, basinDs, cellDs []time.Duration
	for i := range iters {
		for _, m := range []struct {
			start starter
			ds    *[]time.Duration
		}{{raw.start, &rawDs}, {b.start, &basinDs}, {w.start, &cellDs}} {
			d, err := measureOne(ctx, fmt.Sprintf("single-%d", i), m.start)
			if err != nil {
				return err
			}
			*m.ds = append(*m.ds, d)
		}
	}
	var rawBatches, basinBatches, cellBatches []time.Duration
	for round := range batchRounds {
		d, err := measureBatch(ctx, round, n, raw.start)
		if err != nil {
			return fmt.Errorf("raw batch: %w", err)
		}
		rawBatches = append(rawBatches, d)
		if d, err = measureBatch(ctx, round, n, b.start); err != nil {
			return fmt.Errorf("basin batch: %w", err)
		}
		basinBatches = append(basinBatches, d)
		if d, err = measureBatch(ctx, round, n, w.start); err != nil {
			return fmt.Errorf("cell batch: %w", err)
		}
		cellBatches = append(cellBatches, d)
	}
	rawSingle, basinSingle, cellSingle := median(rawDs), median(basinDs), median(cellDs)
	rawAll, basinAll, cellAll := median(rawBatches), median(basinBatches), median(cellBatches)

	fmt.Printf("raw containerd: one instance p50 %d ms; %d at once %d ms (median of %d)\n", ms(rawSingle), n, ms(rawAll), batchRounds)
	fmt.Printf("basin executor: one instance p50 %d ms (%.2fx raw); %d at once %d ms (%.2fx raw)\n",
		ms(basinSingle), float64(basinSingle)/float64(rawSingle), n, ms(basinAll), float64(basinAll)/float64(rawAll))
	fmt.Printf("basin cell (Perform → claim → start → RUNNING → 200): one instance p50 %d ms (%.2fx raw); %d at once %d ms (%.2fx raw)\n",
		ms(cellSingle), float64(cellSingle)/float64(rawSingle), n, ms(cellAll), float64(cellAll)/float64(rawAll))
	fmt.Printf("RESULT cell_start_ms_p50 %d\n", ms(cellSingle))
	fmt.Printf("RESULT cell_20_ms %d\n", ms(cellAll))
	fmt.Printf("RESULT droplet_unpacks %d\n", b.e.DropletUnpacks())
	fmt.Printf("RESULT raw_start_ms_p50 %d\n", ms(rawSingle))
	fmt.Printf("RESULT basin_start_ms_p50 %d\n", ms(basinSingle))
	fmt.Printf("RESULT raw_20_ms %d\n", ms(rawAll))
	fmt.Printf("RESULT basin_20_ms %d\n", ms(basinAll))
	// The rep fetches a droplet into its cache once per digest; every start
	// of the whole-cell path went through it.
	fmt.Printf("RESULT droplet_fetches %d\n", w.rep.DropletFetches())
	return nil
}

func ms(d time.Duration) int64 { return d.Milliseconds() }

// starter starts one instance and returns when it answered HTTP 200, with a
// function that removes it (not measured).
type starter func(ctx context.Context, id string) (cleanup func(), err error)

// batchRounds is how many batches of each kind run; the median counts.
const batchRounds = 3

func measureOne(ctx context.Context, id string, start starter) (time.Duration, error) {
	t0 := time.Now()
	cleanup, err := start(ctx, id)
	if err != nil {
		return 0, err
	}
	d := time.Since(t0)
	cleanup()
	return d, nil
}

func median(ds []time.Duration) time.Duration {
	ds = slices.Clone(ds)
	slices.Sort(ds)
	return ds[len(ds)/2]
}

func measureBatch(ctx context.Context, round, n int, start starter) (time.Duration, error) {
	var wg sync.WaitGroup
	errs := make([]error, n)
	cleanups := make([]func(), n)
	t0 := time.Now()
	for i := range n {
		wg.Go(func() { cleanups[i], errs[i] = start(ctx, fmt.Sprintf("batch-%d-%d", round, i)) })
	}
	wg.Wait()
	took := time.Since(t0)
	for _, c := range cleanups {
		if c != nil {
			c()
		}
	}
	return took, errors.Join(errs...)
}

// waitHTTP polls url every 25 ms (the executor's start poll interval) until
// it answers 200.
func waitHTTP(ctx context.Context, url string) error {
	hc := &http.Client{Timeout: time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := hc.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("GET %s: %w (last %v)", url, ctx.Err(), err)
		case <-time.After(25 * time.Millisecond):
		}
	}
}

func writeDroplet(dir string) (executor.Droplet, error) {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	tw := tar.NewWriter(zw)
	files := map[string]string{
		"app/index.html":   "hello from the bench\n",
		"staging_info.yml": `{"detected_buildpack":"bench","start_command":"exec httpd -f -p $PORT -h /home/vcap/app"}`,
	}
	for _, d := range []string{"app/", "deps/", "profile.d/", "tmp/", "logs/"} {
		tw.WriteHeader(&tar.Header{Name: d, Typeflag: tar.TypeDir, Mode: 0o755})
	}
	for name, body := range files {
		tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(body))})
		tw.Write([]byte(body))
	}
	tw.Close()
	zw.Close()
	p := filepath.Join(dir, "droplet.tgz")
	if err := os.WriteFile(p, buf.Bytes(), 0o644); err != nil {
		return executor.Droplet{}, err
	}
	sum := sha256.Sum256(buf.Bytes())
	return executor.Droplet{Digest: "sha256:" + hex.EncodeToString(sum[:]), Path: p}, nil
}

// basinCell runs the real executor.
type basinCell struct {
	e      *executor.Executor
	cancel context.CancelFunc
	done   chan error
	state  string
	start  starter
}

func newBasin(ctx context.Context, c *client.Client, dir, launcher string, drop executor.Droplet) (*basinCell, error) {
	state := filepath.Join(dir, "exec")
	e, err := executor.New(executor.Config{
		Client: c, LauncherPath: launcher, StateDir: state,
		Logger:      slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
		NetworkName: "basinbench", BridgeName: "basinbench0", Subnet: "10.217.0.0/24",
		HostPortLow: 62200, HostPortHigh: 62399, FirewallChain: "BASIN-BENCH-PROTECT",
	})
	if err != nil {
		return nil, err
	}
	rctx, cancel := context.WithCancel(ctx)
	b := &basinCell{e: e, cancel: cancel, done: make(chan error, 1), state: state}
	go func() { b.done <- e.Run(rctx) }()
	b.start = b.starter(drop)
	return b, nil
}

func (b *basinCell) starter(drop executor.Droplet) starter {
	return func(ctx context.Context, id string) (func(), error) {
		spec := executor.Spec{
			InstanceGUID: "basin-" + id, ProcessGUID: "bench", Stack: "tiny", Droplet: drop, MemoryMB: 64,
			StartCommand: "exec httpd -f -p $PORT -h /home/vcap/app",
		}
		info, err := b.e.Start(ctx, spec)
		if err != nil {
			return nil, err
		}
		cleanup := func() { _ = b.e.Stop(context.WithoutCancel(ctx), spec.InstanceGUID, 5*time.Second) }
		if _, err := b.e.WaitHealthy(ctx, spec.InstanceGUID); err != nil {
			cleanup()
			return nil, err
		}
		if err := waitHTTP(ctx, fmt.Sprintf("http://%s:%d/index.html", info.HostIP, info.Ports[0].HostPort)); err != nil {
			cleanup()
			return nil, err
		}
		return cleanup, nil
	}
}

func (b *basinCell) close() {
	b.cancel()
	<-b.done
	exec.Command("ip", "link", "del", "basinbench0").Run()
}

// rawCell is the baseline: the containerd client, go-cni and nothing else.
type rawCell struct {
	c      *client.Client
	cni    cni.CNI
	layer  string
	nsDir  string
	mu     sync.Mutex
	next   int
	bridge string
}

func newRaw(ctx context.Context, c *client.Client, dir, stackSnap string, drop executor.Droplet) (*rawCell, error) {
	// The droplet layer is committed once, up front, as a cell would have it
	// cached; unpacking it is not part of a start.
	layer := "bench/raw/" + drop.Digest
	err := stack.CommitLayer(ctx, c, layer, stackSnap, nil, func(root string) error {
		out, err := exec.CommandContext(ctx, "tar", "-xzf", drop.Path, "-C", filepath.Join(root, "home/vcap")).CombinedOutput()
		if err != nil {
			return fmt.Errorf("untar: %w: %s", err, out)
		}
		return exec.CommandContext(ctx, "chown", "-R", "2000:2000", filepath.Join(root, "home/vcap")).Run()
	})
	if err != nil {
		return nil, err
	}
	state := filepath.Join(dir, "raw")
	conf, _ := json.Marshal(map[string]any{
		"cniVersion": "1.0.0", "name": "basinraw",
		"plugins": []any{
			map[string]any{"type": "bridge", "bridge": "basinraw0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
				"ipam": map[string]any{"type": "host-local", "ranges": [][]map[string]string{{{"subnet": "10.218.0.0/24"}}},
					"routes": []map[string]string{{"dst": "0.0.0.0/0"}}, "dataDir": state + "/ipam"}},
			map[string]any{"type": "portmap", "capabilities": map[string]bool{"portMappings": true}, "snat": true},
		},
	})
	l, err := cni.New(cni.WithPluginDir([]string{"/usr/lib/cni"}), cni.WithMinNetworkCount(2))
	if err != nil {
		return nil, err
	}
	if err := l.Load(cni.WithLoNetwork, cni.WithConfListBytes(conf)); err != nil {
		return nil, err
	}
	nsDir := filepath.Join(state, "netns")
	if err := os.MkdirAll(nsDir, 0o700); err != nil {
		return nil, err
	}
	return &rawCell{c: c, cni: l, layer: layer, nsDir: nsDir, next: 62400, bridge: "basinraw0"}, nil
}

func (r *rawCell) close() { exec.Command("ip", "link", "del", r.bridge).Run() }

func (r *rawCell) start(ctx context.Context, id string) (func(), error) {
	ctx = namespaces.WithNamespace(ctx, stack.Namespace)
	id = "raw-" + id
	r.mu.Lock()
	port := r.next
	r.next++
	r.mu.Unlock()
	var undo []func()
	cleanup := func() {
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
	}
	bg := context.WithoutCancel(ctx)
	nsPath, err := pinNetNS(r.nsDir, id)
	if err != nil {
		return nil, err
	}
	undo = append(undo, func() { unix.Unmount(nsPath, unix.MNT_DETACH); os.Remove(nsPath) })
	pm := cni.WithCapabilityPortMap([]cni.PortMapping{{HostPort: int32(port), ContainerPort: 8080, Protocol: "tcp", HostIP: "127.0.0.1"}})
	if _, err := r.cni.Setup(ctx, id, nsPath, pm); err != nil {
		cleanup()
		return nil, err
	}
	undo = append(undo, func() { r.cni.Remove(bg, id, nsPath, pm) })
	// Without a lease the GC removes a new snapshot before the container
	// references it: a correct client needs one too.
	lctx, done, err := r.c.WithLease(ctx)
	if err != nil {
		cleanup()
		return nil, err
	}
	defer done(bg)
	sn := r.c.SnapshotService(stack.Snapshotter)
	if _, err := sn.Prepare(lctx, id, r.layer); err != nil {
		cleanup()
		return nil, err
	}
	undo = append(undo, func() { sn.Remove(bg, id) })
	ctr, err := r.c.NewContainer(lctx, id, client.WithSnapshotter(stack.Snapshotter), client.WithSnapshot(id),
		client.WithNewSpec(oci.WithDefaultSpec(), oci.WithProcessArgs("httpd", "-f", "-p", "8080", "-h", "/home/vcap/app"),
			oci.WithUIDGID(2000, 2000), oci.WithEnv([]string{"PATH=/bin:/usr/bin:/sbin:/usr/sbin"}),
			oci.WithLinuxNamespace(specs.LinuxNamespace{Type: specs.NetworkNamespace, Path: nsPath})))
	if err != nil {
		cleanup()
		return nil, err
	}
	undo = append(undo, func() { ctr.Delete(bg) })
	task, err := ctr.NewTask(ctx, cio.NullIO)
	if err != nil {
		cleanup()
		return nil, err
	}
	undo = append(undo, func() { task.Delete(bg, client.WithProcessKill) })
	if err := task.Start(ctx); err != nil {
		cleanup()
		return nil, err
	}
	if err := waitHTTP(ctx, "http://127.0.0.1:"+strconv.Itoa(port)+"/index.html"); err != nil {
		cleanup()
		return nil, err
	}
	return cleanup, nil
}

// pinNetNS creates a network namespace pinned on a file, on a thread that
// is discarded afterwards.
func pinNetNS(dir, id string) (string, error) {
	path := filepath.Join(dir, id)
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		return "", err
	}
	errc := make(chan error, 1)
	go func() {
		// No UnlockOSThread: the thread changed namespace and must exit.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- err
			return
		}
		errc <- unix.Mount(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()), path, "none", unix.MS_BIND, "")
	}()
	if err := <-errc; err != nil {
		os.Remove(path)
		return "", fmt.Errorf("netns %s: %w", path, err)
	}
	return path, nil
}
