package rep

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestCoalescerBatchesWhileBusy(t *testing.T) {
	tests := []struct {
		name             string
		callers          int
		maxBatch, flight int
	}{
		{"one at a time", 1, 8, 1},
		{"burst, one in flight", 200, 16, 1},
		{"burst, two in flight", 200, 256, 2},
		{"batch of one", 50, 1, 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var sends, inflight, maxSeen atomic.Int64
			release := make(chan struct{})
			c := newCoalescer(tc.maxBatch, tc.flight, 5*time.Second, func(ctx context.Context, reqs []int) ([]string, []error) {
				sends.Add(1)
				n := inflight.Add(1)
				for old := maxSeen.Load(); n > old && !maxSeen.CompareAndSwap(old, n); old = maxSeen.Load() {
				}
				if len(reqs) > tc.maxBatch {
					t.Errorf("batch of %d, max %d", len(reqs), tc.maxBatch)
				}
				<-release
				inflight.Add(-1)
				res, errs := make([]string, len(reqs)), make([]error, len(reqs))
				for i, r := range reqs {
					if r%7 == 0 {
						errs[i] = fmt.Errorf("refused %d", r)
						continue
					}
					res[i] = fmt.Sprint("ok ", r)
				}
				return res, errs
			})
			var wg sync.WaitGroup
			for i := range tc.callers {
				wg.Go(func() {
					res, err := c.do(context.Background(), i)
					if i%7 == 0 {
						if err == nil || err.Error() != fmt.Sprint("refused ", i) {
							t.Errorf("call %d: err %v", i, err)
						}
						return
					}
					if err != nil || res != fmt.Sprint("ok ", i) {
						t.Errorf("call %d: %q, %v", i, res, err)
					}
				})
			}
			// Let the callers queue behind the first batch, then let all go.
			time.Sleep(50 * time.Millisecond)
			close(release)
			wg.Wait()
			if maxSeen.Load() > int64(tc.flight) {
				t.Errorf("%d batches in flight, max %d", maxSeen.Load(), tc.flight)
			}
			minSends := int64((tc.callers + tc.maxBatch - 1) / tc.maxBatch)
			if s := sends.Load(); s < minSends || (tc.callers > 1 && tc.maxBatch > 1 && s >= int64(tc.callers)) {
				t.Errorf("%d callers made %d sends", tc.callers, s)
			}
		})
	}
}

// A caller whose context ends while queued still leads the batch it was
// given, so the others in it are answered.
func TestCoalescerCancelledCallerStillSends(t *testing.T) {
	gate := make(chan struct{})
	c := newCoalescer(4, 1, 5*time.Second, func(ctx context.Context, reqs []int) ([]int, []error) {
		if reqs[0] == 0 {
			<-gate
		}
		if ctx.Err() != nil {
			return make([]int, len(reqs)), []error{ctx.Err(), ctx.Err(), ctx.Err(), ctx.Err()}[:len(reqs)]
		}
		return reqs, make([]error, len(reqs))
	})
	first := make(chan error, 1)
	go func() { _, err := c.do(context.Background(), 0); first <- err }()
	time.Sleep(20 * time.Millisecond)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	results := make([]error, 3)
	for i := 1; i <= 3; i++ {
		wg.Go(func() {
			cctx := context.Background()
			if i == 1 {
				cctx = ctx
			}
			_, results[i-1] = c.do(cctx, i)
		})
		time.Sleep(5 * time.Millisecond)
	}
	cancel()
	close(gate)
	wg.Wait()
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	if err := errors.Join(results...); err != nil {
		t.Errorf("queued calls failed: %v", err)
	}
}
