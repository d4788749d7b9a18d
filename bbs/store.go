package bbs

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sync/errgroup"
	"google.golang.org/protobuf/proto"
)

// StoreConfig holds the Store's optional settings.
type StoreConfig struct {
	// Prefix of every key; DefaultPrefix when empty.
	Prefix string
	// Now is the clock for "since" times; time.Now when nil.
	Now func() time.Time
	// CrashResetAfter: an instance that ran this long before crashing starts
	// its crash count again (Diego's 5 minutes).
	CrashResetAfter time.Duration
	// Workers is how many merged transactions may be in flight at once.
	Workers int
	// MaxTxnOps is the etcd cluster's --max-txn-ops: concurrent writes are
	// merged into transactions up to it. Default 128, etcd's default.
	MaxTxnOps int
	// SubscriberBuffer is how many events a subscriber may fall behind.
	SubscriberBuffer int
	Registerer       prometheus.Registerer
	Logger           *slog.Logger
}

// Store keeps desired LRPs, actual LRPs and tasks in etcd under the key layout
// of ARCHITECTURE.md. Every transition is one transaction guarded by the
// record's mod revision (and the caller's fence), with index keys written in
// the same transaction as their record.
//
// Errors: ErrNotFound, ErrAlreadyExists, ErrConflict (a concurrent write won),
// ErrTransition (the state machine forbids it), ErrFenceLost, each wrapped
// with the record it concerns.
type Store struct {
	cli     *clientv3.Client
	keys    Keys
	now     func() time.Time
	reset   time.Duration
	log     *slog.Logger
	metrics *metrics

	desired *view
	actual  *view
	tasks   *view
	commit  *committer
	hub     *hub
	// followers are the WatchSchedules streams.
	followers *followers

	// Prefixes viewFor tests on every write, built once.
	actualPrefix, taskPrefix string
}

// NewStore returns a Store on cli. Call Run to keep its views and committer going.
func NewStore(cli *clientv3.Client, cfg StoreConfig) *Store {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.CrashResetAfter <= 0 {
		cfg.CrashResetAfter = 5 * time.Minute
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	m := newMetrics(cfg.Registerer)
	s := &Store{
		cli:     cli,
		keys:    NewKeys(cfg.Prefix),
		now:     cfg.Now,
		reset:   cfg.CrashResetAfter,
		log:     cfg.Logger,
		metrics: m,
		commit:  newCommitter(cli.KV, cfg.Workers, cfg.MaxTxnOps, m),
		hub:     newHub(cfg.SubscriberBuffer, m),

		followers: newFollowers(),
	}
	s.actualPrefix, s.taskPrefix = s.keys.ActualPrefix(), s.keys.TaskPrefix()
	s.desired = newView(cli, s.keys.DesiredPrefix(), cfg.Logger, s.onDesiredChange)
	s.actual = newView(cli, s.keys.ActualPrefix(), cfg.Logger, s.onActualChange)
	s.tasks = newView(cli, s.keys.TaskPrefix(), cfg.Logger, s.onTaskChange)
	return s
}

// Keys returns the store's key layout.
func (s *Store) Keys() Keys { return s.keys }

// Run keeps the views in step with etcd and commits writes until ctx is done.
func (s *Store) Run(ctx context.Context) error {
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return s.commit.run(ctx) })
	g.Go(func() error { return s.desired.run(ctx) })
	g.Go(func() error { return s.actual.run(ctx) })
	g.Go(func() error { return s.tasks.run(ctx) })
	return g.Wait()
}

