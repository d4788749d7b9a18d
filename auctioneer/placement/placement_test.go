package placement

import (
	"fmt"
	"math/rand/v2"
	"testing"
)

func cell(id, zone string, memMB int64) Cell {
	return Cell{
		ID: id, Zone: zone, Stacks: []string{"tiny"},
		Total:     Resources{MemoryMB: memMB, DiskMB: 100_000, Containers: 250},
		Available: Resources{MemoryMB: memMB, DiskMB: 100_000, Containers: 250},
	}
}

func lrps(guid string, from, to int32, memMB int64) []LRP {
	var out []LRP
	for i := from; i < to; i++ {
		out = append(out, LRP{ProcessGUID: guid, Index: i, Stack: "tiny", MemoryMB: memMB, DiskMB: 100})
	}
	return out
}

// checkInvariants verifies what every plan must satisfy: each item is placed
// or failed exactly once, no cell is over-filled, every placement passes the
// filters.
func checkInvariants(t *testing.T, cells []Cell, work Work, plan Plan) {
	t.Helper()
	if got, want := len(plan.LRPs)+len(plan.FailedLRPs), len(work.LRPs); got != want {
		t.Errorf("%d LRPs placed or failed, want %d", got, want)
	}
	if got, want := len(plan.Tasks)+len(plan.FailedTasks), len(work.Tasks); got != want {
		t.Errorf("%d tasks placed or failed, want %d", got, want)
	}
	byID := map[string]Cell{}
	used := map[string]Resources{}
	for _, c := range cells {
		byID[c.ID] = c
	}
	seen := map[string]bool{}
	use := func(cellID, stack string, tags []string, mem, disk int64) {
		c, ok := byID[cellID]
		if !ok {
			t.Fatalf("placed on unknown cell %s", cellID)
		}
		if c.Evacuating {
			t.Errorf("placed on evacuating cell %s", cellID)
		}
		if !hasAll(c.Stacks, []string{stack}) || !hasAll(c.Tags, tags) {
			t.Errorf("placed on cell %s that lacks stack %s or tags %v", cellID, stack, tags)
		}
		u := used[cellID]
		u.MemoryMB += mem
		u.DiskMB += disk
		u.Containers++
		used[cellID] = u
	}
	for _, p := range plan.LRPs {
		k := fmt.Sprintf("%s/%d", p.LRP.ProcessGUID, p.LRP.Index)
		if seen[k] {
			t.Errorf("%s placed twice", k)
		}
		seen[k] = true
		use(p.CellID, p.LRP.Stack, p.LRP.RequireTags, p.LRP.MemoryMB, p.LRP.DiskMB)
	}
	for _, p := range plan.Tasks {
		use(p.CellID, p.Task.Stack, p.Task.RequireTags, p.Task.MemoryMB, p.Task.DiskMB)
	}
	for id, u := range used {
		a := byID[id].Available
		if u.MemoryMB > a.MemoryMB || u.DiskMB > a.DiskMB || u.Containers > a.Containers {
			t.Errorf("cell %s over-filled: used %+v of available %+v", id, u, a)
		}
	}
}

// perCell counts one LRP's instances per cell after the plan, including
// those the cells already held.
func perCell(cells []Cell, plan Plan, guid string) map[string]int {
	n := map[string]int{}
	for _, c := range cells {
		n[c.ID] = c.Instances[guid]
	}
	for _, p := range plan.LRPs {
		if p.LRP.ProcessGUID == guid {
			n[p.CellID]++
		}
	}
	return n
}

func spread(n map[string]int) int {
	lo, hi := -1, 0
	for _, v := range n {
		if lo < 0 || v < lo {
			lo = v
		}
		hi = max(hi, v)
	}
	return hi - lo
}

