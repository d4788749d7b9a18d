// Command bench measures staging and scale-out through the whole platform,
// as a user sees them: it starts `basin dev up` (two cells, the tiny and
// bookworm stacks, its own BASIN_HOME, free loopback ports and network
// --net-id 11), then times
//
//   - the first `basin push` of examples/static and of examples/binary
//     (upload, staging in a container on a cell, start) until the app
//     answers 200 through the router, and
//   - `basin scale APP -i 10` until 10 instances are RUNNING and routable
//     (every one has its route, per `basin app --json`) and the router
//     answers, checking on the BBS events stream that no task (no staging)
//     was created meanwhile.
//
// It needs root, containerd, runc and the CNI plugins (`basin setup`), and
// builds the bookworm stack the first time on a machine. `make
// bench-staging` runs it from the repository's root.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/basinpaas/basin/bbs"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

func main() {
	netID := flag.Int("net-id", 11, "dev up --net-id: the cells' bridges and subnets")
	instances := flag.Int("instances", 10, "instances to scale out to")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *netID, *instances); err != nil {
		fmt.Fprintf(os.Stderr, "bench-staging: %v\n", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, netID, instances int) error {
	if os.Geteuid() != 0 {
		return errors.New("needs root (dev up runs containerd, runc and CNI)")
	}
	root, err := repoRoot()
	if err != nil {
		return err
	}
	work, err := os.MkdirTemp("", "basin-bench-staging-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	bin := filepath.Join(work, "bin")
	fmt.Println("building basin, basin-launcher and basin-builder...")
	if err := build(ctx, root, bin); err != nil {
		return err
	}
	p, err := startDevUp(ctx, filepath.Join(bin, "basin"), filepath.Join(work, "home"), netID)
	if err != nil {
		return err
	}
	defer p.stopAndClean()

	type row struct {
		what string
		took time.Duration
	}
	var rows []row
	var pushSlowest time.Duration
	for _, app := range []struct{ name, body string }{{"static", "hello from static"}, {"binary", "hello from binary"}} {
		t0 := time.Now()
		if out, err := p.basin(ctx, "push", app.name, "-p", filepath.Join(root, "examples", app.name), "-i", "1", "-m", "64M", "-s", "bookworm", "--no-manifest"); err != nil {
			return fmt.Errorf("push %s: %w\n%s", app.name, err, out)
		}
		pushed := time.Since(t0)
		if err := p.waitBody(ctx, app.name+".apps.localhost", app.body, time.Minute); err != nil {
			return err
		}
		took := time.Since(t0)
		rows = append(rows, row{"push " + app.name + " (CLI exit)", pushed}, row{"push " + app.name + " → 200 via router", took})
		pushSlowest = max(pushSlowest, took)
	}

	// Scale-out, watched on the events stream.
	cli, err := bbs.Dial(bbs.ClientConfig{Address: p.api, Token: p.token})
	if err != nil {
		return err
	}
	defer cli.Close()
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := cli.SubscribeToEvents(sctx, &basinv1.SubscribeToEventsRequest{})
	if err != nil {
		return fmt.Errorf("subscribe to events: %w", err)
	}
	var mu sync.Mutex
	var tasks []string
	var created int
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			resp, err := stream.Recv()
			if err != nil {
				return
			}
			mu.Lock()
			if tc := resp.GetEvent().GetTaskCreated(); tc != nil {
				tasks = append(tasks, tc.GetTask().GetTaskGuid())
			}
			if resp.GetEvent().GetActualLrpCreated() != nil {
				created++
			}
			mu.Unlock()
		}
	}()
	time.Sleep(300 * time.Millisecond) // the subscription is in place
	t0 := time.Now()
	if out, err := p.basin(ctx, "scale", "binary", "-i", fmt.Sprint(instances)); err != nil {
		return fmt.Errorf("scale: %w\n%s", err, out)
	}
	scaleCLI := time.Since(t0)
	var firstRunning time.Duration
	deadline := time.Now().Add(2 * time.Minute)
	for {
		running, routable, err := p.instances(ctx, "binary")
		if err != nil {
			return err
		}
		if running == instances && firstRunning == 0 {
			firstRunning = time.Since(t0)
		}
		if running == instances && routable == instances {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("scale: %d running, %d routable of %d after 2 minutes", running, routable, instances)
		}
		time.Sleep(20 * time.Millisecond)
	}
	scaled := time.Since(t0)
	if err := p.waitBody(ctx, "binary.apps.localhost", "hello from binary", 10*time.Second); err != nil {
		return err
	}
	time.Sleep(200 * time.Millisecond)
	cancel()
	<-done
	rows = append(rows,
		row{fmt.Sprintf("scale -i %d (CLI exit)", instances), scaleCLI},
		row{fmt.Sprintf("scale → %d RUNNING", instances), firstRunning},
		row{fmt.Sprintf("scale → %d RUNNING and routable", instances), scaled})

	fmt.Println()
	fmt.Printf("%-40s %10s\n", "step", "seconds")
	for _, r := range rows {
		fmt.Printf("%-40s %10.2f\n", r.what, r.took.Seconds())
	}
	mu.Lock()
	fmt.Printf("\nevents during the scale: %d instances created, %d tasks created %v\n", created, len(tasks), tasks)
	ok := len(tasks) == 0
	mu.Unlock()
	fmt.Printf("RESULT scale_out_%d_s %.2f\n", instances, scaled.Seconds())
	fmt.Printf("RESULT push_to_routable_s %.2f\n", pushSlowest.Seconds())
	if !ok {
		return errors.New("scaling out created a task: it must reuse the droplet")
	}
	return nil
}

