// Package routetable keeps the router's map from host name (and context
// path) to the pool of app instances that serve it.
//
// Reads happen on every request and must never wait for an update, so each
// host's routes are an immutable value swapped atomically (copy-on-write per
// host): a change to one host copies only that host's pools, which keeps a
// 100,000-route table cheap to update 1,000 times a second.
package routetable

import (
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Endpoint is one app instance behind a route. Its identity fields never
// change after it enters the table; the balancing state is atomic because
// every request goroutine touches it.
type Endpoint struct {
	Key          string // the etcd key it came from
	Host         string // the route host as registered, e.g. "*.apps.example.com"
	Path         string // context path without trailing slash; "" for the whole host
	ProcessGUID  string
	Index        int32
	InstanceGUID string
	Addr         string // host:port to dial
	Tags         map[string]string

	active       atomic.Int64
	suspectUntil atomic.Int64 // unix nanoseconds
}

// Acquire counts a request in flight, for least-connections balancing.
func (e *Endpoint) Acquire() { e.active.Add(1) }

// Release ends what Acquire started.
func (e *Endpoint) Release() { e.active.Add(-1) }

// Active is the number of requests in flight to the endpoint.
func (e *Endpoint) Active() int64 { return e.active.Load() }

// MarkSuspect keeps the endpoint out of balancing until the given time,
// after a failed connection, so the next requests do not pay for it too.
func (e *Endpoint) MarkSuspect(until time.Time) { e.suspectUntil.Store(until.UnixNano()) }

// Suspect reports whether the endpoint failed recently.
func (e *Endpoint) Suspect(now time.Time) bool { return e.suspectUntil.Load() > now.UnixNano() }

// sameAs reports whether two endpoints route identically, so a re-list or a
// repeated put keeps the existing value and its balancing state.
func (e *Endpoint) sameAs(o *Endpoint) bool {
	if e.Key != o.Key || e.Host != o.Host || e.Path != o.Path || e.ProcessGUID != o.ProcessGUID ||
		e.Index != o.Index || e.InstanceGUID != o.InstanceGUID || e.Addr != o.Addr || len(e.Tags) != len(o.Tags) {
		return false
	}
	for k, v := range e.Tags {
		if ov, ok := o.Tags[k]; !ok || ov != v {
			return false
		}
	}
	return true
}

// Pool is the set of endpoints for one host and context path. It is never
// modified after it is published.
type Pool struct {
	Host      string
	Path      string
	Endpoints []*Endpoint // sorted by key, so balancing is deterministic
	// Balancing is the route's own algorithm from its endpoints' tag
	// BalancingTag ("round-robin" or "least-connections"); "" means the
	// router's default.
	Balancing string
	next      *atomic.Uint64
}

// BalancingTag is the route endpoint tag that chooses a route's balancing
// algorithm, as Cloud Foundry's per-route loadbalancing option does.
const BalancingTag = "balancing"

// Next returns a counter value for round-robin; the counter survives
// updates of the pool so a route change does not reset the rotation.
func (p *Pool) Next() uint64 { return p.next.Add(1) - 1 }

// ByInstance returns the endpoint with the given instance guid, or nil.
func (p *Pool) ByInstance(instanceGUID string) *Endpoint {
	for _, e := range p.Endpoints {
		if e.InstanceGUID == instanceGUID {
			return e
		}
	}
	return nil
}

// ByProcessIndex returns the endpoint of instance index of process guid, or nil.
func (p *Pool) ByProcessIndex(guid string, index int32) *Endpoint {
	for _, e := range p.Endpoints {
		if e.ProcessGUID == guid && e.Index == index {
			return e
		}
	}
	return nil
}

// hostRoutes holds one host's pools, longest path first so the first match
// is the longest matching prefix.
type hostRoutes struct {
	pools []*Pool
}

func (h *hostRoutes) match(path string) *Pool {
	for _, p := range h.pools {
		if pathMatches(p.Path, path) {
			return p
		}
	}
	return nil
}

// pathMatches matches whole segments: "/api" serves "/api" and "/api/x" but
// not "/apix".
func pathMatches(prefix, path string) bool {
	if prefix == "" {
		return true
	}
	if !strings.HasPrefix(path, prefix) {
		return false
	}
	return len(path) == len(prefix) || path[len(prefix)] == '/'
}

// Change is one put (Endpoint set) or delete (Endpoint nil) of a route key.
type Change struct {
	Key      string
	Endpoint *Endpoint
}

// Table maps hosts to pools. Lookups are lock-free; updates are serialized
// by a mutex that readers never take.
type Table struct {
	exact    sync.Map // host -> *hostRoutes
	wildcard sync.Map // ".apps.example.com" (host of "*.apps.example.com" minus "*") -> *hostRoutes
	routes   atomic.Int64

	mu     sync.Mutex // serializes writers
	byKey  map[string]*Endpoint
	byHost map[string]*hostState // route host -> what the writer knows of it
}

// hostState is the writer's view of one host. Slices, not maps: most hosts
// have a handful of endpoints, and per-host maps cost most of the memory of
// a 100,000-route table.
type hostState struct {
	eps      []*Endpoint
	counters []pathCounter
}

type pathCounter struct {
	path string
	next *atomic.Uint64
}

func (h *hostState) remove(key string) {
	for i, e := range h.eps {
		if e.Key == key {
			last := len(h.eps) - 1
			h.eps[i] = h.eps[last]
			h.eps[last] = nil
			h.eps = h.eps[:last]
			return
		}
	}
}

func (h *hostState) counter(path string) *atomic.Uint64 {
	for _, c := range h.counters {
		if c.path == path {
			return c.next
		}
	}
	c := pathCounter{path: path, next: new(atomic.Uint64)}
	h.counters = append(h.counters, c)
	return c.next
}

// New returns an empty table.
func New() *Table {
	return &Table{
		byKey:  map[string]*Endpoint{},
		byHost: map[string]*hostState{},
	}
}

// Len is the number of route keys in the table.
func (t *Table) Len() int { return int(t.routes.Load()) }

// Lookup returns the pool for a request's host and path, or nil. host may
// carry a port and any case; an exact host wins over wildcards, and the
// most specific wildcard wins over broader ones.
func (t *Table) Lookup(host, path string) *Pool {
	host = NormalizeHost(host)
	if v, ok := t.exact.Load(host); ok {
		if p := v.(*hostRoutes).match(path); p != nil {
			return p
		}
	}
	for i := strings.IndexByte(host, '.'); i >= 0; {
		if v, ok := t.wildcard.Load(host[i:]); ok {
			if p := v.(*hostRoutes).match(path); p != nil {
				return p
			}
		}
		j := strings.IndexByte(host[i+1:], '.')
		if j < 0 {
			break
		}
		i += 1 + j
	}
	return nil
}

// NormalizeHost lowercases host and removes a port, allocating only when
// the host is not lowercase already.
func NormalizeHost(host string) string {
	if i := strings.LastIndexByte(host, ':'); i >= 0 && !strings.Contains(host[i:], "]") {
		host = host[:i]
	}
	host = strings.TrimSuffix(host, ".")
	for i := 0; i < len(host); i++ {
		if c := host[i]; c >= 'A' && c <= 'Z' {
			return strings.ToLower(host)
		}
	}
	return host
}

// NormalizePath turns a registered context path into the form matched:
// leading slash, no trailing slash, "" for the root.
func NormalizePath(p string) string {
	p = strings.TrimRight(p, "/")
	if p != "" && p[0] != '/' {
		p = "/" + p
	}
	return p
}

// Apply makes a batch of changes visible; each touched host is rebuilt once.
func (t *Table) Apply(changes []Change) {
	t.mu.Lock()
	defer t.mu.Unlock()
	dirty := map[string]struct{}{}
	for _, c := range changes {
		t.applyLocked(c, dirty)
	}
	t.publishLocked(dirty)
}

// Replace makes the table hold exactly the given endpoints, as after a
// re-list. Unchanged endpoints keep their balancing state.
func (t *Table) Replace(all []*Endpoint) {
	t.mu.Lock()
	defer t.mu.Unlock()
	dirty := map[string]struct{}{}
	seen := make(map[string]struct{}, len(all))
	for _, e := range all {
		seen[e.Key] = struct{}{}
		t.applyLocked(Change{Key: e.Key, Endpoint: e}, dirty)
	}
	for k := range t.byKey {
		if _, ok := seen[k]; !ok {
			t.applyLocked(Change{Key: k}, dirty)
		}
	}
	t.publishLocked(dirty)
}

func (t *Table) applyLocked(c Change, dirty map[string]struct{}) {
	old := t.byKey[c.Key]
	if c.Endpoint != nil && old != nil && old.sameAs(c.Endpoint) {
		return
	}
	if old != nil {
		delete(t.byKey, c.Key)
		if h := t.byHost[old.Host]; h != nil {
			h.remove(c.Key)
			if len(h.eps) == 0 {
				delete(t.byHost, old.Host)
			}
		}
		dirty[old.Host] = struct{}{}
		t.routes.Add(-1)
	}
	if e := c.Endpoint; e != nil {
		e.Key = c.Key
		e.Host = NormalizeHost(e.Host)
		e.Path = NormalizePath(e.Path)
		t.byKey[c.Key] = e
		h := t.byHost[e.Host]
		if h == nil {
			h = &hostState{}
			t.byHost[e.Host] = h
		}
		h.eps = append(h.eps, e)
		dirty[e.Host] = struct{}{}
		t.routes.Add(1)
	}
}

func (t *Table) publishLocked(dirty map[string]struct{}) {
	for host := range dirty {
		target, name := &t.exact, host
		if rest, ok := strings.CutPrefix(host, "*"); ok && strings.HasPrefix(rest, ".") {
			target, name = &t.wildcard, rest
		}
		h := t.byHost[host]
		if h == nil {
			target.Delete(name)
			continue
		}
		// Group by path in one sorted copy; the pools share it, read-only.
		list := make([]*Endpoint, len(h.eps))
		copy(list, h.eps)
		sort.Slice(list, func(i, j int) bool {
			if list[i].Path != list[j].Path {
				return list[i].Path < list[j].Path
			}
			return list[i].Key < list[j].Key
		})
		hr := &hostRoutes{}
		for i := 0; i < len(list); {
			j := i + 1
			for j < len(list) && list[j].Path == list[i].Path {
				j++
			}
			hr.pools = append(hr.pools, &Pool{Host: host, Path: list[i].Path, Endpoints: list[i:j:j],
				Balancing: balancingOf(list[i:j]), next: h.counter(list[i].Path)})
			i = j
		}
		sort.Slice(hr.pools, func(i, j int) bool { return len(hr.pools[i].Path) > len(hr.pools[j].Path) })
		target.Store(name, hr)
	}
}

// balancingOf is the balancing tag the endpoints carry; endpoints of one
// route are written alike, so the first one set wins.
func balancingOf(eps []*Endpoint) string {
	for _, e := range eps {
		if b := e.Tags[BalancingTag]; b != "" {
			return b
		}
	}
	return ""
}
