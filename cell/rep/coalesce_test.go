package rep

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
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

// desiredLister answers ListDesiredLRPs with an LRP per guid asked for,
// noting the requests; the rest of BBS is not called.
type desiredLister struct {
	BBS
	mu   sync.Mutex
	reqs []*basinv1.ListDesiredLRPsRequest
}

func (b *desiredLister) ListDesiredLRPs(_ context.Context, in *basinv1.ListDesiredLRPsRequest, _ ...grpc.CallOption) (*basinv1.ListDesiredLRPsResponse, error) {
	b.mu.Lock()
	b.reqs = append(b.reqs, in)
	b.mu.Unlock()
	resp := &basinv1.ListDesiredLRPsResponse{}
	for _, g := range in.GetProcessGuids() {
		resp.DesiredLrps = append(resp.DesiredLrps, &basinv1.DesiredLRP{Schedule: &basinv1.DesiredLRPSchedule{ProcessGuid: g}})
	}
	return resp, nil
}

func TestFetchDesiredReadsAtTheLatestRevisionOfTheBatch(t *testing.T) {
	tests := []struct {
		name      string
		reads     []desiredRead
		wantGuids []string
		wantRev   int64
	}{
		{"one", []desiredRead{{"a", 7}}, []string{"a"}, 7},
		{"max of several", []desiredRead{{"b", 5}, {"a", 9}, {"b", 7}}, []string{"a", "b"}, 9},
		{"none asks for a revision", []desiredRead{{"a", 0}, {"b", 0}}, []string{"a", "b"}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := &desiredLister{}
			out, errs := fetchDesired(b)(context.Background(), tt.reads)
			if len(b.reqs) != 1 {
				t.Fatalf("%d requests, want 1", len(b.reqs))
			}
			if got := b.reqs[0]; !slices.Equal(got.GetProcessGuids(), tt.wantGuids) || got.GetMinRevision() != tt.wantRev {
				t.Errorf("request %v, want guids %v at min_revision %d", got, tt.wantGuids, tt.wantRev)
			}
			for i, rd := range tt.reads {
				if errs[i] != nil || out[i].GetSchedule().GetProcessGuid() != rd.guid {
					t.Errorf("read %d: %v, %v; want %s", i, out[i], errs[i], rd.guid)
				}
			}
		})
	}
}