// repoRoot is the directory of the go.mod above the working directory.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("run it inside the basin repository (no go.mod above here)")
		}
		dir = parent
	}
}

// build puts basin with the static basin-launcher and basin-builder beside
// it, as make build does.
func build(ctx context.Context, root, bin string) error {
	for _, b := range []struct {
		pkg    string
		static bool
	}{{"./cmd/basin", false}, {"./cmd/basin-launcher", true}, {"./cmd/basin-builder", true}} {
		cmd := exec.CommandContext(ctx, "go", "build", "-o", bin+"/", b.pkg)
		cmd.Dir = root
		if b.static {
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		}
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("go build %s: %w\n%s", b.pkg, err, out)
		}
	}
	return nil
}

type platform struct {
	bin, home        string
	api, router      string
	token            string
	cmd              *exec.Cmd
	exited           chan error
	netID            int
	stopOnce         sync.Once
	mu               sync.Mutex
	devUpOutputLines []string // what dev up printed until it was up
}

func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// startDevUp runs dev up and waits until it says it is up.
func startDevUp(ctx context.Context, bin, home string, netID int) (*platform, error) {
	addrs := make([]string, 4)
	for i := range addrs {
		a, err := freeAddr()
		if err != nil {
			return nil, err
		}
		addrs[i] = a
	}
	p := &platform{bin: bin, home: home, api: addrs[0], router: addrs[1], netID: netID, exited: make(chan error, 1)}
	p.cmd = exec.Command(bin, "dev", "up", "--cells", "2", "--stacks", "tiny,bookworm", "--net-id", fmt.Sprint(netID),
		"--api", p.api, "--router", p.router, "--etcd", addrs[2], "--debug", addrs[3])
	p.cmd.Env = append(os.Environ(), "BASIN_HOME="+home)
	p.cmd.Stderr = io.Discard
	out, err := p.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	fmt.Println("starting basin dev up (the first run on a machine builds the bookworm stack: minutes)...")
	t0 := time.Now()
	if err := p.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { p.exited <- p.cmd.Wait() }()
	up := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(out)
		said := false
		for sc.Scan() {
			if !said {
				p.mu.Lock()
				p.devUpOutputLines = append(p.devUpOutputLines, sc.Text())
				p.mu.Unlock()
			}
			if !said && strings.Contains(sc.Text(), "basin is up") {
				said = true
				close(up)
			}
		}
	}()
	select {
	case <-up:
	case err := <-p.exited:
		p.exited <- err
		p.stopAndClean()
		p.mu.Lock()
		defer p.mu.Unlock()
		return nil, fmt.Errorf("basin dev up exited: %v\n%s", err, strings.Join(p.devUpOutputLines, "\n"))
	case <-time.After(15 * time.Minute):
		p.stopAndClean()
		return nil, errors.New("basin dev up did not come up within 15 minutes")
	case <-ctx.Done():
		p.stopAndClean()
		return nil, ctx.Err()
	}
	fmt.Printf("basin dev up ready in %s\n", time.Since(t0).Round(100*time.Millisecond))
	b, err := os.ReadFile(filepath.Join(home, "target.json"))
	if err != nil {
		p.stopAndClean()
		return nil, err
	}
	var target struct{ Token string }
	if err := json.Unmarshal(b, &target); err != nil {
		p.stopAndClean()
		return nil, fmt.Errorf("target file: %w", err)
	}
	p.token = target.Token
	return p, nil
}

// stopAndClean stops dev up as Ctrl-C does, then removes what it left with
// basin dev down, and the cells' bridges.
func (p *platform) stopAndClean() {
	p.stopOnce.Do(func() {
		p.cmd.Process.Signal(os.Interrupt)
		select {
		case <-p.exited:
		case <-time.After(30 * time.Second):
			fmt.Fprintln(os.Stderr, "bench-staging: dev up did not stop within 30s of SIGINT; killing it")
			p.cmd.Process.Kill()
			<-p.exited
		}
		cmd := exec.Command(p.bin, "dev", "down")
		cmd.Env = append(os.Environ(), "BASIN_HOME="+p.home)
		if out, err := cmd.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "bench-staging: basin dev down: %v\n%s", err, out)
		}
		for i := range 2 {
			exec.Command("ip", "link", "del", fmt.Sprintf("basin-d%d-%d", p.netID, i)).Run()
		}
	})
}

func (p *platform) basin(ctx context.Context, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, p.bin, args...)
	cmd.Env = append(os.Environ(), "BASIN_HOME="+p.home)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// instances counts the app's current instances that are RUNNING, and
// those of them that are routable.
func (p *platform) instances(ctx context.Context, name string) (running, routable int, err error) {
	out, err := p.basin(ctx, "app", name, "--json")
	if err != nil {
		return 0, 0, fmt.Errorf("basin app %s: %w\n%s", name, err, out)
	}
	var v struct {
		Instances []struct {
			State    string `json:"state"`
			Current  bool   `json:"current"`
			Routable bool   `json:"routable"`
		} `json:"instances"`
	}
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		return 0, 0, fmt.Errorf("basin app %s --json: %w", name, err)
	}
	for _, in := range v.Instances {
		if in.Current && in.State == "ACTUAL_LRP_STATE_RUNNING" {
			running++
			if in.Routable {
				routable++
			}
		}
	}
	return running, routable, nil
}

// waitBody polls the router until host answers 200 with want in the body.
func (p *platform) waitBody(ctx context.Context, host, want string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	client := &http.Client{Timeout: 2 * time.Second}
	for {
		req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+p.router+"/", nil)
		req.Host = host
		resp, err := client.Do(req)
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK && strings.Contains(string(body), want) {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s never answered %q through the router", host, want)
		case <-time.After(20 * time.Millisecond):
		}
	}
}
