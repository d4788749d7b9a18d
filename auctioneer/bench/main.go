// Command bench measures placement end to end: make bench-auction.
//
// In one process: an embedded etcd, the real BBS, the real auctioneer and
// 1,000 real reps on a null executor (presence, State, Perform, claim,
// desired-LRP read, droplet fetch, RUNNING through the BBS, minus
// containers). Each mode starts all of it afresh, desires the LRPs and
// times from the first desire until every instance is RUNNING in etcd:
// "live" with the auctioneer already leading, placing while the LRPs are
// desired (as in production); "queued" with the auctioneer started on the
// full queue once everything is desired (placements_per_s, the figure
// earlier runs reported). Raw etcd batched puts are measured in the same
// run for comparison.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"runtime/pprof"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/basinpaas/basin/auctioneer"
	"github.com/basinpaas/basin/auctioneer/simcell"
	"github.com/basinpaas/basin/bbs"
	"github.com/basinpaas/basin/bbs/embeddedetcd"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sync/errgroup"
	"google.golang.org/protobuf/proto"
)

type options struct {
	cells, lrps, instances int
	zones                  int
	maxBatch               int
	desirers               int
	batchWindow, busyWin   time.Duration
	timeout                time.Duration
	txnWorkers             int
	profile, memProfile    string
	kind                   string
	leaseTTL               time.Duration
	auctioneerLog          slog.Level
	overlap                bool
}

func main() {
	var o options
	flag.IntVar(&o.cells, "cells", 1000, "cells")
	flag.StringVar(&o.kind, "cells-kind", "rep", "rep: the real rep on a null executor; sim: the simulated cells of the integration tests")
	flag.IntVar(&o.lrps, "lrps", 1000, "desired LRPs")
	flag.IntVar(&o.instances, "instances", 100, "instances per LRP")
	flag.IntVar(&o.zones, "zones", 4, "zones the cells are spread over (equal sizes keep per-cell spread within 1)")
	flag.IntVar(&o.maxBatch, "max-batch", 20000, "auctioneer batch bound")
	flag.DurationVar(&o.batchWindow, "batch-window", 0, "auctioneer batch window (0: its default)")
	flag.DurationVar(&o.busyWin, "busy-window", 0, "auctioneer busy window (0: its default)")
	flag.IntVar(&o.desirers, "desirers", 32, "clients desiring the LRPs at once")
	flag.DurationVar(&o.timeout, "timeout", 5*time.Minute, "give up after this long")
	flag.StringVar(&o.profile, "profile", "", "write a CPU profile of the placement phase to this file")
	flag.StringVar(&o.memProfile, "memprofile", "", "write an allocation profile (whole run) to this file when all are RUNNING")
	// Everything shares this process and two cores: with a 3 s lease a
	// starved keepalive costs the leader its term (and its batch in flight).
	flag.DurationVar(&o.leaseTTL, "lease-ttl", 10*time.Second, "auctioneer election lease")
	flag.TextVar(&o.auctioneerLog, "auctioneer-log", slog.LevelWarn, "auctioneer log level (debug shows each auction's phases)")
	modes := flag.String("modes", "live,queued", "queued: desire everything, then start the auctioneer on the full queue; live: the auctioneer leads while the LRPs are desired, as in production; both run in turn")
	flag.IntVar(&o.txnWorkers, "txn-concurrency", 0, "the BBS's merged etcd transactions in flight (0: its default)")
	flag.Parse()
	var results []string
	ms := strings.Split(*modes, ",")
	for _, m := range ms {
		if m != "queued" && m != "live" {
			fmt.Fprintf(os.Stderr, "bench-auction: -modes %q: want queued, live or both\n", *modes)
			os.Exit(2)
		}
	}
	if len(ms) > 1 && (o.profile != "" || o.memProfile != "") {
		fmt.Fprintln(os.Stderr, "bench-auction: profiles need one mode (-modes queued or -modes live)")
		os.Exit(2)
	}
	for _, m := range ms {
		fmt.Printf("== %s\n", m)
		o.overlap = m == "live"
		rs, err := run(context.Background(), o)
		if err != nil {
			fmt.Fprintf(os.Stderr, "bench-auction (%s): %v\n", m, err)
			os.Exit(1)
		}
		results = append(results, rs...)
	}
	fmt.Println()
	for _, r := range results {
		fmt.Println("RESULT " + r)
	}
}

