package bbs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/metadata"
)

// kvEntry is one key's value as of its mod revision.
type kvEntry struct {
	val    []byte
	modRev int64
}

// change is one key's move from before to after; nil means absent.
type change struct {
	key    string
	before *kvEntry
	after  *kvEntry
}

// overlay holds what this process itself just wrote, until the watch catches
// up: without it a claim followed at once by a start would guard on a stale
// revision and pay a second round trip.
type overlay struct {
	kvEntry
	deleted bool
}

// view mirrors one etcd prefix through list + watch. It serves two purposes:
// revisions to guard transactions with (a hint: every write still compares in
// etcd, so a stale view costs a retry, never a wrong write), and the ordered
// stream of changes the events service publishes.
//
// It lists, then watches from the listed revision + 1. When the watch is
// compacted away or breaks, it lists again and reports the difference between
// what it had and what it found as changes, so no change is lost or repeated.
//
// kvs at rev is etcd's content of the prefix at that revision; a reader
// needing a revision the view has not reached waits in waitRevision.
type view struct {
	cli      *clientv3.Client
	prefix   string
	log      *slog.Logger
	onChange func(rev int64, changes []change)

	mu  sync.RWMutex
	kvs map[string]kvEntry
	// rev: kvs holds every change of the prefix up to this revision.
	rev int64
	// advanced is closed, and replaced, each time rev grows.
	advanced chan struct{}
	recent   map[string]overlay
	ready    chan struct{}
	readyMu  sync.Once

	// askedAt is when a reader last asked etcd for a progress
	// notification (unix ns), 0 when none was asked since rev last grew.
	askedAt atomic.Int64

	// relists counts full re-lists after the first (under mu).
	relists int
}

const maxOverlay = 65536

func newView(cli *clientv3.Client, prefix string, log *slog.Logger, onChange func(int64, []change)) *view {
	return &view{
		cli:      cli,
		prefix:   prefix,
		log:      log,
		onChange: onChange,
		kvs:      make(map[string]kvEntry),
		advanced: make(chan struct{}),
		recent:   make(map[string]overlay),
		ready:    make(chan struct{}),
	}
}

// get returns the freshest value this process knows for key.
func (v *view) get(key string) (kvEntry, bool) {
	v.mu.RLock()
	defer v.mu.RUnlock()
	e, ok := v.kvs[key]
	if o, found := v.recent[key]; found && o.modRev > e.modRev {
		return o.kvEntry, !o.deleted
	}
	return e, ok
}

// noteWrite records a value this process wrote (or read fresh) at modRev.
func (v *view) noteWrite(key string, val []byte, modRev int64, deleted bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if e, ok := v.kvs[key]; ok && e.modRev >= modRev {
		return
	}
	if o, ok := v.recent[key]; ok && o.modRev >= modRev {
		return
	}
	if len(v.recent) >= maxOverlay {
		// The watch lags by more than the overlay holds (a burst of
		// claims): forget a quarter, not all, since each forgotten key
		// costs a guard conflict if written again before the watch
		// catches up.
		n := maxOverlay / 4
		for k := range v.recent {
			if n == 0 {
				break
			}
			delete(v.recent, k)
			n--
		}
	}
	v.recent[key] = overlay{kvEntry: kvEntry{val: val, modRev: modRev}, deleted: deleted}
}

// relistCount is how many times the view re-listed after its first list.
func (v *view) relistCount() int {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return v.relists
}

// revision is the etcd revision the view reflects.
func (v *view) revision() int64 {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return v.rev
}

// advanceLocked moves rev forward and wakes the readers waiting for it; v.mu
// held.
func (v *view) advanceLocked(rev int64) {
	if rev <= v.rev {
		return
	}
	v.rev = rev
	close(v.advanced)
	v.advanced = make(chan struct{})
	v.askedAt.Store(0)
}

// progressRetry is how long a waiting reader gives a progress request before
// asking again: etcd ignores one that comes while the watcher catches up.
const progressRetry = 100 * time.Millisecond