func TestPlace(t *testing.T) {
	tests := []struct {
		name  string
		cells []Cell
		work  Work
		check func(t *testing.T, plan Plan)
	}{
		{
			name:  "three instances on three cells",
			cells: []Cell{cell("a", "z1", 4096), cell("b", "z1", 4096), cell("c", "z1", 4096)},
			work:  Work{LRPs: lrps("app", 0, 3, 256)},
			check: func(t *testing.T, plan Plan) {
				cells := map[string]bool{}
				for _, p := range plan.LRPs {
					cells[p.CellID] = true
				}
				if len(cells) != 3 {
					t.Errorf("instances on %d cells, want 3: %+v", len(cells), plan.LRPs)
				}
			},
		},
		{
			name:  "ten instances spread within one over three cells",
			cells: []Cell{cell("a", "z1", 8192), cell("b", "z1", 8192), cell("c", "z1", 8192)},
			work:  Work{LRPs: lrps("app", 0, 10, 256)},
			check: func(t *testing.T, plan Plan) {
				if d := spread(perCell([]Cell{{ID: "a"}, {ID: "b"}, {ID: "c"}}, plan, "app")); d > 1 {
					t.Errorf("spread %d, want <= 1", d)
				}
			},
		},
		{
			name: "spread counts instances the cells already hold",
			cells: func() []Cell {
				a, b, c := cell("a", "z1", 8192), cell("b", "z1", 8192), cell("c", "z1", 8192)
				a.Instances = map[string]int{"app": 3}
				b.Instances = map[string]int{"app": 1}
				return []Cell{a, b, c}
			}(),
			work: Work{LRPs: lrps("app", 4, 8, 256)},
			check: func(t *testing.T, plan Plan) {
				n := perCell([]Cell{{ID: "a", Instances: map[string]int{"app": 3}}, {ID: "b", Instances: map[string]int{"app": 1}}, {ID: "c"}}, plan, "app")
				if n["a"] != 3 || n["b"] != 3 || n["c"] != 2 {
					t.Errorf("per cell %v, want a:3 b:3 c:2", n)
				}
			},
		},
		{
			name:  "zones before cells",
			cells: []Cell{cell("a1", "z1", 8192), cell("a2", "z1", 8192), cell("b1", "z2", 8192)},
			work:  Work{LRPs: lrps("app", 0, 2, 256)},
			check: func(t *testing.T, plan Plan) {
				zones := map[string]bool{}
				for _, p := range plan.LRPs {
					zones[p.CellID[:1]] = true
				}
				if len(zones) != 2 {
					t.Errorf("two instances in zones %v, want both zones", zones)
				}
			},
		},
		{
			name:  "a cell with too little memory is never chosen",
			cells: []Cell{cell("small", "z1", 100), cell("big", "z1", 4096)},
			work:  Work{LRPs: lrps("app", 0, 4, 256)},
			check: func(t *testing.T, plan Plan) {
				for _, p := range plan.LRPs {
					if p.CellID == "small" {
						t.Errorf("placed %d on the small cell", p.LRP.Index)
					}
				}
			},
		},
		{
			name:  "no cell with the stack",
			cells: []Cell{cell("a", "z1", 4096)},
			work:  Work{LRPs: []LRP{{ProcessGUID: "app", Stack: "windows", MemoryMB: 1}}},
			check: func(t *testing.T, plan Plan) {
				if len(plan.FailedLRPs) != 1 || plan.FailedLRPs[0].Reason != "no cell with stack windows" {
					t.Errorf("failures %+v, want no cell with stack windows", plan.FailedLRPs)
				}
			},
		},
		{
			name:  "memory runs out within the batch",
			cells: []Cell{cell("a", "z1", 512), cell("b", "z1", 512)},
			work:  Work{LRPs: lrps("app", 0, 5, 256)},
			check: func(t *testing.T, plan Plan) {
				if len(plan.LRPs) != 4 || len(plan.FailedLRPs) != 1 || plan.FailedLRPs[0].Reason != ReasonMemory {
					t.Errorf("placed %d, failed %+v; want 4 placed and one %q", len(plan.LRPs), plan.FailedLRPs, ReasonMemory)
				}
				if plan.FailedLRPs[0].LRP.Index != 4 {
					t.Errorf("failed index %d, want the highest (4)", plan.FailedLRPs[0].LRP.Index)
				}
			},
		},
		{
			name: "disk and containers",
			cells: func() []Cell {
				c := cell("a", "z1", 4096)
				c.Available.DiskMB = 50
				return []Cell{c}
			}(),
			work: Work{LRPs: lrps("app", 0, 1, 256)},
			check: func(t *testing.T, plan Plan) {
				if len(plan.FailedLRPs) != 1 || plan.FailedLRPs[0].Reason != ReasonDisk {
					t.Errorf("failures %+v, want %q", plan.FailedLRPs, ReasonDisk)
				}
			},
		},
		{
			name: "containers",
			cells: func() []Cell {
				c := cell("a", "z1", 4096)
				c.Available.Containers = 0
				return []Cell{c}
			}(),
			work: Work{LRPs: lrps("app", 0, 1, 256)},
			check: func(t *testing.T, plan Plan) {
				if len(plan.FailedLRPs) != 1 || plan.FailedLRPs[0].Reason != ReasonContainers {
					t.Errorf("failures %+v, want %q", plan.FailedLRPs, ReasonContainers)
				}
			},
		},
		{
			name: "placement tags and evacuation",
			cells: func() []Cell {
				a, b, c := cell("a", "z1", 4096), cell("b", "z1", 4096), cell("c", "z1", 4096)
				b.Tags = []string{"gpu"}
				c.Tags = []string{"gpu"}
				c.Evacuating = true
				return []Cell{a, b, c}
			}(),
			work: Work{
				LRPs:  []LRP{{ProcessGUID: "app", Stack: "tiny", MemoryMB: 1, RequireTags: []string{"gpu"}}, {ProcessGUID: "x", Stack: "tiny", MemoryMB: 1, RequireTags: []string{"ssd"}}},
				Tasks: []Task{{GUID: "t", Stack: "tiny", MemoryMB: 1, RequireTags: []string{"gpu"}}},
			},
			check: func(t *testing.T, plan Plan) {
				if len(plan.LRPs) != 1 || plan.LRPs[0].CellID != "b" || len(plan.Tasks) != 1 || plan.Tasks[0].CellID != "b" {
					t.Errorf("placements %+v %+v, want both on b", plan.LRPs, plan.Tasks)
				}
				if len(plan.FailedLRPs) != 1 || plan.FailedLRPs[0].Reason != "no cell with placement tags [ssd]" {
					t.Errorf("failures %+v", plan.FailedLRPs)
				}
			},
		},
		{
			name: "all candidates evacuating",
			cells: func() []Cell {
				a := cell("a", "z1", 4096)
				a.Evacuating = true
				return []Cell{a}
			}(),
			work: Work{LRPs: lrps("app", 0, 1, 1)},
			check: func(t *testing.T, plan Plan) {
				if len(plan.FailedLRPs) != 1 || plan.FailedLRPs[0].Reason != ReasonEvacuating {
					t.Errorf("failures %+v", plan.FailedLRPs)
				}
			},
		},
		{
			name:  "no cells",
			work:  Work{LRPs: lrps("app", 0, 1, 1), Tasks: []Task{{GUID: "t", Stack: "tiny"}}},
			check: func(t *testing.T, plan Plan) {},
		},
		{
			name:  "priority: index 0, then tasks, then higher indices, larger memory first",
			cells: []Cell{cell("a", "z1", 1024)},
			work: Work{
				LRPs:  append(lrps("small", 0, 2, 256), lrps("big", 0, 2, 512)...),
				Tasks: []Task{{GUID: "t", Stack: "tiny", MemoryMB: 256}},
			},
			check: func(t *testing.T, plan Plan) {
				// 1024 MB: big/0 (512) + small/0 (256) + task (256); the rest fails.
				if len(plan.LRPs) != 2 || len(plan.Tasks) != 1 {
					t.Fatalf("placed %+v and %+v", plan.LRPs, plan.Tasks)
				}
				if plan.LRPs[0].LRP.ProcessGUID != "big" || plan.LRPs[1].LRP.ProcessGUID != "small" {
					t.Errorf("order %+v, want big/0 then small/0", plan.LRPs)
				}
			},
		},
		{
			name: "least loaded first",
			cells: func() []Cell {
				a, b := cell("a", "z1", 4096), cell("b", "z1", 4096)
				a.Available.MemoryMB = 1024
				return []Cell{a, b}
			}(),
			work: Work{LRPs: lrps("app", 0, 1, 256)},
			check: func(t *testing.T, plan Plan) {
				if plan.LRPs[0].CellID != "b" {
					t.Errorf("placed on %s, want the emptier b", plan.LRPs[0].CellID)
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := fmt.Sprint(tt.cells)
			plan := Place(tt.cells, tt.work)
			if after := fmt.Sprint(tt.cells); after != before {
				t.Errorf("Place changed its input cells")
			}
			checkInvariants(t, tt.cells, tt.work, plan)
			tt.check(t, plan)
		})
	}
}

// TestSimulation places many LRPs of random sizes on random cells in random
// batches, as the auctioneer does, carrying each plan into the next batch's
// cell states. Invariants: no over-fill, and while there is room every LRP's
// per-zone counts and (zones being of equal size) per-cell counts differ by
// at most one.
func TestSimulation(t *testing.T) {
	for seed := range uint64(5) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			r := rand.New(rand.NewPCG(seed, 42))
			ncells := 3 * (1 + r.IntN(8))
			var cells []Cell
			for i := range ncells {
				cells = append(cells, cell(fmt.Sprintf("c%02d", i), fmt.Sprintf("z%d", i%3), 64*1024))
			}
			var queue []LRP
			for a := range 30 {
				n := int32(1 + r.IntN(3*ncells))
				queue = append(queue, lrps(fmt.Sprintf("app%02d", a), 0, n, int64(64*(1+r.IntN(4))))...)
			}
			r.Shuffle(len(queue), func(i, j int) { queue[i], queue[j] = queue[j], queue[i] })
			for len(queue) > 0 {
				n := min(len(queue), 1+r.IntN(200))
				work := Work{LRPs: queue[:n]}
				queue = queue[n:]
				plan := Place(cells, work)
				checkInvariants(t, cells, work, plan)
				if len(plan.FailedLRPs) > 0 {
					t.Fatalf("failed with room to spare: %+v", plan.FailedLRPs[0])
				}
				cells = apply(cells, plan)
			}
			apps := map[string]bool{}
			for _, c := range cells {
				for g := range c.Instances {
					apps[g] = true
				}
			}
			for g := range apps {
				n, z := map[string]int{}, map[string]int{}
				for _, c := range cells {
					n[c.ID] = c.Instances[g]
					z[c.Zone] += c.Instances[g]
				}
				if d := spread(n); d > 1 {
					t.Errorf("%s: per-cell counts differ by %d: %v", g, d, n)
				}
				if d := spread(z); d > 1 {
					t.Errorf("%s: per-zone counts differ by %d: %v", g, d, z)
				}
			}
		})
	}
}

