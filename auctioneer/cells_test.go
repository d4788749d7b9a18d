package auctioneer

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/basinpaas/basin/auctioneer/placement"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

func TestCellCache(t *testing.T) {
	now := time.Unix(1000, 0)
	var mu sync.Mutex // snapshot asks the cells in parallel
	calls := map[string]int{}
	down := map[string]bool{}
	c := &cellCache{
		maxAge: time.Second,
		now:    func() time.Time { return now },
		fetch: func(_ context.Context, p *basinv1.CellPresence) (placement.Cell, error) {
			mu.Lock()
			defer mu.Unlock()
			calls[p.GetCellId()]++
			if down[p.GetCellId()] {
				return placement.Cell{}, errors.New("unreachable")
			}
			return placement.Cell{ID: p.GetCellId(), Available: placement.Resources{MemoryMB: 1024, DiskMB: 1024, Containers: 10}}, nil
		},
		fetched: func(error) {},
		cells:   map[string]*cachedCell{},
	}
	pres := func(id string, rev int64) presence {
		return presence{p: &basinv1.CellPresence{CellId: id, RepAddress: id + ":1"}, rev: rev}
	}
	byID := func(s snapshot) map[string]placement.Cell {
		out := map[string]placement.Cell{}
		for _, c := range s.cells {
			out[c.ID] = c
		}
		return out
	}
	ctx := context.Background()

	s := byID(c.snapshot(ctx, []presence{pres("a", 1), pres("b", 1)}))
	if len(s) != 2 || calls["a"] != 1 || calls["b"] != 1 {
		t.Fatalf("first snapshot: cells %v, calls %v; want both fetched once", s, calls)
	}
	c.placed(placement.Plan{LRPs: []placement.LRPPlacement{{LRP: placement.LRP{ProcessGUID: "web", MemoryMB: 256, DiskMB: 100}, CellID: "a"}}})

	steps := []struct {
		name      string
		advance   time.Duration
		present   []presence
		forget    string
		down      string
		wantCalls map[string]int
		wantCells []string
	}{
		{name: "fresh answers serve the next auction", advance: 500 * time.Millisecond,
			present: []presence{pres("a", 1), pres("b", 1)}, wantCalls: map[string]int{"a": 1, "b": 1}, wantCells: []string{"a", "b"}},
		{name: "a changed presence key is asked again", present: []presence{pres("a", 1), pres("b", 2)},
			wantCalls: map[string]int{"a": 1, "b": 2}, wantCells: []string{"a", "b"}},
		{name: "a forgotten cell is asked again", forget: "a", present: []presence{pres("a", 1), pres("b", 2)},
			wantCalls: map[string]int{"a": 2, "b": 2}, wantCells: []string{"a", "b"}},
		{name: "old answers are refreshed", advance: time.Second, present: []presence{pres("a", 1), pres("b", 2)},
			wantCalls: map[string]int{"a": 3, "b": 3}, wantCells: []string{"a", "b"}},
		{name: "a cell gone from etcd leaves", present: []presence{pres("b", 2)},
			wantCalls: map[string]int{"a": 3, "b": 3}, wantCells: []string{"b"}},
		{name: "a failing cell sits out and is asked every time", forget: "b", down: "b", present: []presence{pres("b", 2)},
			wantCalls: map[string]int{"a": 3, "b": 4}, wantCells: nil},
		{name: "and again", present: []presence{pres("b", 2)},
			wantCalls: map[string]int{"a": 3, "b": 5}, wantCells: nil},
	}
	for i, st := range steps {
		now = now.Add(st.advance)
		if st.forget != "" {
			c.forget(st.forget)
		}
		if st.down != "" {
			down[st.down] = true
		}
		got := byID(c.snapshot(ctx, st.present))
		for id, n := range st.wantCalls {
			if calls[id] != n {
				t.Errorf("step %d (%s): %d State calls to %s, want %d", i, st.name, calls[id], id, n)
			}
		}
		if len(got) != len(st.wantCells) {
			t.Errorf("step %d (%s): cells %v, want %v", i, st.name, got, st.wantCells)
		}
		for _, id := range st.wantCells {
			if _, ok := got[id]; !ok {
				t.Errorf("step %d (%s): cell %s missing", i, st.name, id)
			}
		}
		if i == 0 {
			a := got["a"]
			if a.Available.MemoryMB != 1024-256 || a.Available.DiskMB != 1024-100 || a.Available.Containers != 9 || a.Instances["web"] != 1 {
				t.Errorf("cached cell a after a placement: %+v, want the placement taken off", a)
			}
		}
	}
}