// run measures one mode and returns its RESULT lines (name and value).
func run(ctx context.Context, o options) ([]string, error) {
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	dir, err := os.MkdirTemp("", "bench-auction-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	e, err := embeddedetcd.Start(ctx, embeddedetcd.Config{Dir: dir})
	if err != nil {
		return nil, err
	}
	defer e.Close()
	cli, err := e.Client()
	if err != nil {
		return nil, err
	}
	defer cli.Close()
	total := o.lrps * o.instances

	raw, err := rawBatchedPuts(ctx, cli, total)
	if err != nil {
		return nil, err
	}
	fmt.Printf("raw etcd: %d keys in transactions of 128 puts, 8 in flight: %.0f keys/s\n", total, raw)

	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	keys := bbs.NewKeys("/bench/")
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	srv, err := bbs.NewServer(cli, bbs.Config{Listener: lis, Store: bbs.StoreConfig{Prefix: keys.Prefix, Workers: o.txnWorkers, MaxTxnOps: embeddedetcd.MaxTxnOps}, Logger: logger})
	if err != nil {
		return nil, err
	}
	sctx, scancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer scancel()
	wg.Go(func() { srv.Run(sctx) })
	client, err := bbs.Dial(bbs.ClientConfig{Address: srv.Addr()})
	if err != nil {
		return nil, err
	}
	defer client.Close()
	if err := client.WaitReady(ctx); err != nil {
		return nil, err
	}

	var reg *simcell.Registry
	var cellIDs []string
	for i := range o.cells {
		cellIDs = append(cellIDs, fmt.Sprintf("cell-%04d", i))
	}
	containers := 4 * total / o.cells
	switch o.kind {
	case "rep":
		// The real rep on a null executor: presence, State and Perform with
		// reservations, claim, desired LRP read, droplet fetch, RUNNING.
		waitReps, err := startReps(sctx, o.cells, o.zones, containers, cli, client, keys, dir, logger)
		defer waitReps()
		defer scancel()
		if err != nil {
			return nil, fmt.Errorf("start reps: %w", err)
		}
	case "sim":
		reg = simcell.NewRegistry()
		cells := make([]*simcell.Cell, o.cells)
		g, gctx := errgroup.WithContext(ctx)
		g.SetLimit(16)
		for i := range o.cells {
			g.Go(func() error {
				c, err := simcell.Start(gctx, cli, client, simcell.Config{
					ID: cellIDs[i], Zone: fmt.Sprintf("z%d", i%o.zones), Stacks: []string{"tiny"},
					MemoryMB: 256 * 1024, DiskMB: 1024 * 1024, Containers: int32(containers),
					LeaseTTL: 10 * time.Second, Keys: keys, Registry: reg, Logger: logger,
				})
				cells[i] = c
				return err
			})
		}
		err := g.Wait()
		defer func() {
			for _, c := range cells {
				if c != nil {
					c.Kill()
				}
			}
		}()
		if err != nil {
			return nil, fmt.Errorf("start cells: %w", err)
		}
	default:
		return nil, fmt.Errorf("-cells-kind %q: want rep or sim", o.kind)
	}
	fmt.Printf("%d %s cells registered\n", o.cells, o.kind)
	droplet, err := benchDroplet(dir)
	if err != nil {
		return nil, err
	}

	if o.profile != "" {
		f, err := os.Create(o.profile)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return nil, err
		}
		defer pprof.StopCPUProfile()
	}
	// The counter watches from now, so it sees every instance's RUNNING.
	running, claimed := countRunning(sctx, cli, keys, &wg)
	a := auctioneer.New(auctioneer.Config{Prefix: keys.Prefix, ID: "bench", LeaseTTL: o.leaseTTL, MaxBatch: o.maxBatch, BatchWindow: o.batchWindow, BusyWindow: o.busyWin, CellStateTimeout: 5 * time.Second, PerformTimeout: 30 * time.Second, ClaimTimeout: time.Minute}, cli, client,
		slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: o.auctioneerLog})))
	startAuctioneer := func() { wg.Go(func() { a.Run(sctx) }) }
	if o.overlap {
		// As in production: the auctioneer leads before the work arrives
		// and places instances while the rest are still being desired.
		startAuctioneer()
		if err := waitLeader(ctx, a); err != nil {
			return nil, err
		}
	}
	start := time.Now()
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(o.desirers)
	for l := range o.lrps {
		g.Go(func() error {
			_, err := client.DesireLRP(gctx, &basinv1.DesireLRPRequest{
				Schedule: &basinv1.DesiredLRPSchedule{
					ProcessGuid: fmt.Sprintf("app-%04d", l), Domain: "bench", Instances: int32(o.instances), Stack: "tiny",
					Resources: &basinv1.ResourceLimits{MemoryMb: 128, DiskMb: 256, Pids: 64},
				},
				Run: &basinv1.DesiredLRPRun{StartCommand: "./server", Ports: []uint32{8080}, Droplet: droplet},
			})
			return err
		})
	}
	if err := g.Wait(); err != nil {
		return nil, fmt.Errorf("desire: %w", err)
	}
	desireTook := time.Since(start)
	fmt.Printf("desired %d instances (the BBS creating them UNCLAIMED) in %s\n", total, desireTook.Round(time.Millisecond))
	placeStart := start
	if !o.overlap {
		// The auctioneer starts on a full queue, so its figure is
		// placement alone: batching, State from every cell, Place,
		// Perform, and the cells' claim and start through the BBS.
		placeStart = time.Now()
		startAuctioneer()
	}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	var acceptedAt time.Duration
	for running.Load() < int64(total) {
		if acceptedAt == 0 && placed(a) >= float64(total) {
			acceptedAt = time.Since(placeStart)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("only %d of %d RUNNING: %w", running.Load(), total, ctx.Err())
		case <-tick.C:
			fmt.Printf("  %5.1fs: %6.0f placed, %6d claimed, %6d RUNNING\n", time.Since(placeStart).Seconds(), placed(a), claimed.Load(), running.Load())
		case <-time.After(10 * time.Millisecond):
		}
	}
	elapsed := time.Since(placeStart)
	sinceDesire := time.Since(start)
	if o.memProfile != "" {
		if err := writeHeapProfile(o.memProfile); err != nil {
			return nil, err
		}
	}
	// Confirm from etcd, not just from the events.
	resp, err := client.ListActualLRPs(ctx, &basinv1.ListActualLRPsRequest{Domain: "bench"})
	if err != nil {
		return nil, err
	}
	perLRP := map[string]map[string]int{}
	n := 0
	for _, al := range resp.GetActualLrps() {
		if al.GetState() != basinv1.ActualLRPState_ACTUAL_LRP_STATE_RUNNING {
			continue
		}
		n++
		g := al.GetKey().GetProcessGuid()
		if perLRP[g] == nil {
			perLRP[g] = map[string]int{}
		}
		perLRP[g][al.GetInstanceKey().GetCellId()]++
	}
	if n != total {
		return nil, fmt.Errorf("etcd holds %d RUNNING instances, want %d", n, total)
	}
	maxDiff := 0
	for _, perCell := range perLRP {
		lo, hi := -1, 0
		for _, c := range cellIDs {
			n := perCell[c]
			if lo < 0 || n < lo {
				lo = n
			}
			hi = max(hi, n)
		}
		maxDiff = max(maxDiff, hi-lo)
	}
	if reg != nil {
		if err := reg.Doubles(); err != nil {
			return nil, fmt.Errorf("an instance ran on two cells: %w", err)
		}
	}
	printStoreStats(srv.Registry())
	if acceptedAt == 0 {
		acceptedAt = elapsed
	}
	placements := float64(total) / sinceDesire.Seconds()
	if o.overlap {
		fmt.Printf("%d instances of %d LRPs on %d cells: desire to all RUNNING in %s (%.0f/s), the auctioneer placing while the LRPs were desired\n",
			total, o.lrps, o.cells, sinceDesire.Round(time.Millisecond), placements)
		fmt.Printf("every instance placed by the auctioneer %s after the first desire (%.0f/s); the rest is the cells' claim and start through the BBS\n",
			acceptedAt.Round(time.Millisecond), float64(total)/acceptedAt.Seconds())
		fmt.Printf("raw etcd batched puts %.0f keys/s; max spread diff %d\n\n", raw, maxDiff)
		return []string{
			fmt.Sprintf("live_placements_per_s %.0f", placements),
			fmt.Sprintf("live_max_spread_diff %d", maxDiff),
		}, nil
	}
	fmt.Printf("%d instances of %d LRPs on %d cells: desire to all RUNNING in %s (%.0f/s): desire %s, then queue to all RUNNING %s\n",
		total, o.lrps, o.cells, sinceDesire.Round(time.Millisecond), placements, desireTook.Round(time.Millisecond), elapsed.Round(time.Millisecond))
	fmt.Printf("every instance placed by the auctioneer %s after it started on the full queue (%.0f/s); the rest is the cells' claim and start through the BBS\n",
		acceptedAt.Round(time.Millisecond), float64(total)/acceptedAt.Seconds())
	fmt.Printf("raw etcd batched puts %.0f keys/s; max spread diff %d\n\n", raw, maxDiff)
	// placements_per_s is the figure: from the first desire to all
	// RUNNING in etcd.
	return []string{
		fmt.Sprintf("queue_to_running_per_s %.0f", float64(total)/elapsed.Seconds()),
		fmt.Sprintf("auction_placements_per_s %.0f", float64(total)/acceptedAt.Seconds()),
		fmt.Sprintf("placements_per_s %.0f", placements),
		fmt.Sprintf("raw_batched_keys_per_s %.0f", raw),
		fmt.Sprintf("max_spread_diff %d", maxDiff),
	}, nil
}