// waitRevision waits, at most wait, until the view holds every change up to
// rev, and reports whether it does. The view's revision moves with changes to
// its prefix only, so a revision written elsewhere (a claim, for the desired
// view) is learnt from a progress notification, which etcd sends on the watch
// after every change up to the revision it names. Waiting readers share one
// request: another goes out only once its answer moved rev on, or after
// progressRetry.
func (v *view) waitRevision(ctx context.Context, rev int64, wait time.Duration) bool {
	deadline := time.NewTimer(wait)
	defer deadline.Stop()
	for {
		v.mu.RLock()
		cur, advanced := v.rev, v.advanced
		v.mu.RUnlock()
		if cur >= rev {
			return true
		}
		asked, now := v.askedAt.Load(), time.Now().UnixNano()
		if (asked == 0 || now-asked >= int64(progressRetry)) && v.askedAt.CompareAndSwap(asked, now) {
			v.requestProgress()
		}
		retry := time.NewTimer(progressRetry)
		select {
		case <-advanced:
		case <-retry.C:
		case <-deadline.C:
			retry.Stop()
			return false
		case <-ctx.Done():
			retry.Stop()
			return false
		}
		retry.Stop()
	}
}

// requestProgress asks etcd for a progress notification on the view's watch
// stream. A failure only delays the waiting readers: they ask again. Not
// under a reader's ctx: when the stream is missing, the client makes one
// from the ctx it is given, and that stream outlives the request.
func (v *view) requestProgress() {
	ctx, cancel := context.WithTimeout(v.streamCtx(context.Background()), progressRetry)
	defer cancel()
	if err := v.cli.RequestProgress(ctx); err != nil && ctx.Err() == nil {
		v.log.Debug("watch progress request failed", "prefix", v.prefix, "err", err)
	}
}

// streamCtx puts the view's watch on a gRPC watch stream of its own (the
// client groups watches into streams by outgoing metadata). etcd answers a
// progress request only when every watcher on the stream is in step, and
// sends the answer to all of them: the client's other watches (a cell's, a
// leader's, another view's under load) must neither hold it back nor be
// woken by it.
func (v *view) streamCtx(ctx context.Context) context.Context {
	md := metadata.Pairs("basin-view", strconv.QuoteToASCII(v.prefix))
	return clientv3.WithRequireLeader(metadata.NewOutgoingContext(ctx, md))
}

// snapshot returns the entries of keys (nil when absent) as the watch
// delivered them, all as of the view's revision. The overlay of this
// process's own writes is left out: mixed in, it would show some keys at a
// revision the others have not reached.
func (v *view) snapshot(keys []string) []*kvEntry {
	out := make([]*kvEntry, len(keys))
	v.mu.RLock()
	defer v.mu.RUnlock()
	for i, k := range keys {
		if e, ok := v.kvs[k]; ok {
			out[i] = &e
		}
	}
	return out
}

func (v *view) size() int {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return len(v.kvs)
}

// run keeps the view in step with etcd until ctx is done.
func (v *view) run(ctx context.Context) error {
	backoff := 50 * time.Millisecond
	// A view that ran before resumes its watch where it stopped; if etcd has
	// compacted that revision away, the watch says so and it re-lists.
	needList := v.revision() == 0
	for ctx.Err() == nil {
		if needList {
			if err := v.relist(ctx); err != nil {
				if ctx.Err() != nil {
					break
				}
				v.log.Warn("list failed; retrying", "prefix", v.prefix, "err", err, "backoff", backoff)
				if !sleepCtx(ctx, backoff) {
					break
				}
				backoff = min(backoff*2, 2*time.Second)
				continue
			}
			needList = false
			backoff = 50 * time.Millisecond
		}
		compacted, err := v.watch(ctx)
		if ctx.Err() != nil {
			break
		}
		if compacted {
			v.log.Info("watch compacted; re-listing", "prefix", v.prefix)
		} else {
			v.log.Warn("watch ended; re-listing", "prefix", v.prefix, "err", err)
			if !sleepCtx(ctx, backoff) {
				break
			}
			backoff = min(backoff*2, 2*time.Second)
		}
		// A broken watch may have missed anything: re-list and diff.
		needList = true
	}
	return nil
}

