package bbs

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// recordingKV notes the compare count of every transaction it sends.
type recordingKV struct {
	clientv3.KV
	mu   sync.Mutex
	cmps []int
}

func (k *recordingKV) Txn(ctx context.Context) clientv3.Txn {
	return &recordingTxn{Txn: k.KV.Txn(ctx), kv: k}
}

type recordingTxn struct {
	clientv3.Txn
	kv *recordingKV
}

func (t *recordingTxn) If(cs ...clientv3.Cmp) clientv3.Txn {
	t.kv.mu.Lock()
	t.kv.cmps = append(t.kv.cmps, len(cs))
	t.kv.mu.Unlock()
	t.Txn = t.Txn.If(cs...)
	return t
}

func (t *recordingTxn) Then(ops ...clientv3.Op) clientv3.Txn { t.Txn = t.Txn.Then(ops...); return t }
func (t *recordingTxn) Else(ops ...clientv3.Op) clientv3.Txn { t.Txn = t.Txn.Else(ops...); return t }

// Writes fenced by one key share its compare in a merged transaction, so a
// cell's batch fits the op limit in fewer transactions.
func TestCommitterSharesFenceCompares(t *testing.T) {
	prefix := testPrefix()
	fenceKey := prefix + "cells/c1"
	put, err := testClient.Put(context.Background(), fenceKey, "")
	if err != nil {
		t.Fatal(err)
	}
	fence := clientv3.Compare(clientv3.CreateRevision(fenceKey), "=", put.Header.Revision)
	kv := &recordingKV{KV: testClient.KV}
	c := newCommitter(kv, 1, 5, newMetrics(nil))
	const n = 4
	items := make([]*txnItem, n)
	for i := range items {
		k := fmt.Sprintf("%sx/%d", prefix, i)
		items[i] = &txnItem{
			cmps:   []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(k), "=", 0), fence},
			ops:    []clientv3.Op{clientv3.OpPut(k, "v")},
			writes: []string{k},
			done:   make(chan *txnItem, 1),
		}
		c.queue <- items[i] // queued before the worker starts: one gather sees all
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	done := make(chan struct{})
	go func() { defer close(done); c.run(ctx) }()
	for i, it := range items {
		if r := (<-it.done).result; r.err != nil || !r.succeeded {
			t.Fatalf("item %d: %+v", i, r)
		}
	}
	cancel()
	<-done
	kv.mu.Lock()
	defer kv.mu.Unlock()
	// 4 record compares + 1 shared fence = 5, within the limit: one txn.
	if len(kv.cmps) != 1 || kv.cmps[0] != n+1 {
		t.Errorf("transactions' compare counts %v, want one of %d", kv.cmps, n+1)
	}
}

// One stale compare in a merged transaction fails only its own item: the
// others are merged again rather than each run alone.
func TestCommitterSplitsOnlyTheConflict(t *testing.T) {
	prefix := testPrefix()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	const n = 6
	keys := make([]string, n)
	revs := make([]int64, n)
	for i := range keys {
		keys[i] = fmt.Sprintf("%sy/%d", prefix, i)
		put, err := testClient.Put(ctx, keys[i], "v0")
		if err != nil {
			t.Fatal(err)
		}
		revs[i] = put.Header.Revision
	}
	revs[2]-- // stale: this item's guard fails
	kv := &recordingKV{KV: testClient.KV}
	c := newCommitter(kv, 1, 128, newMetrics(nil))
	items := make([]*txnItem, n)
	for i := range items {
		items[i] = &txnItem{
			cmps:   []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(keys[i]), "=", revs[i])},
			ops:    []clientv3.Op{clientv3.OpPut(keys[i], "v1")},
			elses:  []clientv3.Op{clientv3.OpGet(keys[i])},
			writes: []string{keys[i]},
			done:   make(chan *txnItem, 1),
		}
		c.queue <- items[i]
	}
	done := make(chan struct{})
	go func() { defer close(done); c.run(ctx) }()
	for i, it := range items {
		r := (<-it.done).result
		if r.err != nil {
			t.Fatalf("item %d: %v", i, r.err)
		}
		if want := i != 2; r.succeeded != want {
			t.Errorf("item %d succeeded=%v, want %v", i, r.succeeded, want)
		}
		if i == 2 && (r.elses == nil || len(r.elses.Responses) == 0) {
			t.Errorf("the conflicting item lacks its else values: %+v", r)
		}
	}
	cancel()
	<-done
	kv.mu.Lock()
	defer kv.mu.Unlock()
	// The merged attempt, the conflict alone, the other five merged again.
	if len(kv.cmps) != 3 {
		t.Errorf("%d transactions (compare counts %v), want 3", len(kv.cmps), kv.cmps)
	}
}

// A merged transaction holds each fence compare once; a fence key compared
// at another revision, or any other compare, is never merged away.
func TestFenceSet(t *testing.T) {
	fence := func(key string, rev int64) clientv3.Cmp {
		return clientv3.Compare(clientv3.CreateRevision(key), "=", rev)
	}
	tests := []struct {
		name  string
		added []clientv3.Cmp
		cmp   clientv3.Cmp
		held  bool
	}{
		{"empty", nil, fence("/cells/a", 5), false},
		{"same fence", []clientv3.Cmp{fence("/cells/a", 5)}, fence("/cells/a", 5), true},
		{"same key, another revision", []clientv3.Cmp{fence("/cells/a", 5)}, fence("/cells/a", 6), false},
		{"the second revision is not recorded", []clientv3.Cmp{fence("/cells/a", 5), fence("/cells/a", 6)}, fence("/cells/a", 6), false},
		{"another key", []clientv3.Cmp{fence("/cells/a", 5)}, fence("/cells/b", 5), false},
		{"a mod revision guard is no fence", []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision("/x"), "=", 5)},
			clientv3.Compare(clientv3.ModRevision("/x"), "=", 5), false},
		{"a greater-than compare is no fence", []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision("/x"), ">", 0)},
			clientv3.Compare(clientv3.CreateRevision("/x"), ">", 0), false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := fenceSet{}
			for _, c := range tc.added {
				f.add(c)
			}
			if got := f.has(tc.cmp); got != tc.held {
				t.Errorf("has = %v, want %v", got, tc.held)
			}
		})
	}
}

// A user's write waiting with a cell fleet's batched transitions goes first.
func TestCommitterPutsInteractiveWritesFirst(t *testing.T) {
	prefix := testPrefix()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := newCommitter(testClient.KV, 1, 1, newMetrics(nil)) // one write per transaction
	done := make(chan *txnItem, 4)
	item := func(name string, bulk bool) *txnItem {
		k := prefix + "z/" + name
		return &txnItem{
			cmps: []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(k), "=", 0)},
			ops:  []clientv3.Op{clientv3.OpPut(k, "v")}, writes: []string{k},
			bulk: bulk, done: done,
		}
	}
	// Queued before the worker starts, the bulk ones first.
	for i := range 3 {
		if err := c.submit(ctx, item(fmt.Sprint("cell-", i), true)); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.submit(ctx, item("user", false)); err != nil {
		t.Fatal(err)
	}
	stopped := make(chan struct{})
	go func() { defer close(stopped); c.run(ctx) }()
	var order []string
	for range 4 {
		it := <-done
		if !it.result.succeeded {
			t.Fatalf("%s: %+v", it.writes[0], it.result)
		}
		order = append(order, it.writes[0][len(prefix+"z/"):])
	}
	cancel()
	<-stopped
	if order[0] != "user" {
		t.Errorf("committed in order %v, want the user's write first", order)
	}
}
