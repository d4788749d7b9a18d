package rep

import (
	"context"
	"slices"
	"sync"
	"time"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// coalescer merges calls made while earlier ones are in flight into one
// batched call: group commit on the client side. An idle rep's call goes out
// at once, alone; a burst (a Perform's instances, containers becoming healthy
// together) costs a round trip per batch instead of one per instance. The
// per-call cost of gRPC, not etcd, is what bounds the BBS under such bursts.
//
// No goroutine is started: the caller that finds a free slot sends the batch
// it is in, and when a batch completes with calls waiting, the first of them
// is woken to send the next one.
type coalescer[Req, Res any] struct {
	send        func(ctx context.Context, reqs []Req) ([]Res, []error)
	maxBatch    int
	maxInflight int
	timeout     time.Duration

	mu       sync.Mutex
	pending  []*coalesced[Req, Res]
	inflight int
}

type coalesced[Req, Res any] struct {
	req Req
	res Res
	err error
	// wake carries the batch this call must send, or nil once its result
	// is set.
	wake chan []*coalesced[Req, Res]
}

func newCoalescer[Req, Res any](maxBatch, maxInflight int, timeout time.Duration, send func(context.Context, []Req) ([]Res, []error)) *coalescer[Req, Res] {
	return &coalescer[Req, Res]{send: send, maxBatch: maxBatch, maxInflight: maxInflight, timeout: timeout}
}

// do sends req, alone or with whatever else is waiting. Once queued, a call
// waits for its batch even if ctx ends: a batch is bounded by the timeout,
// and a woken caller must send the batch it leads for the others in it.
func (c *coalescer[Req, Res]) do(ctx context.Context, req Req) (Res, error) {
	me := &coalesced[Req, Res]{req: req, wake: make(chan []*coalesced[Req, Res], 1)}
	c.mu.Lock()
	c.pending = append(c.pending, me)
	if c.inflight < c.maxInflight {
		c.inflight++
		batch := c.takeLocked()
		c.mu.Unlock()
		c.run(ctx, batch)
	} else {
		c.mu.Unlock()
	}
	for batch := <-me.wake; batch != nil; batch = <-me.wake {
		c.run(ctx, batch)
	}
	return me.res, me.err
}

// takeLocked removes the next batch from the queue; c.mu held.
func (c *coalescer[Req, Res]) takeLocked() []*coalesced[Req, Res] {
	n := min(len(c.pending), c.maxBatch)
	batch := c.pending[:n:n]
	c.pending = c.pending[n:]
	if len(c.pending) == 0 {
		c.pending = nil
	}
	return batch
}

// run sends batch, hands out the results, and passes the slot on to the
// next waiting batch or frees it.
func (c *coalescer[Req, Res]) run(ctx context.Context, batch []*coalesced[Req, Res]) {
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.timeout)
	reqs := make([]Req, len(batch))
	for i, b := range batch {
		reqs[i] = b.req
	}
	res, errs := c.send(sctx, reqs)
	cancel()
	for i, b := range batch {
		b.res, b.err = res[i], errs[i]
		b.wake <- nil
	}
	c.mu.Lock()
	if len(c.pending) == 0 {
		c.inflight--
		c.mu.Unlock()
		return
	}
	next := c.takeLocked()
	c.mu.Unlock()
	next[0].wake <- next
}

// Batches the rep sends: a Perform carries at most a few hundred instances,
// and the BBS takes up to 1,000 per call.
const (
	maxCoalesced      = 256
	coalescedInflight = 2
	coalescedTimeout  = 30 * time.Second
)

// sendTransitions applies claims and starts in one ApplyActualLRPTransitions
// call; each item's code becomes the error its single call would have had,
// so retry and isGone treat it the same.
func sendTransitions(b BBS) func(context.Context, []*basinv1.ActualLRPTransition) ([]*basinv1.ActualLRP, []error) {
	return func(ctx context.Context, ts []*basinv1.ActualLRPTransition) ([]*basinv1.ActualLRP, []error) {
		out, errs := make([]*basinv1.ActualLRP, len(ts)), make([]error, len(ts))
		resp, err := b.ApplyActualLRPTransitions(ctx, &basinv1.ApplyActualLRPTransitionsRequest{Transitions: ts})
		if err == nil && len(resp.GetResults()) != len(ts) {
			err = status.Errorf(codes.Internal, "BBS answered %d transitions with %d results", len(ts), len(resp.GetResults()))
		}
		for i := range ts {
			switch {
			case err != nil:
				errs[i] = err
			case resp.GetResults()[i].GetCode() != 0:
				r := resp.GetResults()[i]
				errs[i] = status.Error(codes.Code(r.GetCode()), r.GetMessage())
			default:
				out[i] = resp.GetResults()[i].GetActualLrp()
			}
		}
		return out, errs
	}
}

// desiredRead asks for the desired LRP of guid as of at least minRev.
type desiredRead struct {
	guid   string
	minRev int64
}

// fetchDesired reads the desired LRPs of a batch of instances in one call, as
// of the latest revision any of them asks for: a later one serves the others
// too, and the BBS answers it from its view as cheaply.
func fetchDesired(b BBS) func(context.Context, []desiredRead) ([]*basinv1.DesiredLRP, []error) {
	return func(ctx context.Context, reads []desiredRead) ([]*basinv1.DesiredLRP, []error) {
		out, errs := make([]*basinv1.DesiredLRP, len(reads)), make([]error, len(reads))
		guids := make([]string, len(reads))
		var minRev int64
		for i, rd := range reads {
			guids[i] = rd.guid
			minRev = max(minRev, rd.minRev)
		}
		resp, err := b.ListDesiredLRPs(ctx, &basinv1.ListDesiredLRPsRequest{
			ProcessGuids: slices.Compact(slices.Sorted(slices.Values(guids))), MinRevision: minRev})
		found := map[string]*basinv1.DesiredLRP{}
		for _, d := range resp.GetDesiredLrps() {
			found[d.GetSchedule().GetProcessGuid()] = d
		}
		for i, g := range guids {
			switch {
			case err != nil:
				errs[i] = err
			case found[g] == nil:
				errs[i] = status.Errorf(codes.NotFound, "desired LRP %s: not found", g)
			default:
				out[i] = found[g]
			}
		}
		return out, errs
	}
}
