package routetable

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

// Syncer keeps a Table equal to the routes under an etcd prefix: it lists,
// then watches from the listed revision + 1, and lists again whenever the
// watch is compacted away or breaks, so no change is missed or left stale.
type Syncer struct {
	table  *Table
	client *clientv3.Client
	prefix string
	log    *slog.Logger

	synced   chan struct{}
	syncedOK atomic.Bool
	relists  atomic.Int64
	retry    time.Duration

	// afterList runs between a list and its watch; tests use it to change
	// and compact etcd in that gap.
	afterList func(ctx context.Context, rev int64)
}

// NewSyncer feeds table from the keys under prefix (e.g. bbs.Keys.RoutePrefix()).
func NewSyncer(table *Table, client *clientv3.Client, prefix string, log *slog.Logger) *Syncer {
	return &Syncer{table: table, client: client, prefix: prefix, log: log, synced: make(chan struct{}), retry: 500 * time.Millisecond}
}

// Synced is closed once the first list has been applied.
func (s *Syncer) Synced() <-chan struct{} { return s.synced }

// Relists counts the full lists done, the first included.
func (s *Syncer) Relists() int64 { return s.relists.Load() }

// Run syncs until ctx is done; it returns nil then.
func (s *Syncer) Run(ctx context.Context) error {
	wait := s.retry
	for {
		before := s.relists.Load()
		err := s.syncOnce(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if s.relists.Load() != before {
			wait = s.retry // the list worked: the watch broke, retry soon
		} else {
			wait = min(2*wait, 5*time.Second) // etcd unreachable: back off
		}
		s.log.Warn("route watch broke; listing again", "prefix", s.prefix, "in", wait, "err", err)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
	}
}

// syncOnce lists and watches until the watch ends; it always returns an error
// saying why (or ctx's).
func (s *Syncer) syncOnce(ctx context.Context) error {
	resp, err := s.client.Get(ctx, s.prefix, clientv3.WithPrefix())
	if err != nil {
		return fmt.Errorf("list routes under %s: %w", s.prefix, err)
	}
	all := make([]*Endpoint, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		if e := s.decode(kv.Key, kv.Value); e != nil {
			all = append(all, e)
		}
	}
	s.table.Replace(all)
	s.relists.Add(1)
	if s.syncedOK.CompareAndSwap(false, true) {
		close(s.synced)
	}

	if s.afterList != nil {
		s.afterList(ctx, resp.Header.Revision)
	}

	// The watch has its own ctx so leaving this function always cancels it.
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	wch := s.client.Watch(wctx, s.prefix, clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1))
	var changes []Change
	for wr := range wch {
		if wr.CompactRevision != 0 {
			return fmt.Errorf("watch routes under %s: compacted at %d: %w", s.prefix, wr.CompactRevision, wr.Err())
		}
		if err := wr.Err(); err != nil {
			return fmt.Errorf("watch routes under %s: %w", s.prefix, err)
		}
		changes = changes[:0]
		for _, ev := range wr.Events {
			c := Change{Key: string(ev.Kv.Key)}
			if ev.Type == clientv3.EventTypePut {
				// A value that does not decode removes the key: better no
				// route than one to a wrong place.
				c.Endpoint = s.decode(ev.Kv.Key, ev.Kv.Value)
			}
			changes = append(changes, c)
		}
		if len(changes) > 0 {
			s.table.Apply(changes)
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return errors.New("watch routes: channel closed")
}

func (s *Syncer) decode(key, value []byte) *Endpoint {
	e, err := DecodeEndpoint(value)
	if err != nil {
		s.log.Warn("skipping route", "key", string(key), "err", err)
		return nil
	}
	e.Key = string(key)
	return e
}

// DecodeEndpoint turns a stored basinv1.RouteEndpoint into an Endpoint.
func DecodeEndpoint(value []byte) (*Endpoint, error) {
	var re basinv1.RouteEndpoint
	if err := proto.Unmarshal(value, &re); err != nil {
		return nil, fmt.Errorf("decode route endpoint: %w", err)
	}
	if re.GetHost() == "" || re.GetAddress() == "" || re.GetPort() == 0 || re.GetPort() > 65535 {
		return nil, fmt.Errorf("route endpoint %q -> %s:%d: host, address and port are required", re.GetHost(), re.GetAddress(), re.GetPort())
	}
	return &Endpoint{
		Host:         re.GetHost(),
		Path:         re.GetPath(),
		ProcessGUID:  re.GetProcessGuid(),
		Index:        re.GetIndex(),
		InstanceGUID: re.GetInstanceGuid(),
		Addr:         net.JoinHostPort(re.GetAddress(), strconv.Itoa(int(re.GetPort()))),
		Tags:         re.GetTags(),
	}, nil
}