// rawBatchedPuts is etcd's own rate for what placement costs at least: one
// key written per instance, in transactions of etcd's 128-op limit.
func rawBatchedPuts(ctx context.Context, cli *clientv3.Client, n int) (float64, error) {
	const batch = 128
	start := time.Now()
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	for from := 0; from < n; from += batch {
		g.Go(func() error {
			ops := make([]clientv3.Op, 0, batch)
			for i := from; i < min(from+batch, n); i++ {
				ops = append(ops, clientv3.OpPut(fmt.Sprintf("/raw/%08d", i), "running-on-cell-0000"))
			}
			_, err := cli.Txn(gctx).Then(ops...).Commit()
			return err
		})
	}
	if err := g.Wait(); err != nil {
		return 0, fmt.Errorf("raw puts: %w", err)
	}
	rate := float64(n) / time.Since(start).Seconds()
	_, err := cli.Delete(ctx, "/raw/", clientv3.WithPrefix())
	return rate, err
}

// countRunning counts instances whose record turns RUNNING, from an etcd
// watch on the actual records (the BBS's event stream drops a subscriber
// that falls 4096 events behind, which a burst of 100,000 does).
func countRunning(ctx context.Context, cli *clientv3.Client, keys bbs.Keys, wg *sync.WaitGroup) (n, claimed *atomic.Int64) {
	n, claimed = new(atomic.Int64), new(atomic.Int64)
	resp, err := cli.Get(ctx, keys.ActualPrefix(), clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench-auction: count:", err)
		return n, claimed
	}
	wch := cli.Watch(ctx, keys.ActualPrefix(), clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1))
	wg.Go(func() {
		running, claims := map[string]bool{}, map[string]bool{}
		for wr := range wch {
			for _, ev := range wr.Events {
				a := &basinv1.ActualLRP{}
				if ev.Type == clientv3.EventTypeDelete || proto.Unmarshal(ev.Kv.Value, a) != nil {
					continue
				}
				k := string(ev.Kv.Key)
				if a.GetState() == basinv1.ActualLRPState_ACTUAL_LRP_STATE_CLAIMED && !claims[k] {
					claims[k] = true
					claimed.Add(1)
				}
				if a.GetState() == basinv1.ActualLRPState_ACTUAL_LRP_STATE_RUNNING && !running[k] {
					running[k] = true
					n.Add(1)
				}
			}
		}
	})
	return n, claimed
}

