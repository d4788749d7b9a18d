// Package placement decides where work runs. Place is a pure function: a
// snapshot of cells and a batch of work in, a plan out, with no I/O and no
// clock, so it can be tested alone and simulated at any scale.
package placement

import (
	"cmp"
	"fmt"
	"slices"
	"strings"
)

// Resources is what one instance or task needs, or what a cell has.
type Resources struct {
	MemoryMB   int64
	DiskMB     int64
	Containers int32
}

// Cell is the auction's copy of one cell's state. Place changes its own copy
// as it places work, never the caller's.
type Cell struct {
	ID         string
	Zone       string
	Stacks     []string
	Tags       []string
	Evacuating bool
	// Total is the cell's capacity; Available what is left after its allocations.
	Total     Resources
	Available Resources
	// Instances counts, per process guid, the instances the cell already holds.
	Instances map[string]int
}

// LRP is one instance to place.
type LRP struct {
	ProcessGUID string
	Domain      string
	Index       int32
	Stack       string
	MemoryMB    int64
	DiskMB      int64
	RequireTags []string
}

// Task is one task to place.
type Task struct {
	GUID        string
	Stack       string
	MemoryMB    int64
	DiskMB      int64
	RequireTags []string
}

// Needs is what the instance takes from a cell.
func (l LRP) Needs() Resources {
	return Resources{MemoryMB: l.MemoryMB, DiskMB: l.DiskMB, Containers: 1}
}

// Needs is what the task takes from a cell.
func (t Task) Needs() Resources {
	return Resources{MemoryMB: t.MemoryMB, DiskMB: t.DiskMB, Containers: 1}
}

// Allocate takes need from the cell and, for an LRP's instance (guid not
// empty), counts it. Place does this on its own copies; callers that keep
// cells between auctions do it to carry a plan over.
func (c *Cell) Allocate(need Resources, guid string) {
	c.Available.MemoryMB -= need.MemoryMB
	c.Available.DiskMB -= need.DiskMB
	c.Available.Containers -= need.Containers
	if guid == "" {
		return
	}
	if c.Instances == nil {
		c.Instances = make(map[string]int)
	}
	c.Instances[guid]++
}

// Work is one batch.
type Work struct {
	LRPs  []LRP
	Tasks []Task
}

// LRPPlacement puts an instance on a cell.
type LRPPlacement struct {
	LRP    LRP
	CellID string
}

// TaskPlacement puts a task on a cell.
type TaskPlacement struct {
	Task   Task
	CellID string
}

// LRPFailure says why no cell can take an instance.
type LRPFailure struct {
	LRP    LRP
	Reason string
}

// TaskFailure says why no cell can take a task.
type TaskFailure struct {
	Task   Task
	Reason string
}

// Plan is the outcome of one auction.
type Plan struct {
	LRPs        []LRPPlacement
	Tasks       []TaskPlacement
	FailedLRPs  []LRPFailure
	FailedTasks []TaskFailure
}

// Failure reasons; the CLI shows them as they are.
const (
	ReasonMemory     = "insufficient resources: memory"
	ReasonDisk       = "insufficient resources: disk"
	ReasonContainers = "insufficient resources: containers"
	ReasonNoCells    = "no cells available"
	ReasonEvacuating = "no cell available: all candidate cells are evacuating"
)

// ReasonStack is the failure of work whose stack no cell has.
func ReasonStack(stack string) string { return "no cell with stack " + stack }

// ReasonTags is the failure of work whose placement tags no cell has.
func ReasonTags(tags []string) string {
	return fmt.Sprintf("no cell with placement tags [%s]", strings.Join(tags, " "))
}

