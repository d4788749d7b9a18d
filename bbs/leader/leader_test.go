package leader

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/basinpaas/basin/bbs"
	"github.com/basinpaas/basin/bbs/embeddedetcd"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

// TestStandbyTakesOverAndOldLeaderStops: two replicas, one leads; when the
// leader's etcd connection dies (as when its process is killed) its lead
// context ends and the standby leads with a newer fence.
func TestStandbyTakesOverAndOldLeaderStops(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	e, err := embeddedetcd.Start(ctx, embeddedetcd.Config{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	keys := bbs.NewKeys("/leader-test/")

	type replica struct {
		leading chan *basinv1.Fence
		stopped chan struct{}
		done    chan error
		close   func()
	}
	var active atomic.Int32
	start := func(id string) *replica {
		cli, err := e.Client()
		if err != nil {
			t.Fatal(err)
		}
		r := &replica{leading: make(chan *basinv1.Fence, 4), stopped: make(chan struct{}, 4), done: make(chan error, 1)}
		rctx, rcancel := context.WithCancel(ctx)
		r.close = func() { cli.Close(); rcancel() }
		go func() {
			r.done <- Run(rctx, cli, Config{Component: "auctioneer", Keys: keys, ID: id, TTL: time.Second, RetryDelay: 100 * time.Millisecond},
				func(lctx context.Context, f *basinv1.Fence) error {
					if n := active.Add(1); n != 1 {
						t.Errorf("%d leaders at once", n)
					}
					r.leading <- f
					<-lctx.Done()
					active.Add(-1)
					r.stopped <- struct{}{}
					return nil
				})
		}()
		return r
	}
	a := start("a")
	var fa *basinv1.Fence
	select {
	case fa = <-a.leading:
	case <-time.After(10 * time.Second):
		t.Fatal("a not elected")
	}
	b := start("b")
	a.close()
	select {
	case <-a.stopped:
	case <-time.After(10 * time.Second):
		t.Fatal("a's lead context did not end when its connection died")
	}
	var fb *basinv1.Fence
	select {
	case fb = <-b.leading:
	case <-time.After(10 * time.Second):
		t.Fatal("b did not take over")
	}
	if fb.Key == fa.Key || fb.CreateRevision <= fa.CreateRevision {
		t.Errorf("b's fence %v is not newer than a's %v", fb, fa)
	}
	<-a.done
	b.close()
	if err := <-b.done; err != nil {
		t.Errorf("run: %v", err)
	}
}