func writeHeapProfile(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return pprof.Lookup("allocs").WriteTo(f, 0)
}

// waitLeader waits until a leads, so the first desire finds it running.
func waitLeader(ctx context.Context, a *auctioneer.Auctioneer) error {
	for metric(a, "basin_auctioneer_leader") != 1 {
		select {
		case <-ctx.Done():
			return fmt.Errorf("auctioneer never became leader: %w", ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
	return nil
}

// placed reads the auctioneer's placements counter.
func placed(a *auctioneer.Auctioneer) float64 { return metric(a, "basin_auctioneer_placements_total") }

// metric reads one of the auctioneer's unlabelled counters or gauges.
func metric(a *auctioneer.Auctioneer, name string) float64 {
	mfs, err := a.Registry().Gather()
	if err != nil {
		return 0
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) > 0 {
			m := mf.GetMetric()[0]
			return m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	return 0
}

// printStoreStats shows how the BBS merged the cells' writes.
func printStoreStats(reg prometheus.Gatherer) {
	mfs, err := reg.Gather()
	if err != nil {
		return
	}
	var batches, merged, splits, conflicts, txns, txnSecs float64
	reads := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			switch mf.GetName() {
			case "basin_bbs_txn_batch_size":
				batches, merged = float64(m.GetHistogram().GetSampleCount()), m.GetHistogram().GetSampleSum()
			case "basin_bbs_txn_batch_splits_total":
				splits = m.GetCounter().GetValue()
			case "basin_bbs_write_conflicts_total":
				conflicts = m.GetCounter().GetValue()
			case "basin_bbs_txn_seconds":
				txns, txnSecs = float64(m.GetHistogram().GetSampleCount()), m.GetHistogram().GetSampleSum()
			case "basin_bbs_desired_reads_at_revision_total":
				for _, l := range m.GetLabel() {
					reads[l.GetValue()] = m.GetCounter().GetValue()
				}
			}
		}
	}
	fmt.Printf("BBS: %.0f merged transactions of %.1f writes on average, %.0f split, %.0f guard conflicts; %.0f etcd txns, %.1f ms mean\n",
		batches, merged/max(batches, 1), splits, conflicts, txns, 1000*txnSecs/max(txns, 1))
	fmt.Printf("BBS: cells' desired-LRP reads at the claim's revision: %.0f from the view, %.0f from etcd\n", reads["view"], reads["etcd"])
	// The embedded etcd's own timings, from the default registry.
	if mfs, err := prometheus.DefaultGatherer.Gather(); err == nil {
		for _, mf := range mfs {
			switch mf.GetName() {
			case "etcd_disk_wal_fsync_duration_seconds", "etcd_disk_backend_commit_duration_seconds":
				for _, m := range mf.GetMetric() {
					h := m.GetHistogram()
					fmt.Printf("etcd: %s: %d, %.2f ms mean\n", mf.GetName(), h.GetSampleCount(), 1000*h.GetSampleSum()/max(float64(h.GetSampleCount()), 1))
				}
			case "etcd_debugging_mvcc_slow_watcher_total", "etcd_debugging_mvcc_watcher_total", "etcd_debugging_mvcc_pending_events_total":
				for _, m := range mf.GetMetric() {
					fmt.Printf("etcd: %s: %.0f\n", mf.GetName(), m.GetGauge().GetValue()+m.GetCounter().GetValue())
				}
			}
		}
	}
}