// Place assigns each item of work to a cell, or says why it cannot. Priority
// is Diego's: index-0 instances first (every app gets one instance before any
// gets more), then tasks, then higher indices; within each, larger memory
// first (big items are harder to fit later). Filters (stack, tags,
// evacuation, fit) come first, then the score: fewest instances of the same
// LRP in the cell's zone, then on the cell, then the least-loaded cell. Each
// placement updates the batch's copy of the cell, so a batch never over-fills
// one.
func Place(cells []Cell, work Work) Plan {
	st := newState(cells)
	type item struct {
		lrp  *LRP
		task *Task
		mem  int64
	}
	var items []item
	for i := range work.LRPs {
		items = append(items, item{lrp: &work.LRPs[i], mem: work.LRPs[i].MemoryMB})
	}
	for i := range work.Tasks {
		items = append(items, item{task: &work.Tasks[i], mem: work.Tasks[i].MemoryMB})
	}
	rank := func(it item) int {
		switch {
		case it.lrp != nil && it.lrp.Index == 0:
			return 0
		case it.task != nil:
			return 1
		}
		return 2
	}
	slices.SortStableFunc(items, func(a, b item) int {
		if c := cmp.Compare(rank(a), rank(b)); c != 0 {
			return c
		}
		if c := cmp.Compare(b.mem, a.mem); c != 0 {
			return c
		}
		// Lower indices first, so a partial batch fills the low slots.
		if a.lrp != nil && b.lrp != nil {
			if c := cmp.Compare(a.lrp.Index, b.lrp.Index); c != 0 {
				return c
			}
			return cmp.Compare(a.lrp.ProcessGUID, b.lrp.ProcessGUID)
		}
		return 0
	})

	var plan Plan
	for _, it := range items {
		if it.lrp != nil {
			l := *it.lrp
			need := l.Needs()
			i, reason := st.choose(l.Stack, l.RequireTags, need, l.ProcessGUID)
			if i < 0 {
				plan.FailedLRPs = append(plan.FailedLRPs, LRPFailure{LRP: l, Reason: reason})
				continue
			}
			st.allocate(i, need, l.ProcessGUID)
			plan.LRPs = append(plan.LRPs, LRPPlacement{LRP: l, CellID: st.cells[i].ID})
			continue
		}
		t := *it.task
		need := t.Needs()
		i, reason := st.choose(t.Stack, t.RequireTags, need, "")
		if i < 0 {
			plan.FailedTasks = append(plan.FailedTasks, TaskFailure{Task: t, Reason: reason})
			continue
		}
		st.allocate(i, need, "")
		plan.Tasks = append(plan.Tasks, TaskPlacement{Task: t, CellID: st.cells[i].ID})
	}
	return plan
}

// state is the batch's copy of the cells. Placing is a scan over cells per
// item, so what does not change within a batch is worked out once: which
// cells pass the stack, tag and evacuation filters (per stack and tag set),
// each cell's zone as a number, and per LRP its instance counts by cell and
// by zone.
type state struct {
	cells  []*Cell
	zoneOf []int // cell position → zone number
	nzones int
	// candidates caches, per stack and tag set, the cells passing the
	// filters that do not depend on resources.
	candidates map[string][]int
	// perCell[guid][i] and perZone[guid][z] count an LRP's instances.
	perCell map[string][]int32
	perZone map[string][]int32
}

func newState(in []Cell) *state {
	st := &state{candidates: make(map[string][]int), perCell: make(map[string][]int32), perZone: make(map[string][]int32)}
	for _, c := range in {
		cp := c
		cp.Instances = make(map[string]int, len(c.Instances))
		for g, n := range c.Instances {
			cp.Instances[g] = n
		}
		st.cells = append(st.cells, &cp)
	}
	// A stable order makes ties (and so plans) deterministic.
	slices.SortFunc(st.cells, func(a, b *Cell) int { return cmp.Compare(a.ID, b.ID) })
	zones := make(map[string]int)
	for _, c := range st.cells {
		z, ok := zones[c.Zone]
		if !ok {
			z = len(zones)
			zones[c.Zone] = z
		}
		st.zoneOf = append(st.zoneOf, z)
	}
	st.nzones = len(zones)
	return st
}

