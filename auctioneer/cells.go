package auctioneer

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/basinpaas/basin/auctioneer/placement"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"
)

// snapshot is the cells that answered State in time.
type snapshot struct {
	cells []placement.Cell
	addrs map[string]string
}

// cellCache keeps the cells' State answers between the auctions of one
// term. Asking every cell for its State costs an RPC per cell per auction:
// work arriving as a stream (a large desire, a fleet-wide scale) makes many
// small auctions, and that cost, not placement, would set the pace. An
// answer serves later auctions for up to maxAge with what they placed on
// the cell taken off. Only the leader places work, so the cached figure
// never overstates what is free; cells free resources on their own, which
// the next fetch sees. A cell is asked again when its presence key changes
// (evacuation, new capacity, a restart), when it turns work down or a
// Perform fails, and once its answer is maxAge old.
type cellCache struct {
	maxAge time.Duration
	now    func() time.Time
	fetch  func(context.Context, *basinv1.CellPresence) (placement.Cell, error)
	// fetched is told of every State call's outcome.
	fetched func(error)
	cells   map[string]*cachedCell
}

type cachedCell struct {
	cell        placement.Cell
	addr        string
	presenceRev int64
	at          time.Time
}

// presence is a cell's presence key as listed from etcd.
type presence struct {
	p   *basinv1.CellPresence
	rev int64
}

// snapshot returns the state of every present cell, from the cache where it
// is fresh and from State calls (in parallel, at most 256 at once) where it
// is not. Cells gone from etcd leave the cache.
func (c *cellCache) snapshot(ctx context.Context, present []presence) snapshot {
	now := c.now()
	snap := snapshot{addrs: make(map[string]string, len(present))}
	seen := make(map[string]bool, len(present))
	var stale []presence
	for _, pr := range present {
		id := pr.p.GetCellId()
		seen[id] = true
		if e := c.cells[id]; e != nil && e.presenceRev == pr.rev && now.Sub(e.at) < c.maxAge {
			snap.cells = append(snap.cells, e.cell)
			snap.addrs[id] = e.addr
			continue
		}
		stale = append(stale, pr)
	}
	for id := range c.cells {
		if !seen[id] {
			delete(c.cells, id)
		}
	}
	var mu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, 256)
	for _, pr := range stale {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			st, err := c.fetch(ctx, pr.p)
			mu.Lock()
			defer mu.Unlock()
			c.fetched(err)
			if err != nil {
				delete(c.cells, pr.p.GetCellId())
				return
			}
			c.cells[st.ID] = &cachedCell{cell: st, addr: pr.p.GetRepAddress(), presenceRev: pr.rev, at: now}
			snap.cells = append(snap.cells, st)
			snap.addrs[st.ID] = pr.p.GetRepAddress()
		})
	}
	wg.Wait()
	return snap
}

// placed carries a plan over to the cached cells.
func (c *cellCache) placed(plan placement.Plan) {
	for _, p := range plan.LRPs {
		if e := c.cells[p.CellID]; e != nil {
			e.cell.Allocate(p.LRP.Needs(), p.LRP.ProcessGUID)
		}
	}
	for _, p := range plan.Tasks {
		if e := c.cells[p.CellID]; e != nil {
			e.cell.Allocate(p.Task.Needs(), "")
		}
	}
}

// forget makes the next auction ask the cell again.
func (c *cellCache) forget(cellID string) { delete(c.cells, cellID) }

// presences lists the cells' presence keys.
func (a *Auctioneer) presences(ctx context.Context) ([]presence, error) {
	resp, err := a.etcd.Get(ctx, a.keys.CellPrefix(), clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("list cells: %w", err)
	}
	out := make([]presence, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		p := &basinv1.CellPresence{}
		if err := proto.Unmarshal(kv.Value, p); err != nil {
			a.log.Warn("decode cell presence", "key", string(kv.Key), "err", err)
			continue
		}
		out = append(out, presence{p: p, rev: kv.ModRevision})
	}
	return out, nil
}
func (a *Auctioneer) state(ctx context.Context, p *basinv1.CellPresence) (placement.Cell, error) {
	conn, err := a.conn(p.GetRepAddress())
	if err != nil {
		return placement.Cell{}, err
	}
	sctx, cancel := context.WithTimeout(ctx, a.cfg.CellStateTimeout)
	defer cancel()
	st, err := basinv1.NewCellServiceClient(conn).State(sctx, &basinv1.StateRequest{})
	if err != nil {
		return placement.Cell{}, fmt.Errorf("state of cell %s at %s: %w", p.GetCellId(), p.GetRepAddress(), err)
	}
	// The cell's own answer is fresher than its presence key.
	if sp := st.GetPresence(); sp != nil {
		p = sp
	}
	c := placement.Cell{
		ID: p.GetCellId(), Zone: p.GetZone(), Stacks: p.GetStacks(), Tags: p.GetPlacementTags(), Evacuating: p.GetEvacuating(),
		Total: placement.Resources{
			MemoryMB: p.GetCapacity().GetMemoryMb(), DiskMB: p.GetCapacity().GetDiskMb(), Containers: p.GetCapacity().GetContainers(),
		},
		Available: placement.Resources{
			MemoryMB: st.GetAvailable().GetMemoryMb(), DiskMB: st.GetAvailable().GetDiskMb(), Containers: st.GetAvailable().GetContainers(),
		},
		Instances: make(map[string]int),
	}
	for _, l := range st.GetLrps() {
		c.Instances[l.GetProcessGuid()]++
	}
	return c, nil
}
