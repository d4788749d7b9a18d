package auctioneer

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/basinpaas/basin/bbs"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// workKind tells instances from tasks.
type workKind int

const (
	kindLRP workKind = iota
	kindTask
)

// item is one queue key as the leader sees it.
type item struct {
	key   string
	kind  workKind
	guid  string
	index int32
	// seq orders items by arrival, so old work goes first.
	seq uint64
	// attempts counts auctions that could not place the item or whose cell
	// turned it down.
	attempts int
	// notBefore: not auctioned before then (retry delay, or waiting for the
	// cell that accepted it to claim it).
	notBefore time.Time
	reason    string
}

// queue mirrors the queue keys (index/unclaimed/, index/pending/) in etcd:
// the auctioneer's input is state, so a new leader resumes from it.
type queue struct {
	keys bbs.Keys

	mu    sync.Mutex
	items map[string]*item
	seq   uint64
	// wake has a token when items arrived since the auction loop last looked.
	wake chan struct{}
}

func newQueue(keys bbs.Keys) *queue {
	return &queue{keys: keys, items: make(map[string]*item), wake: make(chan struct{}, 1)}
}

func (q *queue) parse(key string) (*item, bool) {
	if guid, idx, ok := q.keys.ParseUnclaimed(key); ok {
		return &item{key: key, kind: kindLRP, guid: guid, index: idx}, true
	}
	if guid, ok := cutPrefix(key, q.keys.PendingTaskPrefix()); ok && guid != "" {
		return &item{key: key, kind: kindTask, guid: guid}, true
	}
	return nil, false
}

func cutPrefix(s, p string) (string, bool) {
	if len(s) < len(p) || s[:len(p)] != p {
		return "", false
	}
	return s[len(p):], true
}

// put adds a key, or resets it: a key written again is a new incarnation
// (requeued by the converger) and starts its attempts afresh.
func (q *queue) put(key string) {
	it, ok := q.parse(key)
	if !ok {
		return
	}
	q.mu.Lock()
	q.seq++
	it.seq = q.seq
	q.items[key] = it
	q.mu.Unlock()
	q.signal()
}

func (q *queue) del(key string) {
	q.mu.Lock()
	delete(q.items, key)
	q.mu.Unlock()
}

func (q *queue) signal() {
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// take returns up to max items due at now, oldest first, and holds each back
// for hold so the next batch does not take it again while it is auctioned.
func (q *queue) take(now time.Time, max int, hold time.Duration) []item {
	q.mu.Lock()
	defer q.mu.Unlock()
	var due []*item
	for _, it := range q.items {
		if !now.Before(it.notBefore) {
			due = append(due, it)
		}
	}
	sortBySeq(due)
	if len(due) > max {
		due = due[:max]
	}
	out := make([]item, len(due))
	for i, it := range due {
		it.notBefore = now.Add(hold)
		out[i] = *it
	}
	return out
}

// due counts items due at now and says when the next one not yet due is.
func (q *queue) due(now time.Time) (n int, next time.Time) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for _, it := range q.items {
		if !now.Before(it.notBefore) {
			n++
		} else if next.IsZero() || it.notBefore.Before(next) {
			next = it.notBefore
		}
	}
	return n, next
}

// retry records a failed attempt and returns the attempts so far; the item
// becomes due again at notBefore. Items gone from the queue return 0.
func (q *queue) retry(key string, reason string, notBefore time.Time) int {
	q.mu.Lock()
	defer q.mu.Unlock()
	it, ok := q.items[key]
	if !ok {
		return 0
	}
	it.attempts++
	it.reason = reason
	it.notBefore = notBefore
	return it.attempts
}

// hold keeps an item back until notBefore without counting an attempt.
func (q *queue) hold(key string, notBefore time.Time) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if it, ok := q.items[key]; ok {
		it.notBefore = notBefore
	}
}

func (q *queue) len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.items)
}

// watch lists prefix, then watches it from the listed revision + 1, and
// lists again after a compaction, so no change is missed.
func (q *queue) watch(ctx context.Context, cli *clientv3.Client, prefix string) error {
	for {
		resp, err := cli.Get(ctx, prefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("list %s: %w", prefix, err)
		}
		var keys []string
		for _, kv := range resp.Kvs {
			keys = append(keys, string(kv.Key))
		}
		q.replaceUnder(prefix, keys)
		wch := cli.Watch(clientv3.WithRequireLeader(ctx), prefix, clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1))
		for wr := range wch {
			if err := wr.Err(); err != nil {
				if errors.Is(err, rpctypes.ErrCompacted) {
					break
				}
				return fmt.Errorf("watch %s: %w", prefix, err)
			}
			for _, ev := range wr.Events {
				if ev.Type == clientv3.EventTypeDelete {
					q.del(string(ev.Kv.Key))
				} else {
					q.put(string(ev.Kv.Key))
				}
			}
		}
		if ctx.Err() != nil {
			return nil
		}
	}
}

// replaceUnder sets the items under prefix to exactly keys after a
// (re-)list, keeping the state of items that are still there.
func (q *queue) replaceUnder(prefix string, keys []string) {
	q.mu.Lock()
	listed := make(map[string]bool, len(keys))
	for _, k := range keys {
		listed[k] = true
		if _, ok := q.items[k]; ok {
			continue
		}
		if it, ok := q.parse(k); ok {
			q.seq++
			it.seq = q.seq
			q.items[k] = it
		}
	}
	for k := range q.items {
		if _, under := cutPrefix(k, prefix); under && !listed[k] {
			delete(q.items, k)
		}
	}
	q.mu.Unlock()
	q.signal()
}

func sortBySeq(items []*item) {
	slices.SortFunc(items, func(a, b *item) int { return cmp.Compare(a.seq, b.seq) })
}
