package rep

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"

	"github.com/basinpaas/basin/bbs"
	"github.com/basinpaas/basin/bbs/blobstore"
	"github.com/basinpaas/basin/bbs/embeddedetcd"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

// The rep's tests run a real embedded etcd and a real BBS server (each test
// under its own prefix); only the executor, the boundary to containerd, is
// a hand-written fake.
var (
	testEtcd  *embeddedetcd.Etcd
	prefixSeq atomic.Int64
)

func TestMain(m *testing.M) { os.Exit(runTests(m)) }

func runTests(m *testing.M) int {
	dir, err := os.MkdirTemp("", "rep-etcd-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	testEtcd, err = embeddedetcd.Start(ctx, embeddedetcd.Config{Dir: dir})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer testEtcd.Close()
	return m.Run()
}

type env struct {
	t       *testing.T
	ctx     context.Context
	etcd    *clientv3.Client
	keys    bbs.Keys
	bbs     *bbs.Client
	exec    *fakeExec
	rep     *Rep
	droplet *basinv1.DropletRef
	stop    func()
	// repBBS, when set, is what startRep gives the rep instead of bbs.
	repBBS BBS
}

type envOpt func(*Config)

func newEnv(t *testing.T, opts ...envOpt) *env {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	cli, err := testEtcd.Client()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	prefix := fmt.Sprintf("/rep-test/%d/", prefixSeq.Add(1))
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	blobs, err := blobstore.NewLocal(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	srv, err := bbs.NewServer(cli, bbs.Config{Listener: lis, Store: bbs.StoreConfig{Prefix: prefix}, Blobs: blobs})
	if err != nil {
		t.Fatal(err)
	}
	sctx, stopSrv := context.WithCancel(context.Background())
	srvDone := make(chan error, 1)
	go func() { srvDone <- srv.Run(sctx) }()
	t.Cleanup(func() { stopSrv(); <-srvDone })
	client, err := bbs.Dial(bbs.ClientConfig{Address: srv.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	if err := client.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}

	dir := t.TempDir()
	body := []byte("a droplet for the rep's tests")
	sum := sha256.Sum256(body)
	p := filepath.Join(dir, "droplet.tgz")
	if err := os.WriteFile(p, body, 0o644); err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, ctx: ctx, etcd: cli, keys: bbs.NewKeys(prefix), bbs: client, exec: newFakeExec(),
		droplet: &basinv1.DropletRef{Digest: "sha256:" + hex.EncodeToString(sum[:]), Url: "file://" + p}}
	cfg := Config{
		CellID: "cell-a", Zone: "z1", Capacity: &basinv1.CellCapacity{MemoryMb: 1024, DiskMb: 4096, Containers: 10},
		RepAddress: "127.0.0.1:1", Keys: e.keys, LeaseTTL: 2 * time.Second, StopGrace: time.Second,
		EvacuationTimeout: 20 * time.Second, DropletDir: filepath.Join(dir, "cache"),
	}
	for _, o := range opts {
		o(&cfg)
	}
	e.startRep(cfg)
	return e
}

// startRep runs a rep (a cell process) until stop or the test ends.
func (e *env) startRep(cfg Config) {
	e.t.Helper()
	var b BBS = e.bbs
	if e.repBBS != nil {
		b = e.repBBS
	}
	r, err := New(cfg, e.etcd, b, e.exec)
	if err != nil {
		e.t.Fatal(err)
	}
	e.exec.mu.Lock()
	e.exec.onEvent = r.OnEvent
	e.exec.mu.Unlock()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	stopped := false
	e.stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil {
			e.t.Errorf("rep Run: %v", err)
		}
	}
	e.t.Cleanup(e.stop)
	select {
	case <-r.Ready():
	case err := <-done:
		e.t.Fatalf("rep Run ended before ready: %v", err)
	case <-e.ctx.Done():
		e.t.Fatal("rep not ready")
	}
	e.rep = r
}

// desire creates an LRP with a route on the test droplet.
func (e *env) desire(guid string, instances int32, mem int64) {
	e.t.Helper()
	_, err := e.bbs.DesireLRP(e.ctx, &basinv1.DesireLRPRequest{
		Schedule: &basinv1.DesiredLRPSchedule{ProcessGuid: guid, Instances: instances, Stack: "tiny",
			Resources: &basinv1.ResourceLimits{MemoryMb: mem, DiskMb: 64, Pids: 64},
			Routes:    []*basinv1.Route{{Host: guid + ".example.com"}}},
		Run: &basinv1.DesiredLRPRun{StartCommand: "./server", Droplet: e.droplet, Ports: []uint32{8080}},
	})
	if err != nil {
		e.t.Fatalf("desire %s: %v", guid, err)
	}
}

func lrpStart(guid string, index int32, mem int64) *basinv1.LRPStart {
	return &basinv1.LRPStart{Key: &basinv1.ActualLRPKey{ProcessGuid: guid, Index: index}, Stack: "tiny",
		Resources: &basinv1.ResourceLimits{MemoryMb: mem, DiskMb: 64}}
}

func (e *env) perform(starts ...*basinv1.LRPStart) *basinv1.PerformResponse {
	e.t.Helper()
	resp, err := e.rep.Perform(e.ctx, &basinv1.PerformRequest{Lrps: starts})
	if err != nil {
		e.t.Fatal(err)
	}
	return resp
}

func (e *env) actual(guid string, index int32) *basinv1.ActualLRP {
	e.t.Helper()
	resp, err := e.bbs.GetActualLRP(e.ctx, &basinv1.GetActualLRPRequest{ProcessGuid: guid, Index: index})
	if err != nil {
		e.t.Fatalf("get actual %s/%d: %v", guid, index, err)
	}
	return resp.GetActualLrp()
}

// waitFor polls cond until it holds; the deadline only bounds a broken test.
func (e *env) waitFor(what string, cond func() bool) {
	e.t.Helper()
	for !cond() {
		select {
		case <-e.ctx.Done():
			e.t.Fatalf("gave up waiting for %s", what)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func (e *env) waitState(guid string, index int32, s basinv1.ActualLRPState) *basinv1.ActualLRP {
	e.t.Helper()
	var a *basinv1.ActualLRP
	e.waitFor(fmt.Sprintf("%s/%d %v", guid, index, s), func() bool {
		a = e.actual(guid, index)
		return a.GetState() == s
	})
	return a
}

func (e *env) route(host, guid string, index int32) (*basinv1.RouteEndpoint, int64) {
	e.t.Helper()
	resp, err := e.etcd.Get(e.ctx, e.keys.Route(host, "", guid, index))
	if err != nil {
		e.t.Fatal(err)
	}
	if len(resp.Kvs) == 0 {
		return nil, 0
	}
	ep := &basinv1.RouteEndpoint{}
	if err := proto.Unmarshal(resp.Kvs[0].Value, ep); err != nil {
		e.t.Fatal(err)
	}
	return ep, resp.Kvs[0].ModRevision
}

// registerOtherCell writes another cell's presence and returns its fence.
func (e *env) registerOtherCell(id string) *basinv1.Fence {
	e.t.Helper()
	lease, err := e.etcd.Grant(e.ctx, 30)
	if err != nil {
		e.t.Fatal(err)
	}
	val, _ := proto.Marshal(&basinv1.CellPresence{CellId: id})
	if _, err := e.etcd.Put(e.ctx, e.keys.Cell(id), string(val), clientv3.WithLease(lease.ID)); err != nil {
		e.t.Fatal(err)
	}
	resp, err := e.etcd.Get(e.ctx, e.keys.Cell(id))
	if err != nil {
		e.t.Fatal(err)
	}
	return &basinv1.Fence{Key: e.keys.Cell(id), CreateRevision: resp.Kvs[0].CreateRevision}
}
