package bbs

import (
	"context"
	"fmt"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/basinpaas/basin/bbs/embeddedetcd"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// The store tests run against one real embedded etcd; each test works under
// its own key prefix so tests cannot see each other's state.
var (
	testEtcd   *embeddedetcd.Etcd
	testClient *clientv3.Client
	prefixSeq  atomic.Int64
)

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	dir, err := os.MkdirTemp("", "bbs-etcd-")
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
	testClient, err = testEtcd.Client()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer testClient.Close()
	return m.Run()
}

func testPrefix() string {
	return fmt.Sprintf("/test-%d/", prefixSeq.Add(1))
}

// startStore runs a store under a fresh prefix until the test ends.
func startStore(t *testing.T, cfg StoreConfig) *Store {
	t.Helper()
	if cfg.Prefix == "" {
		cfg.Prefix = testPrefix()
	}
	s := NewStore(testClient, cfg)
	runStore(t, s)
	return s
}

func runStore(t *testing.T, s *Store) context.CancelFunc {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); s.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	rctx, rcancel := context.WithTimeout(ctx, 10*time.Second)
	defer rcancel()
	if err := s.WaitReady(rctx); err != nil {
		t.Fatalf("store not ready: %v", err)
	}
	return func() { cancel(); <-done }
}

// registerCell writes a presence key for cellID and returns its fence.
func registerCell(t *testing.T, s *Store, cellID string) *basinv1.Fence {
	t.Helper()
	key := s.Keys().Cell(cellID)
	resp, err := testClient.Put(context.Background(), key, "")
	if err != nil {
		t.Fatalf("register cell %s: %v", cellID, err)
	}
	return &basinv1.Fence{Key: key, CreateRevision: resp.Header.Revision}
}

func testSchedule(guid string, instances int32) *basinv1.DesiredLRPSchedule {
	return &basinv1.DesiredLRPSchedule{
		ProcessGuid: guid,
		Domain:      "apps",
		Instances:   instances,
		Stack:       "tiny",
		Resources:   &basinv1.ResourceLimits{MemoryMb: 128, DiskMb: 256, Pids: 64},
		Routes:      []*basinv1.Route{{Host: guid + ".apps.example.com"}},
	}
}

func testRun() *basinv1.DesiredLRPRun {
	return &basinv1.DesiredLRPRun{StartCommand: "./server", Ports: []uint32{8080}}
}

func countKeys(t *testing.T, prefix string) int {
	t.Helper()
	resp, err := testClient.Get(context.Background(), prefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		t.Fatalf("count %s: %v", prefix, err)
	}
	return int(resp.Count)
}