// counts returns an LRP's instance counts by cell and by zone.
func (st *state) counts(guid string) (perCell, perZone []int32) {
	if pc, ok := st.perCell[guid]; ok {
		return pc, st.perZone[guid]
	}
	pc, pz := make([]int32, len(st.cells)), make([]int32, st.nzones)
	for i, c := range st.cells {
		n := int32(c.Instances[guid])
		pc[i] = n
		pz[st.zoneOf[i]] += n
	}
	st.perCell[guid], st.perZone[guid] = pc, pz
	return pc, pz
}

func (st *state) candidatesFor(stack string, tags []string) []int {
	key := stack + "\x00" + strings.Join(tags, "\x00")
	if c, ok := st.candidates[key]; ok {
		return c
	}
	var out []int
	for i, c := range st.cells {
		if slices.Contains(c.Stacks, stack) && hasAll(c.Tags, tags) && !c.Evacuating {
			out = append(out, i)
		}
	}
	st.candidates[key] = out
	return out
}

func (st *state) allocate(i int, need Resources, guid string) {
	st.cells[i].Allocate(need, guid)
	if guid == "" {
		return
	}
	pc, pz := st.counts(guid)
	pc[i]++
	pz[st.zoneOf[i]]++
}

// choose returns the position of the best cell for the work, or -1 and the
// reason none fits. The reason names the first filter every cell failed, in
// filter order.
func (st *state) choose(stack string, tags []string, need Resources, guid string) (int, string) {
	if len(st.cells) == 0 {
		return -1, ReasonNoCells
	}
	var pc, pz []int32
	if guid != "" {
		pc, pz = st.counts(guid)
	}
	best := -1
	var bestZone, bestCell int32
	var bestLoad float64
	for _, i := range st.candidatesFor(stack, tags) {
		c := st.cells[i]
		if c.Available.MemoryMB < need.MemoryMB || c.Available.DiskMB < need.DiskMB || c.Available.Containers < need.Containers {
			continue
		}
		var zone, onCell int32
		if pc != nil {
			zone, onCell = pz[st.zoneOf[i]], pc[i]
		}
		if best >= 0 && (zone > bestZone || (zone == bestZone && onCell > bestCell)) {
			continue
		}
		load := Load(c)
		if best < 0 || zone < bestZone || onCell < bestCell || load < bestLoad {
			best, bestZone, bestCell, bestLoad = i, zone, onCell, load
		}
	}
	if best >= 0 {
		return best, ""
	}
	return -1, st.reason(stack, tags, need)
}

// reason explains why no cell takes the work; only failures pay for it.
func (st *state) reason(stack string, tags []string, need Resources) string {
	var stackOK, tagsOK, notEvac, mem, disk bool
	for _, c := range st.cells {
		if !slices.Contains(c.Stacks, stack) {
			continue
		}
		stackOK = true
		if !hasAll(c.Tags, tags) {
			continue
		}
		tagsOK = true
		if c.Evacuating {
			continue
		}
		notEvac = true
		if c.Available.MemoryMB < need.MemoryMB {
			continue
		}
		mem = true
		if c.Available.DiskMB < need.DiskMB {
			continue
		}
		disk = true
	}
	switch {
	case !stackOK:
		return ReasonStack(stack)
	case !tagsOK:
		return ReasonTags(tags)
	case !notEvac:
		return ReasonEvacuating
	case !mem:
		return ReasonMemory
	case !disk:
		return ReasonDisk
	}
	return ReasonContainers
}

// Load is how full a cell is, in [0, 1]: the mean of the used fractions of
// memory, disk and containers. A resource the cell reports no total for
// counts as full, so such a cell is chosen last.
func Load(c *Cell) float64 {
	frac := func(avail, total int64) float64 {
		if total <= 0 {
			return 1
		}
		used := float64(total-avail) / float64(total)
		return min(max(used, 0), 1)
	}
	return (frac(c.Available.MemoryMB, c.Total.MemoryMB) +
		frac(c.Available.DiskMB, c.Total.DiskMB) +
		frac(int64(c.Available.Containers), int64(c.Total.Containers))) / 3
}

func hasAll(have, want []string) bool {
	for _, w := range want {
		if !slices.Contains(have, w) {
			return false
		}
	}
	return true
}
