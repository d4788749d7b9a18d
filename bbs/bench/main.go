// Command bench measures the BBS against the raw etcd figure it must beat,
// in one run on this machine: make bench-bbs.
//
// It starts an embedded etcd in this process and the real bbs binary as a
// child process on it, so the BBS's memory is its own.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/basinpaas/basin/bbs"
	"github.com/basinpaas/basin/bbs/embeddedetcd"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	clientv3 "go.etcd.io/etcd/client/v3"
)

type options struct {
	clients  int
	duration time.Duration
	actuals  int
	profile  string
	workers  int
	rounds   int
	conns    int
	batch    int
}

func main() {
	var o options
	flag.IntVar(&o.clients, "clients", 64, "concurrent clients")
	flag.DurationVar(&o.duration, "duration", 5*time.Second, "length of each throughput measurement")
	flag.IntVar(&o.actuals, "actuals", 100000, "actual LRPs stored for the memory figure")
	flag.IntVar(&o.rounds, "rounds", 3, "alternating raw/BBS rounds; medians are reported, so load from elsewhere hits both alike")
	flag.IntVar(&o.conns, "conns", 1, "gRPC connections the clients share, as the raw figure's goroutines share one etcd client")
	flag.IntVar(&o.workers, "txn-concurrency", 2, "the BBS's etcd transactions in flight")
	flag.IntVar(&o.batch, "batch", 16, "instances per ApplyActualLRPTransitions call in the batched run, as a cell claims and starts one Perform's instances")
	flag.StringVar(&o.profile, "profile", "", "write a CPU profile of the BBS during the transition run to this file")
	flag.Parse()
	if err := run(context.Background(), o); err != nil {
		fmt.Fprintln(os.Stderr, "bench-bbs:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, o options) error {
	dir, err := os.MkdirTemp("", "bench-bbs-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	fmt.Println("building bbs ...")
	bin := filepath.Join(dir, "bbs")
	build := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/bbs")
	build.Stdout, build.Stderr = os.Stdout, os.Stderr
	if err := build.Run(); err != nil {
		return fmt.Errorf("build bbs: %w", err)
	}

	etcd, err := embeddedetcd.Start(ctx, embeddedetcd.Config{Dir: filepath.Join(dir, "etcd")})
	if err != nil {
		return err
	}
	defer etcd.Close()
	cli, err := etcd.Client()
	if err != nil {
		return err
	}
	defer cli.Close()

	const token = "bench"
	bbsProc, err := startBBS(ctx, bin, etcd.Endpoint(), "/bench/", token, o)
	if err != nil {
		return err
	}
	defer bbsProc.stop()
	debugAddr := bbsProc.debugAddr
	keys := bbs.NewKeys("/bench/")
	shared, closeConns, err := dialAll(ctx, bbsProc.addr, token, max(1, min(o.conns, o.clients)))
	if err != nil {
		return err
	}
	defer closeConns()
	// Client i uses connection i mod conns.
	conns := make([]*bbs.Client, o.clients)
	for i := range conns {
		conns[i] = shared[i%len(shared)]
	}

	fmt.Printf("BBS: DesireLRP (1 instance), %d clients, %s ...\n", o.clients, o.duration)
	creations, err := desireRate(ctx, conns, o)
	if err != nil {
		return err
	}

	if o.profile != "" {
		f, err := os.Create(o.profile + ".bench")
		if err != nil {
			return err
		}
		defer f.Close()
		go func() {
			// The first BBS round starts after the first raw round and the
			// pause that lets the BBS's watch see the new instances.
			time.Sleep(o.duration + 2500*time.Millisecond)
			pprof.StartCPUProfile(f)
			time.Sleep(o.duration - time.Second)
			pprof.StopCPUProfile()
		}()
		go func() {
			time.Sleep(o.duration)
			if err := fetchProfile(debugAddr, o.profile, o.duration); err != nil {
				fmt.Fprintln(os.Stderr, "profile:", err)
			}
		}()
	}
	var raws, unaries, bbss, ratios, unaryRatios []float64
	for r := range o.rounds {
		fmt.Printf("round %d/%d: raw etcd get, then Txn(If ModRevision == rev).Then(Put), %d goroutines, %s ...\n", r+1, o.rounds, o.clients, o.duration)
		raw, err := rawGuardedPuts(ctx, cli, o)
		if err != nil {
			return err
		}
		fmt.Printf("round %d/%d: BBS ClaimActualLRP then StartActualLRP, one instance per call, %d clients (one cell each), %s ...\n", r+1, o.rounds, o.clients, o.duration)
		un, err := transitionRate(ctx, cli, keys, conns, o, r, 1)
		if err != nil {
			return err
		}
		fmt.Printf("round %d/%d: BBS ApplyActualLRPTransitions, claim then start %d instances per call, %d clients, %s ...\n", r+1, o.rounds, o.batch, o.clients, o.duration)
		tr, err := transitionRate(ctx, cli, keys, conns, o, r, o.batch)
		if err != nil {
			return err
		}
		fmt.Printf("round %d/%d: raw %.0f/s, BBS single calls %.0f/s (%.2fx), BBS batched %.0f/s (%.2fx)\n", r+1, o.rounds, raw, un, un/raw, tr, tr/raw)
		raws, unaries, bbss = append(raws, raw), append(unaries, un), append(bbss, tr)
		ratios, unaryRatios = append(ratios, tr/raw), append(unaryRatios, un/raw)
	}
	raw, transitions, ratio := median(raws), median(bbss), median(ratios)
	unary, unaryRatio := median(unaries), median(unaryRatios)
	batch, splits, conflicts := batchStats(debugAddr)

	bbsProc.stop()
	closeConns()

	// Memory is measured on a fresh BBS over its own prefix holding exactly
	// the asked-for number of actual LRPs, not what the throughput runs left.
	fmt.Printf("BBS: a fresh BBS with %d actual LRPs ...\n", o.actuals)
	memProc, err := startBBS(ctx, bin, etcd.Endpoint(), "/rss/", token, o)
	if err != nil {
		return err
	}
	defer memProc.stop()
	memConns, closeMem, err := dialAll(ctx, memProc.addr, token, 8)
	if err != nil {
		return err
	}
	defer closeMem()
	if _, err := fill(ctx, memConns, o.actuals); err != nil {
		return err
	}
	total, err := countActuals(ctx, cli, bbs.NewKeys("/rss/"))
	if err != nil {
		return err
	}
	// Let the BBS's watch catch up and its heap settle before reading RSS.
	time.Sleep(3 * time.Second)
	rss, err := rssMB(memProc.cmd.Process.Pid)
	if err != nil {
		return err
	}

	fmt.Println()
	fmt.Printf("%-62s %12s\n", "measurement", "value")
	fmt.Printf("%-62s %12.0f /s\n", fmt.Sprintf("raw etcd get + guarded put (%d goroutines, median)", o.clients), raw)
	fmt.Printf("%-62s %12.0f /s\n", fmt.Sprintf("BBS claim -> start, one instance per call (%d clients, median)", o.clients), unary)
	fmt.Printf("%-62s %12.2f x\n", "BBS single calls / raw", unaryRatio)
	fmt.Printf("%-62s %12.0f /s\n", fmt.Sprintf("BBS claim -> start, %d per batched call (%d clients, median)", o.batch, o.clients), transitions)
	fmt.Printf("%-62s %12.2f x   (median of rounds; target >= 1.5)\n", "BBS batched / raw", ratio)
	fmt.Printf("%-62s %12.1f   (%.0f merged txns split, %.0f guard conflicts)\n", "BBS writes merged per etcd transaction (mean)", batch, splits, conflicts)
	fmt.Printf("%-62s %12.0f /s\n", fmt.Sprintf("BBS desired-LRP creations (%d clients)", o.clients), creations)
	fmt.Printf("%-62s %12.0f MB\n", fmt.Sprintf("BBS process RSS with %d actual LRPs stored", total), rss)
	fmt.Println()
	fmt.Printf("RESULT raw_guarded_put_per_s %.0f\n", raw)
	fmt.Printf("RESULT bbs_transitions_per_s %.0f\n", transitions)
	fmt.Printf("RESULT bbs_rss_mb_100k_actuals %.0f\n", rss)
	return nil
}

// rawGuardedPuts is the read-then-write baseline: each op reads a key, then
// writes it guarded by the revision it read.
func rawGuardedPuts(ctx context.Context, cli *clientv3.Client, o options) (float64, error) {
	var ops atomic.Int64
	var firstErr error
	var once sync.Once
	deadline := time.Now().Add(o.duration)
	var wg sync.WaitGroup
	start := time.Now()
	for g := range o.clients {
		wg.Go(func() {
			key := fmt.Sprintf("/raw/%d", g)
			val := strings.Repeat("x", 120)
			for time.Now().Before(deadline) {
				resp, err := cli.Get(ctx, key)
				if err != nil {
					once.Do(func() { firstErr = err })
					return
				}
				var rev int64
				if len(resp.Kvs) > 0 {
					rev = resp.Kvs[0].ModRevision
				}
				tr, err := cli.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", rev)).Then(clientv3.OpPut(key, val)).Commit()
				if err != nil {
					once.Do(func() { firstErr = err })
					return
				}
				if tr.Succeeded {
					ops.Add(1)
				}
			}
		})
	}
	wg.Wait()
	return float64(ops.Load()) / time.Since(start).Seconds(), firstErr
}

func schedule(guid string, instances int32) *basinv1.DesiredLRPSchedule {
	return &basinv1.DesiredLRPSchedule{
		ProcessGuid: guid, Domain: "bench", Instances: instances, Stack: "tiny",
		Resources: &basinv1.ResourceLimits{MemoryMb: 256, DiskMb: 1024, Pids: 1024},
		Routes:    []*basinv1.Route{{Host: guid + ".apps.example.com"}},
	}
}

func runPart() *basinv1.DesiredLRPRun {
	return &basinv1.DesiredLRPRun{StartCommand: "bundle exec rackup -p $PORT", Ports: []uint32{8080},
		Env: []*basinv1.EnvVar{{Name: "RACK_ENV", Value: "production"}}}
}

func desireRate(ctx context.Context, conns []*bbs.Client, o options) (float64, error) {
	var ops atomic.Int64
	var firstErr error
	var once sync.Once
	deadline := time.Now().Add(o.duration)
	var wg sync.WaitGroup
	start := time.Now()
	for c, cl := range conns {
		wg.Go(func() {
			for n := 0; time.Now().Before(deadline); n++ {
				_, err := cl.DesireLRP(ctx, &basinv1.DesireLRPRequest{Schedule: schedule(fmt.Sprintf("create-%d-%d", c, n), 1), Run: runPart()})
				if err != nil {
					once.Do(func() { firstErr = err })
					return
				}
				ops.Add(1)
			}
		})
	}
	wg.Wait()
	return float64(ops.Load()) / time.Since(start).Seconds(), firstErr
}

// transitionRate gives each client (a cell) its own LRP and has it claim then
// start instance after instance; each claim and each start is a transition.
func transitionRate(ctx context.Context, cli *clientv3.Client, keys bbs.Keys, conns []*bbs.Client, o options, round, batch int) (float64, error) {
	// Enough instances that no client runs out before the deadline, even at
	// well over 10,000 transitions/s; a client that does run out stops, and
	// the rate is taken over the time the clients ran.
	const perLRP = 1000
	lrpsPerClient := 1
	if batch > 1 {
		lrpsPerClient = 3
	}
	name := func(c, k int) string { return fmt.Sprintf("lrp-%d-%d-%d-%d", round, batch, c, k) }
	fences := make([]*basinv1.Fence, len(conns))
	for c, cl := range conns {
		for k := range lrpsPerClient {
			if _, err := cl.DesireLRP(ctx, &basinv1.DesireLRPRequest{Schedule: schedule(name(c, k), perLRP), Run: runPart()}); err != nil {
				return 0, err
			}
		}
		cellKey := keys.Cell(fmt.Sprintf("cell-%d", c))
		resp, err := cli.Get(ctx, cellKey)
		if err != nil {
			return 0, err
		}
		rev := int64(0)
		if len(resp.Kvs) > 0 {
			rev = resp.Kvs[0].CreateRevision
		} else {
			pr, err := cli.Put(ctx, cellKey, "")
			if err != nil {
				return 0, err
			}
			rev = pr.Header.Revision
		}
		fences[c] = &basinv1.Fence{Key: cellKey, CreateRevision: rev}
	}
	// Let the BBS's watch see the new instances, as it would in production
	// where cells claim what the auctioneer placed moments earlier.
	time.Sleep(2 * time.Second)

	var ops atomic.Int64
	var firstErr error
	var once sync.Once
	fail := func(err error) { once.Do(func() { firstErr = err }) }
	deadline := time.Now().Add(o.duration)
	var wg sync.WaitGroup
	start := time.Now()
	for c, cl := range conns {
		wg.Go(func() {
			cell := fmt.Sprintf("cell-%d", c)
			var keys []*basinv1.ActualLRPKey
			for k := range lrpsPerClient {
				for i := range int32(perLRP) {
					keys = append(keys, &basinv1.ActualLRPKey{ProcessGuid: name(c, k), Index: i})
				}
			}
			ik := func(key *basinv1.ActualLRPKey) *basinv1.ActualLRPInstanceKey {
				return &basinv1.ActualLRPInstanceKey{InstanceGuid: fmt.Sprintf("%s-%s-%d", cell, key.GetProcessGuid(), key.GetIndex()), CellId: cell}
			}
			net := func(key *basinv1.ActualLRPKey) *basinv1.ActualLRPNetInfo {
				return &basinv1.ActualLRPNetInfo{Address: "10.0.0.1", InstanceAddress: "10.255.0.2",
					Ports: []*basinv1.PortMapping{{ContainerPort: 8080, HostPort: uint32(40000 + key.GetIndex())}}}
			}
			for chunk := range slices.Chunk(keys, batch) {
				if !time.Now().Before(deadline) {
					return
				}
				if batch == 1 {
					key := chunk[0]
					if _, err := cl.ClaimActualLRP(ctx, &basinv1.ClaimActualLRPRequest{Key: key, InstanceKey: ik(key), Fence: fences[c]}); err != nil {
						fail(fmt.Errorf("claim: %w", err))
						return
					}
					ops.Add(1)
					if _, err := cl.StartActualLRP(ctx, &basinv1.StartActualLRPRequest{Key: key, InstanceKey: ik(key), NetInfo: net(key), Fence: fences[c]}); err != nil {
						fail(fmt.Errorf("start: %w", err))
						return
					}
					ops.Add(1)
					continue
				}
				// A cell's Perform batch: claim them all in one call, then
				// start them all in one call.
				claims := &basinv1.ApplyActualLRPTransitionsRequest{}
				starts := &basinv1.ApplyActualLRPTransitionsRequest{}
				for _, key := range chunk {
					claims.Transitions = append(claims.Transitions, &basinv1.ActualLRPTransition{Transition: &basinv1.ActualLRPTransition_Claim{
						Claim: &basinv1.ClaimActualLRPRequest{Key: key, InstanceKey: ik(key), Fence: fences[c]}}})
					starts.Transitions = append(starts.Transitions, &basinv1.ActualLRPTransition{Transition: &basinv1.ActualLRPTransition_Start{
						Start: &basinv1.StartActualLRPRequest{Key: key, InstanceKey: ik(key), NetInfo: net(key), Fence: fences[c]}}})
				}
				for _, step := range []struct {
					what string
					req  *basinv1.ApplyActualLRPTransitionsRequest
				}{{"claim", claims}, {"start", starts}} {
					resp, err := cl.ApplyActualLRPTransitions(ctx, step.req)
					if err != nil {
						fail(fmt.Errorf("%s batch: %w", step.what, err))
						return
					}
					for _, r := range resp.GetResults() {
						if r.GetCode() != 0 {
							fail(fmt.Errorf("%s: code %d: %s", step.what, r.GetCode(), r.GetMessage()))
							return
						}
					}
					ops.Add(int64(len(chunk)))
				}
			}
		})
	}
	wg.Wait()
	return float64(ops.Load()) / time.Since(start).Seconds(), firstErr
}

// fill desires LRPs of 100 instances until n more actuals exist.
func fill(ctx context.Context, conns []*bbs.Client, n int) (int, error) {
	const per = 100
	lrps := max(n, 0) / per
	var next atomic.Int64
	var firstErr error
	var once sync.Once
	var wg sync.WaitGroup
	for _, cl := range conns[:min(8, len(conns))] {
		wg.Go(func() {
			for {
				i := next.Add(1) - 1
				if i >= int64(lrps) {
					return
				}
				if _, err := cl.DesireLRP(ctx, &basinv1.DesireLRPRequest{Schedule: schedule(fmt.Sprintf("fill-%d", i), per), Run: runPart()}); err != nil {
					once.Do(func() { firstErr = err })
					return
				}
			}
		})
	}
	wg.Wait()
	return lrps * per, firstErr
}

func countActuals(ctx context.Context, cli *clientv3.Client, keys bbs.Keys) (int64, error) {
	resp, err := cli.Get(ctx, keys.ActualPrefix(), clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		return 0, err
	}
	return resp.Count, nil
}

func rssMB(pid int) (float64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 64)
			if err != nil {
				return 0, err
			}
			return kb / 1024, nil
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
}

func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// fetchProfile saves a CPU profile of the BBS taken while the transitions run.
func fetchProfile(debugAddr, path string, d time.Duration) error {
	time.Sleep(2500 * time.Millisecond) // past the pause before the run starts
	secs := max(int(d.Seconds())-1, 1)
	resp, err := http.Get(fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", debugAddr, secs))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.Copy(f, resp.Body)
	return err
}

// batchStats reads the group-commit figures from the BBS's metrics.
func batchStats(debugAddr string) (mean, splits, conflicts float64) {
	resp, err := http.Get("http://" + debugAddr + "/metrics")
	if err != nil {
		return 0, 0, 0
	}
	defer resp.Body.Close()
	var sum, count, txnSum, txnCount, reqSum, reqCount float64
	defer func() {
		if txnCount > 0 && reqCount > 0 {
			fmt.Printf("mean latency in the BBS: claim/start request %.2f ms, etcd txn %.2f ms (%.0f txns)\n",
				1000*reqSum/reqCount, 1000*txnSum/txnCount, txnCount)
		}
	}()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 2 {
			continue
		}
		v, _ := strconv.ParseFloat(f[1], 64)
		if strings.Contains(f[0], "ClaimActualLRP") || strings.Contains(f[0], "StartActualLRP") {
			switch {
			case strings.HasPrefix(f[0], "basin_bbs_request_seconds_sum"):
				reqSum += v
			case strings.HasPrefix(f[0], "basin_bbs_request_seconds_count"):
				reqCount += v
			}
		}
		switch f[0] {
		case "basin_bbs_txn_batch_size_sum":
			sum = v
		case "basin_bbs_txn_batch_size_count":
			count = v
		case "basin_bbs_txn_seconds_sum":
			txnSum = v
		case "basin_bbs_txn_seconds_count":
			txnCount = v
		case "basin_bbs_txn_batch_splits_total":
			splits = v
		case "basin_bbs_write_conflicts_total":
			conflicts = v
		}
	}
	if count == 0 {
		return 0, splits, conflicts
	}
	return sum / count, splits, conflicts
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

type bbsProcess struct {
	cmd             *exec.Cmd
	addr, debugAddr string
	stopped         bool
}

// startBBS runs the bbs binary on etcd under prefix.
func startBBS(ctx context.Context, bin, endpoint, prefix, token string, o options) (*bbsProcess, error) {
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	debugAddr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, bin, "-listen", addr, "-debug-listen", debugAddr, "-etcd-endpoints", endpoint,
		"-prefix", prefix, "-log-level", "error", "-txn-concurrency", strconv.Itoa(o.workers),
		"-max-txn-ops", strconv.Itoa(embeddedetcd.MaxTxnOps))
	cmd.Env = append(os.Environ(), "BASIN_TOKEN="+token)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start bbs: %w", err)
	}
	return &bbsProcess{cmd: cmd, addr: addr, debugAddr: debugAddr}, nil
}

func (p *bbsProcess) stop() {
	if p.stopped {
		return
	}
	p.stopped = true
	p.cmd.Process.Signal(os.Interrupt)
	p.cmd.Wait()
}

// dialAll opens n client connections and waits until the BBS answers.
func dialAll(ctx context.Context, addr, token string, n int) ([]*bbs.Client, func(), error) {
	conns := make([]*bbs.Client, 0, n)
	closeAll := func() {
		for _, c := range conns {
			c.Close()
		}
		conns = conns[:0]
	}
	for range n {
		c, err := bbs.Dial(bbs.ClientConfig{Address: addr, Token: token})
		if err != nil {
			closeAll()
			return nil, nil, err
		}
		conns = append(conns, c)
	}
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := conns[0].WaitReady(rctx); err != nil {
		closeAll()
		return nil, nil, err
	}
	return conns, closeAll, nil
}