// apply is what the cells report after taking the plan's work.
func apply(cells []Cell, plan Plan) []Cell {
	out := make([]Cell, len(cells))
	idx := map[string]int{}
	for i, c := range cells {
		c.Instances = maps(c.Instances)
		out[i] = c
		idx[c.ID] = i
	}
	for _, p := range plan.LRPs {
		c := &out[idx[p.CellID]]
		c.Available.MemoryMB -= p.LRP.MemoryMB
		c.Available.DiskMB -= p.LRP.DiskMB
		c.Available.Containers--
		c.Instances[p.LRP.ProcessGUID]++
	}
	return out
}

func maps(m map[string]int) map[string]int {
	out := make(map[string]int, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

func BenchmarkPlace(b *testing.B) {
	var cells []Cell
	for i := range 1000 {
		cells = append(cells, cell(fmt.Sprintf("c%04d", i), fmt.Sprintf("z%d", i%3), 256*1024))
	}
	var work Work
	for a := range 10 {
		work.LRPs = append(work.LRPs, lrps(fmt.Sprintf("app%d", a), 0, 100, 128)...)
	}
	b.ResetTimer()
	for b.Loop() {
		Place(cells, work)
	}
	b.ReportMetric(float64(len(work.LRPs))*float64(b.N)/b.Elapsed().Seconds(), "placements/s")
}
