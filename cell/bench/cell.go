package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/containerd/containerd/v2/client"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"

	"github.com/basinpaas/basin/bbs"
	"github.com/basinpaas/basin/bbs/embeddedetcd"
	"github.com/basinpaas/basin/cell"
	"github.com/basinpaas/basin/cell/executor"
	"github.com/basinpaas/basin/cell/rep"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

// wholeCell is the path an auctioneer drives: Perform on the rep's gRPC API,
// claim through a real BBS on an embedded etcd, droplet fetch (cached by
// digest), executor start, health, RUNNING. A start ends, as for the
// others, at the first HTTP 200.
type wholeCell struct {
	etcd   *embeddedetcd.Etcd
	cli    *clientv3.Client
	keys   bbs.Keys
	bbs    *bbs.Client
	cell   *cell.Cell
	rep    *rep.Rep
	conn   *grpc.ClientConn
	perf   basinv1.CellServiceClient
	next   atomic.Int32
	stops  []func()
	bridge string
}

const benchProcess = "bench-cell"

func newWholeCell(ctx context.Context, c *client.Client, dir, launcher string, drop executor.Droplet) (_ *wholeCell, err error) {
	w := &wholeCell{bridge: "basinbenchc0", keys: bbs.NewKeys("")}
	defer func() {
		if err != nil {
			w.close()
		}
	}()
	if w.etcd, err = embeddedetcd.Start(ctx, embeddedetcd.Config{Dir: filepath.Join(dir, "etcd")}); err != nil {
		return nil, err
	}
	w.stops = append(w.stops, func() { w.etcd.Close() })
	if w.cli, err = w.etcd.Client(); err != nil {
		return nil, err
	}
	w.stops = append(w.stops, func() { w.cli.Close() })
	srv, err := bbs.NewServer(w.cli, bbs.Config{ListenAddress: "127.0.0.1:0"})
	if err != nil {
		return nil, err
	}
	w.stops = append(w.stops, goRun(ctx, srv.Run))
	if w.bbs, err = bbs.Dial(bbs.ClientConfig{Address: srv.Addr()}); err != nil {
		return nil, err
	}
	w.stops = append(w.stops, func() { w.bbs.Close() })
	if err := w.bbs.WaitReady(ctx); err != nil {
		return nil, err
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	w.cell, err = cell.New(cell.Config{
		ID: "bench-cell", Capacity: &basinv1.CellCapacity{MemoryMb: 64 << 10, DiskMb: 1 << 20, Containers: 1000},
		Listener: lis, Containerd: c, Etcd: w.cli, BBSClient: w.bbs, LauncherPath: launcher,
		StateDir: filepath.Join(dir, "cell"), NetworkName: w.bridge, BridgeName: w.bridge, Subnet: "10.216.0.0/24",
		FirewallChain: "BASIN-BENCH-CELL", HostPortLow: 62600, HostPortHigh: 62999, StopGrace: 5 * time.Second,
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		return nil, err
	}
	w.stops = append(w.stops, goRun(ctx, w.cell.Run))
	if w.rep = w.cell.Rep(ctx); w.rep == nil {
		return nil, errors.New("cell did not start")
	}
	select {
	case <-w.rep.Ready():
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if w.conn, err = grpc.NewClient(w.cell.Addr(), grpc.WithTransportCredentials(insecure.NewCredentials())); err != nil {
		return nil, err
	}
	w.stops = append(w.stops, func() { w.conn.Close() })
	w.perf = basinv1.NewCellServiceClient(w.conn)
	_, err = w.bbs.DesireLRP(ctx, &basinv1.DesireLRPRequest{
		Schedule: &basinv1.DesiredLRPSchedule{ProcessGuid: benchProcess, Instances: 1000, Stack: "tiny",
			Resources: &basinv1.ResourceLimits{MemoryMb: 64, DiskMb: 64, Pids: 1024}},
		Run: &basinv1.DesiredLRPRun{StartCommand: "exec httpd -f -p $PORT -h /home/vcap/app", Ports: []uint32{8080},
			Droplet: &basinv1.DropletRef{Digest: drop.Digest, Url: "file://" + drop.Path}},
	})
	return w, err
}

// goRun runs fn until the returned stop is called.
func goRun(ctx context.Context, fn func(context.Context) error) func() {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- fn(ctx) }()
	return func() {
		cancel()
		if err := <-done; err != nil {
			fmt.Fprintln(os.Stderr, "bench-cell:", err)
		}
	}
}

func (w *wholeCell) close() {
	for i := len(w.stops) - 1; i >= 0; i-- {
		w.stops[i]()
	}
	exec.Command("ip", "link", "del", w.bridge).Run()
}

// start places one instance slot by Perform and waits for its first 200.
func (w *wholeCell) start(ctx context.Context, _ string) (func(), error) {
	idx := w.next.Add(1) - 1
	key := &basinv1.ActualLRPKey{ProcessGuid: benchProcess, Index: idx}
	actualKey := w.keys.Actual(benchProcess, idx)
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Watch from now, so the RUNNING write cannot slip by.
	cur, err := w.cli.Get(ctx, actualKey)
	if err != nil {
		return nil, err
	}
	wch := w.cli.Watch(wctx, actualKey, clientv3.WithRev(cur.Header.Revision+1))
	resp, err := w.perf.Perform(ctx, &basinv1.PerformRequest{Lrps: []*basinv1.LRPStart{{Key: key, Stack: "tiny",
		Resources: &basinv1.ResourceLimits{MemoryMb: 64, DiskMb: 64}}}})
	if err != nil {
		return nil, err
	}
	if len(resp.GetRejectedLrps()) > 0 {
		return nil, fmt.Errorf("perform %d: %s", idx, resp.GetRejectedLrps()[0].GetReason())
	}
	cleanup := func() { w.retire(context.WithoutCancel(ctx), key) }
	var a basinv1.ActualLRP
	for a.GetState() != basinv1.ActualLRPState_ACTUAL_LRP_STATE_RUNNING {
		wr, ok := <-wch
		if !ok || wr.Err() != nil {
			cleanup()
			return nil, fmt.Errorf("watch %s: %v", actualKey, wr.Err())
		}
		for _, ev := range wr.Events {
			if err := proto.Unmarshal(ev.Kv.Value, &a); err != nil {
				cleanup()
				return nil, err
			}
			if a.GetState() == basinv1.ActualLRPState_ACTUAL_LRP_STATE_CRASHED {
				cleanup()
				return nil, fmt.Errorf("instance %d crashed: %s", idx, a.GetCrashReason())
			}
		}
	}
	url := fmt.Sprintf("http://%s:%d/index.html", a.GetNetInfo().GetAddress(), a.GetNetInfo().GetPorts()[0].GetHostPort())
	if err := waitHTTP(ctx, url); err != nil {
		cleanup()
		return nil, err
	}
	return cleanup, nil
}

// retire removes the slot and waits until the cell has stopped it, so the
// next measurement does not share the machine with its teardown.
func (w *wholeCell) retire(ctx context.Context, key *basinv1.ActualLRPKey) {
	if _, err := w.bbs.RetireActualLRP(ctx, &basinv1.RetireActualLRPRequest{Key: key}); err != nil {
		fmt.Fprintln(os.Stderr, "bench-cell: retire:", err)
		return
	}
	for ctx.Err() == nil {
		gone := true
		for _, l := range w.rep.State().GetLrps() {
			if l.GetIndex() == key.GetIndex() {
				gone = false
			}
		}
		if gone {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}