// WaitReady blocks until every view has listed once.
func (s *Store) WaitReady(ctx context.Context) error {
	for _, v := range []*view{s.desired, s.actual, s.tasks} {
		select {
		case <-v.ready:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// Subscribe starts an event subscription; guid filters to one LRP or task.
func (s *Store) Subscribe(guid string) *Subscription { return s.hub.subscribe(guid) }

// record is a key's value as a transition sees it.
type record struct {
	val    []byte
	modRev int64
	exists bool
}

// edits are the ops of one transaction and the keys they write.
type edits struct {
	ops    []clientv3.Op
	writes []string
}

func (e *edits) put(key, val string) {
	e.ops = append(e.ops, clientv3.OpPut(key, val))
	e.writes = append(e.writes, key)
}

func (e *edits) del(key string) {
	e.ops = append(e.ops, clientv3.OpDelete(key))
	e.writes = append(e.writes, key)
}

// plan is what a transition writes: ops on the record and its index keys.
// Its slices start in its own arrays, so it must not be copied once reset.
type plan struct {
	edits
	// val is the record's new value; nil with deleted set when it goes away.
	val     []byte
	deleted bool
	// noop: the record already is what the caller asked for.
	noop bool
	// rec is the decoded record as a recordStep left it.
	rec proto.Message

	// Room for the usual ops (a record and two index keys), so deciding a
	// transition allocates no slices for them.
	opBuf    [3]clientv3.Op
	writeBuf [3]string
}

func (p *plan) reset() {
	*p = plan{}
	p.ops, p.writes = p.opBuf[:0], p.writeBuf[:0]
}

// transition decides, from the record's current value, what to write into p.
type transition func(cur record, p *plan) error

const maxAttempts = 4

// mutation is one guarded write of the record at key, in progress: what is
// known of the record and the transaction that writes it. mutate drives one
// to its end; mutateAll decides many on the view and commits them together.
type mutation struct {
	key   string
	fence *basinv1.Fence
	step  transition
	view  *view

	cur      record
	fresh    bool // cur was read from etcd, not guessed from the view
	attempts int
	queued   bool // in the committer for mutateAll, which awaits it
	p        plan
	item     txnItem
	cmps     [2]clientv3.Cmp
	elses    [2]clientv3.Op
}

// begin sets m up to write key, guessing the record from the view: the
// first attempt guards on the revision this process already knows (from
// its watch or its own last write), so the common case is one round trip.
func (s *Store) begin(m *mutation, key string, fence *basinv1.Fence, step transition) {
	v := s.viewFor(key)
	e, ok := v.get(key)
	*m = mutation{key: key, fence: fence, step: step, view: v, cur: record{val: e.val, modRev: e.modRev, exists: ok}}
}

// decide runs the step on m.cur and prepares the guarded transaction. done
// says there is nothing to write: the step refused (err) or found the record
// as asked (noop).
func (m *mutation) decide() (done bool, err error) {
	m.p.reset()
	if err := m.step(m.cur, &m.p); err != nil {
		return true, err
	}
	if m.p.noop {
		return true, nil
	}
	m.cmps[0] = clientv3.Compare(clientv3.ModRevision(m.key), "=", m.cur.modRev)
	m.elses[0] = clientv3.OpGet(m.key)
	n := 1
	if m.fence != nil {
		m.cmps[1] = clientv3.Compare(clientv3.CreateRevision(m.fence.GetKey()), "=", m.fence.GetCreateRevision())
		m.elses[1] = clientv3.OpGet(m.fence.GetKey(), clientv3.WithKeysOnly())
		n = 2
	}
	m.item = txnItem{cmps: m.cmps[:n], ops: m.p.ops, elses: m.elses[:n], writes: m.p.writes}
	return false, nil
}

// settle takes in the outcome of m's transaction. done is false when the
// guard failed on a newer record, now in m.cur: decide again on it.
func (s *Store) settle(m *mutation, res txnResult) (done bool, err error) {
	if res.err != nil {
		return true, fmt.Errorf("write %s: %w", m.key, res.err)
	}
	if res.succeeded {
		m.view.noteWrite(m.key, m.p.val, res.rev, m.p.deleted)
		m.cur = record{val: m.p.val, modRev: res.rev, exists: !m.p.deleted}
		return true, nil
	}
	if m.fence != nil {
		fr := res.elses.Responses[1].GetResponseRange()
		if len(fr.Kvs) == 0 || fr.Kvs[0].CreateRevision != m.fence.GetCreateRevision() {
			return true, fmt.Errorf("write %s: %w: %s is no longer held at create revision %d", m.key, ErrFenceLost, m.fence.GetKey(), m.fence.GetCreateRevision())
		}
	}
	s.metrics.conflicts.Inc()
	m.fresh = true
	rr := res.elses.Responses[0].GetResponseRange()
	if len(rr.Kvs) == 0 {
		m.cur = record{}
		m.view.noteWrite(m.key, nil, res.elses.Header.Revision, true)
	} else {
		kv := rr.Kvs[0]
		m.cur = record{val: kv.Value, modRev: kv.ModRevision, exists: true}
		m.view.noteWrite(m.key, kv.Value, kv.ModRevision, false)
	}
	return false, nil
}

// finish drives m from where it stands until it is written, refused, or out
// of attempts. When the view's guess is stale the failed transaction returns
// the current value, and the transition is decided again on it.
func (s *Store) finish(ctx context.Context, m *mutation) error {
	for m.attempts < maxAttempts {
		m.attempts++
		done, err := m.decide()
		if err != nil && !m.fresh {
			// The view may lag: decide refusals on what etcd holds now.
			if m.cur, err = s.read(ctx, m.key); err != nil {
				return err
			}
			m.fresh = true
			done, err = m.decide()
		}
		if done {
			return err
		}
		if done, err := s.settle(m, s.commit.do(ctx, &m.item)); done {
			return err
		}
	}
	return fmt.Errorf("write %s: %w after %d attempts", m.key, ErrConflict, maxAttempts)
}

// mutate runs one guarded write of the record at key and returns the record
// as written (or as found, for a noop).
func (s *Store) mutate(ctx context.Context, key string, fence *basinv1.Fence, step transition) (record, error) {
	var m mutation
	s.begin(&m, key, fence, step)
	err := s.finish(ctx, &m)
	return m.cur, err
}

// mutateAll runs many mutations, each begun, as mutate would run each: the
// same guard, retries and view notes, with errs[i] and ms[i].cur what mutate
// would return. What differs is how they wait: every write decided on the
// view is queued on the committer before any is awaited, so a batch costs no
// goroutine per item. Only a mutation the view cannot settle (refused on a
// value that may lag, or beaten by another write) goes on alone in a
// goroutine, from where it stands. They are bulk writes (see txnItem.bulk):
// a cell's batch never holds up a user's write.
func (s *Store) mutateAll(ctx context.Context, ms []mutation) []error {
	errs := make([]error, len(ms))
	var slow sync.WaitGroup
	goOn := func(i int) { slow.Go(func() { errs[i] = s.finish(ctx, &ms[i]) }) }
	done := make(chan *txnItem, len(ms))
	queued := 0
	for i := range ms {
		m := &ms[i]
		m.attempts = 1
		fin, err := m.decide()
		switch {
		case err != nil:
			// finish decides it again, reading etcd, as mutate does.
			m.attempts = 0
			goOn(i)
		case fin: // noop on the view's value, as in mutate
		default:
			m.item.done, m.item.seq, m.item.bulk = done, i, true
			if err := s.commit.submit(ctx, &m.item); err != nil {
				_, errs[i] = s.settle(m, txnResult{err: err})
				continue
			}
			m.queued = true
			queued++
		}
	}
wait:
	for ; queued > 0; queued-- {
		select {
		case it := <-done:
			m := &ms[it.seq]
			m.queued = false
			if fin, err := s.settle(m, it.result); fin {
				errs[it.seq] = err
			} else {
				goOn(it.seq)
			}
		case <-ctx.Done():
			// As in do: the writes may still happen, unreported.
			for i := range ms {
				if ms[i].queued {
					_, errs[i] = s.settle(&ms[i], txnResult{err: ctx.Err()})
				}
			}
			break wait
		}
	}
	slow.Wait()
	return errs
}

func (s *Store) viewFor(key string) *view {
	switch {
	case strings.HasPrefix(key, s.actualPrefix):
		return s.actual
	case strings.HasPrefix(key, s.taskPrefix):
		return s.tasks
	default:
		return s.desired
	}
}

// read gets key from etcd and notes it in the view.
func (s *Store) read(ctx context.Context, key string) (record, error) {
	resp, err := s.cli.Get(ctx, key)
	if err != nil {
		return record{}, fmt.Errorf("read %s: %w", key, err)
	}
	if len(resp.Kvs) == 0 {
		s.viewFor(key).noteWrite(key, nil, resp.Header.Revision, true)
		return record{}, nil
	}
	kv := resp.Kvs[0]
	s.viewFor(key).noteWrite(key, kv.Value, kv.ModRevision, false)
	return record{val: kv.Value, modRev: kv.ModRevision, exists: true}, nil
}

func marshal(m proto.Message) []byte {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		// Only messages with invalid UTF-8 strings fail, and validation
		// rejects those before they get here.
		panic(fmt.Sprintf("marshal %T: %v", m, err))
	}
	return b
}

// checkCellFence requires a cell's fence to be its own presence key.
func (s *Store) checkCellFence(field string, cellID string, f *basinv1.Fence) error {
	if err := checkFence(field, f, true); err != nil {
		return err
	}
	if !s.keys.isCell(f.GetKey(), cellID) {
		return fieldErr(field+".key", "must be the cell's presence key %q, got %q", s.keys.Cell(cellID), f.GetKey())
	}
	return nil
}

// checkLeaderFence accepts no fence (user requests) or a leader's election key.
func (s *Store) checkLeaderFence(field string, f *basinv1.Fence) error {
	if err := checkFence(field, f, false); err != nil || f == nil {
		return err
	}
	if !strings.HasPrefix(f.GetKey(), s.keys.LeaderPrefix()) && !strings.HasPrefix(f.GetKey(), s.keys.CellPrefix()) {
		return fieldErr(field+".key", "must be an election key under %q or a presence key under %q, got %q", s.keys.LeaderPrefix(), s.keys.CellPrefix(), f.GetKey())
	}
	return nil
}
