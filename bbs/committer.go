package bbs

import (
	"context"
	"fmt"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// maxTxnOps is etcd's default per-transaction limit (--max-txn-ops) on each
// of a transaction's compares, success ops and failure ops.
const maxTxnOps = 128

// txnItem is one guarded write: if every compare holds, apply ops; else read
// elses so the caller can see why.
type txnItem struct {
	cmps   []clientv3.Cmp
	ops    []clientv3.Op
	elses  []clientv3.Op
	writes []string // keys ops put or delete: two items touching one key never share a transaction
	// bulk marks a cell's batched transition: interactive writes (a
	// desire, a scale, a leader's repair) go before queued bulk ones, so a
	// user never waits behind a fleet of cells claiming and starting.
	bulk bool

	// done receives the item once its result is set. A batch of items
	// shares one channel, rather than one each, and tells them apart by
	// seq, which the committer leaves alone.
	done   chan *txnItem
	seq    int
	result txnResult
}

func (it *txnItem) finish(r txnResult) {
	it.result = r
	it.done <- it
}

type txnResult struct {
	succeeded bool
	rev       int64
	elses     *clientv3.TxnResponse // set when the item ran alone and failed
	err       error
}

// committer is group commit for guarded writes. Concurrent items are merged
// into one etcd transaction (all compares, then all ops), which costs etcd one
// raft entry and one fsync for the lot. If the merged transaction fails, some
// compare did not hold: each item then runs alone with its own else branch, so
// one conflict never makes an unrelated write fail.
type committer struct {
	kv      clientv3.KV
	queue   chan *txnItem
	bulk    chan *txnItem
	workers int
	// maxOps bounds each of a merged transaction's compares and ops: the
	// cluster's --max-txn-ops. Under a deep queue, larger transactions are
	// what raise throughput: etcd's cost is mostly per transaction.
	maxOps  int
	metrics *metrics
}

func newCommitter(kv clientv3.KV, workers, maxOps int, m *metrics) *committer {
	if workers <= 0 {
		workers = 2
	}
	if maxOps <= 0 {
		maxOps = maxTxnOps
	}
	return &committer{kv: kv, queue: make(chan *txnItem, 4096), bulk: make(chan *txnItem, 4096), workers: workers, maxOps: maxOps, metrics: m}
}

func (c *committer) run(ctx context.Context) error {
	var wg sync.WaitGroup
	for range c.workers {
		wg.Go(func() { c.work(ctx) })
	}
	wg.Wait()
	return nil
}

// do submits it and waits for its outcome. When ctx ends first the write may
// still happen, as with any request whose reply is lost.
func (c *committer) do(ctx context.Context, it *txnItem) txnResult {
	if err := c.submit(ctx, it); err != nil {
		return txnResult{err: err}
	}
	select {
	case <-it.done:
		return it.result
	case <-ctx.Done():
		return txnResult{err: ctx.Err()}
	}
}

// submit queues it without waiting for its outcome, which arrives on
// it.done: a batch queues all its items before waiting for any. it.done must
// have room for every item that shares it; nil gets a channel of its own.
func (c *committer) submit(ctx context.Context, it *txnItem) error {
	if len(it.cmps) > c.maxOps || len(it.ops) > c.maxOps || len(it.elses) > c.maxOps {
		return fmt.Errorf("transaction of %d compares, %d ops exceeds etcd's limit of %d", len(it.cmps), len(it.ops), c.maxOps)
	}
	if it.done == nil {
		it.done = make(chan *txnItem, 1)
	}
	q := c.queue
	if it.bulk {
		q = c.bulk
	}
	select {
	case q <- it:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (c *committer) work(ctx context.Context) {
	var carry []*txnItem
	for {
		if len(carry) == 0 {
			select {
			case it := <-c.queue:
				carry = append(carry, it)
			default:
				select {
				case it := <-c.queue:
					carry = append(carry, it)
				case it := <-c.bulk:
					carry = append(carry, it)
				case <-ctx.Done():
					return
				}
			}
		}
		batch, rest := c.gather(carry)
		carry = rest
		c.commit(ctx, batch)
	}
}

// gather builds a batch from carried items, then whatever is queued, keeping
// within etcd's limits and never putting two writes to one key together.
// Items that do not fit are carried to the next batch.
func (c *committer) gather(carry []*txnItem) (batch, rest []*txnItem) {
	written := make(map[string]struct{})
	fences := fenceSet{}
	var ncmp, nops int
	add := func(it *txnItem) bool {
		newCmps := 0
		for _, cmp := range it.cmps {
			if !fences.has(cmp) {
				newCmps++
			}
		}
		if len(batch) > 0 {
			if ncmp+newCmps > c.maxOps || nops+len(it.ops) > c.maxOps {
				return false
			}
			for _, k := range it.writes {
				if _, dup := written[k]; dup {
					return false
				}
			}
		}
		for _, k := range it.writes {
			written[k] = struct{}{}
		}
		for _, cmp := range it.cmps {
			fences.add(cmp)
		}
		ncmp += newCmps
		nops += len(it.ops)
		batch = append(batch, it)
		return true
	}
	for _, it := range carry {
		if !add(it) {
			rest = append(rest, it)
		}
	}
	// Drain what is waiting, interactive writes first, bounded so carried
	// items cannot pile up.
	for _, q := range []chan *txnItem{c.queue, c.bulk} {
		for drained := false; !drained && len(rest) < c.maxOps; {
			select {
			case it := <-q:
				if !add(it) {
					rest = append(rest, it)
				}
			default:
				drained = true
			}
		}
	}
	return batch, rest
}

func (c *committer) commit(ctx context.Context, batch []*txnItem) {
	c.metrics.batchSize.Observe(float64(len(batch)))
	if len(batch) == 1 {
		batch[0].finish(c.single(ctx, batch[0]))
		return
	}
	ncmp, nops := 0, 0
	for _, it := range batch {
		ncmp += len(it.cmps)
		nops += len(it.ops)
	}
	cmps := make([]clientv3.Cmp, 0, ncmp)
	ops := make([]clientv3.Op, 0, nops)
	fences := fenceSet{}
	for _, it := range batch {
		for _, cmp := range it.cmps {
			if fences.has(cmp) {
				continue
			}
			fences.add(cmp)
			cmps = append(cmps, cmp)
		}
		ops = append(ops, it.ops...)
	}
	// No else branch: failures are rare, and reading every compared key in
	// one would make every transaction's request (sent, logged and applied)
	// a third larger. A failure reads them afterwards instead.
	start := time.Now()
	resp, err := c.kv.Txn(ctx).If(cmps...).Then(ops...).Commit()
	c.metrics.txnSeconds.Observe(time.Since(start).Seconds())
	if err != nil {
		for _, it := range batch {
			it.finish(txnResult{err: fmt.Errorf("etcd txn: %w", err)})
		}
		return
	}
	if resp.Succeeded {
		for _, it := range batch {
			it.finish(txnResult{succeeded: true, rev: resp.Header.Revision})
		}
		return
	}
	// Some compare failed. Items whose compares fail against the keys read
	// now run alone, for their own else values; the others are merged
	// again (and compared again in etcd: a key written since the read only
	// costs its item another round). Without the read every item runs
	// alone.
	c.metrics.batchSplits.Inc()
	current, readErr := c.readCompared(ctx, cmps)
	var alone, again []*txnItem
	for _, it := range batch {
		if readErr == nil && holds(it.cmps, current) {
			again = append(again, it)
		} else {
			alone = append(alone, it)
		}
	}
	var wg sync.WaitGroup
	for _, it := range alone {
		wg.Go(func() { it.finish(c.single(ctx, it)) })
	}
	if len(again) > 0 {
		c.commit(ctx, again)
	}
	wg.Wait()
}

// readCompared reads the keys cmps compare, keys only, in one transaction.
func (c *committer) readCompared(ctx context.Context, cmps []clientv3.Cmp) (map[string]*mvccpb.KeyValue, error) {
	seen := make(map[string]struct{}, len(cmps))
	gets := make([]clientv3.Op, 0, len(cmps))
	for _, cmp := range cmps {
		if _, dup := seen[string(cmp.Key)]; !dup {
			seen[string(cmp.Key)] = struct{}{}
			gets = append(gets, clientv3.OpGet(string(cmp.Key), clientv3.WithKeysOnly()))
		}
	}
	resp, err := c.kv.Txn(ctx).Then(gets...).Commit()
	if err != nil {
		return nil, fmt.Errorf("read compared keys: %w", err)
	}
	current := make(map[string]*mvccpb.KeyValue, len(gets))
	for _, r := range resp.Responses {
		for _, kv := range r.GetResponseRange().GetKvs() {
			current[string(kv.Key)] = kv
		}
	}
	return current, nil
}

// holds evaluates revision compares against the keys' current state (a
// missing key has revision 0, as etcd compares it). Any other compare is
// taken as failing, so its item runs alone.
func holds(cmps []clientv3.Cmp, current map[string]*mvccpb.KeyValue) bool {
	for _, cmp := range cmps {
		if cmp.Result != etcdserverpb.Compare_EQUAL || len(cmp.RangeEnd) > 0 {
			return false
		}
		var mod, create int64
		if kv := current[string(cmp.Key)]; kv != nil {
			mod, create = kv.ModRevision, kv.CreateRevision
		}
		switch u := cmp.TargetUnion.(type) {
		case *etcdserverpb.Compare_ModRevision:
			if mod != u.ModRevision {
				return false
			}
		case *etcdserverpb.Compare_CreateRevision:
			if create != u.CreateRevision {
				return false
			}
		default:
			return false
		}
	}
	return true
}

func (c *committer) single(ctx context.Context, it *txnItem) txnResult {
	start := time.Now()
	resp, err := c.kv.Txn(ctx).If(it.cmps...).Then(it.ops...).Else(it.elses...).Commit()
	c.metrics.txnSeconds.Observe(time.Since(start).Seconds())
	if err != nil {
		return txnResult{err: fmt.Errorf("etcd txn: %w", err)}
	}
	if resp.Succeeded {
		return txnResult{succeeded: true, rev: resp.Header.Revision}
	}
	return txnResult{elses: resp}
}

// fenceOf recognises a fence compare (a key's create revision equals rev):
// the writes of one cell or leader all carry the same one, and a merged
// transaction needs it once.
func fenceOf(cmp clientv3.Cmp) (rev int64, ok bool) {
	r, ok := cmp.TargetUnion.(*etcdserverpb.Compare_CreateRevision)
	if !ok || cmp.Target != etcdserverpb.Compare_CREATE || cmp.Result != etcdserverpb.Compare_EQUAL || len(cmp.RangeEnd) > 0 {
		return 0, false
	}
	return r.CreateRevision, true
}

// fenceSet is the fence compares a transaction holds, by key: each item of a
// cell's batch carries its fence, so finding it must not allocate (a lookup
// by string(bytes) does not). A key compared at a second revision (a fence
// re-created mid-batch) is not recorded, so that compare is never merged away.
type fenceSet map[string]int64

// has reports whether cmp is a fence compare the set already holds.
func (f fenceSet) has(cmp clientv3.Cmp) bool {
	rev, ok := fenceOf(cmp)
	if !ok {
		return false
	}
	held, found := f[string(cmp.Key)]
	return found && held == rev
}

func (f fenceSet) add(cmp clientv3.Cmp) {
	if rev, ok := fenceOf(cmp); ok {
		if _, found := f[string(cmp.Key)]; !found {
			f[string(cmp.Key)] = rev
		}
	}
}