// watch applies events from rev+1 until the watch ends. It reports whether it
// ended because the revision was compacted.
func (v *view) watch(ctx context.Context) (compacted bool, err error) {
	wctx, cancel := context.WithCancel(v.streamCtx(ctx))
	defer cancel()
	wch := v.cli.Watch(wctx, v.prefix, clientv3.WithPrefix(), clientv3.WithRev(v.revision()+1))
	for resp := range wch {
		if resp.CompactRevision != 0 || errors.Is(resp.Err(), rpctypes.ErrCompacted) {
			return true, resp.Err()
		}
		if err := resp.Err(); err != nil {
			return false, err
		}
		if resp.IsProgressNotify() {
			v.mu.Lock()
			v.advanceLocked(resp.Header.Revision)
			v.mu.Unlock()
			continue
		}
		if len(resp.Events) == 0 {
			continue
		}
		// The last event's revision, not the header's: a watcher catching
		// up gets the events of at most 1,000 revisions per response, each
		// response headed with etcd's current revision.
		v.apply(resp.Events[len(resp.Events)-1].Kv.ModRevision, resp.Events)
	}
	return false, ctx.Err()
}

func (v *view) apply(rev int64, events []*clientv3.Event) {
	changes := make([]change, 0, len(events))
	v.mu.Lock()
	for _, ev := range events {
		key := string(ev.Kv.Key)
		var before *kvEntry
		if e, ok := v.kvs[key]; ok {
			before = &e
		}
		var after *kvEntry
		if ev.Type == clientv3.EventTypePut {
			e := kvEntry{val: ev.Kv.Value, modRev: ev.Kv.ModRevision}
			v.kvs[key] = e
			after = &e
		} else {
			delete(v.kvs, key)
		}
		if o, ok := v.recent[key]; ok && o.modRev <= ev.Kv.ModRevision {
			delete(v.recent, key)
		}
		changes = append(changes, change{key: key, before: before, after: after})
	}
	v.advanceLocked(rev)
	v.mu.Unlock()
	if v.onChange != nil {
		v.onChange(rev, changes)
	}
}

// relist reads the whole prefix at one revision, replaces the view with it and
// reports every difference from the previous view as a change.
func (v *view) relist(ctx context.Context) error {
	fresh := make(map[string]kvEntry, len(v.kvs))
	rev, err := listPrefix(ctx, v.cli, v.prefix, 0, func(kv kvPair) {
		fresh[kv.key] = kvEntry{val: kv.val, modRev: kv.modRev}
	})
	if err != nil {
		return err
	}
	v.mu.Lock()
	old := v.kvs
	var changes []change
	for k, e := range fresh {
		o, ok := old[k]
		if ok && o.modRev == e.modRev {
			continue
		}
		after := e
		var before *kvEntry
		if ok {
			before = &o
		}
		changes = append(changes, change{key: k, before: before, after: &after})
	}
	for k, o := range old {
		if _, ok := fresh[k]; !ok {
			before := o
			changes = append(changes, change{key: k, before: &before})
		}
	}
	v.kvs = fresh
	v.advanceLocked(rev) // a list is at etcd's current revision: never behind
	for k, o := range v.recent {
		if o.modRev <= rev {
			delete(v.recent, k)
		}
	}
	first := false
	v.readyMu.Do(func() { first = true; close(v.ready) })
	if !first {
		v.relists++
	}
	v.mu.Unlock()
	if !first && len(changes) > 0 && v.onChange != nil {
		v.onChange(rev, changes)
	}
	return nil
}

type kvPair struct {
	key    string
	val    []byte
	modRev int64
}

// listPrefix pages through prefix at one revision (rev 0: the current one) and
// returns that revision.
func listPrefix(ctx context.Context, cli *clientv3.Client, prefix string, rev int64, fn func(kvPair)) (int64, error) {
	const page = 1000
	end := clientv3.GetPrefixRangeEnd(prefix)
	key := prefix
	for {
		opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(page)}
		if rev != 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		resp, err := cli.Get(ctx, key, opts...)
		if err != nil {
			return 0, fmt.Errorf("list %s: %w", prefix, err)
		}
		if rev == 0 {
			rev = resp.Header.Revision
		}
		for _, kv := range resp.Kvs {
			fn(kvPair{key: string(kv.Key), val: kv.Value, modRev: kv.ModRevision})
		}
		if !resp.More || len(resp.Kvs) == 0 {
			return rev, nil
		}
		key = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// current returns what the watch last saw for key, ignoring local writes.
func (v *view) current(key string) (*kvEntry, bool) {
	v.mu.RLock()
	defer v.mu.RUnlock()
	e, ok := v.kvs[key]
	if !ok {
		return nil, false
	}
	return &e, true
}
