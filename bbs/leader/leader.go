// Package leader elects one replica of a component (auctioneer, converger)
// through etcd and hands it the fence its BBS writes must carry. The fence is
// the real guarantee (an etcd lock alone cannot ensure exclusion); this
// package only makes a replica stop acting as soon as it can tell its
// leadership is gone.
package leader

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"time"

	"github.com/basinpaas/basin/bbs"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
)

// Config configures an election.
type Config struct {
	// Component names the election: leaders/<component>.
	Component string
	Keys      bbs.Keys
	// ID is this replica's election value, e.g. its address.
	ID string
	// TTL of the session lease: how long a dead leader blocks its standbys.
	// Whole seconds, at least one; 3 s when zero.
	TTL time.Duration
	// RetryDelay between campaigns after an error; 500 ms when zero.
	RetryDelay time.Duration
	Logger     *slog.Logger
}

// Run campaigns until ctx ends. While this replica leads, lead runs with a
// context that ends as soon as the leadership is lost (the session lease
// expired or the election key was deleted) and with the fence for every BBS
// write. When lead returns, the replica resigns and campaigns again, so a
// leader that hit an error hands over to a standby.
func Run(ctx context.Context, cli *clientv3.Client, cfg Config, lead func(ctx context.Context, fence *basinv1.Fence) error) error {
	if cfg.TTL <= 0 {
		cfg.TTL = 3 * time.Second
	}
	if cfg.RetryDelay <= 0 {
		cfg.RetryDelay = 500 * time.Millisecond
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	ttl := int(math.Ceil(cfg.TTL.Seconds()))
	key := cfg.Keys.Leader(cfg.Component)
	for {
		err := term(ctx, cli, key, ttl, cfg, lead)
		if ctx.Err() != nil {
			return nil
		}
		if err != nil {
			cfg.Logger.Warn("leadership ended", "election", cfg.Component, "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(cfg.RetryDelay):
		}
	}
}

// term is one session: campaign, lead, resign.
func term(ctx context.Context, cli *clientv3.Client, key string, ttl int, cfg Config, lead func(context.Context, *basinv1.Fence) error) error {
	// The session outlives ctx briefly so that a clean shutdown can resign
	// and hand over at once rather than after the lease's TTL.
	sctx, scancel := context.WithCancel(context.WithoutCancel(ctx))
	defer scancel()
	sess, err := concurrency.NewSession(cli, concurrency.WithTTL(ttl), concurrency.WithContext(sctx))
	if err != nil {
		return fmt.Errorf("open election session: %w", err)
	}
	defer func() {
		// Revoking hands over at once; bounded, as a dead connection would
		// otherwise hold shutdown for the whole TTL.
		sess.Orphan()
		rctx, rcancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		defer rcancel()
		cli.Revoke(rctx, sess.Lease())
	}()
	e := concurrency.NewElection(sess, key)

	// A session that dies while campaigning would otherwise leave Campaign
	// waiting on a key it no longer owns.
	cctx, ccancel := context.WithCancel(ctx)
	stop := context.AfterFunc(ctx, ccancel)
	go func() {
		select {
		case <-sess.Done():
			ccancel()
		case <-cctx.Done():
		}
	}()
	err = e.Campaign(cctx, cfg.ID)
	ccancel()
	stop()
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("campaign for %s: %w", key, err)
	}
	fence := &basinv1.Fence{Key: e.Key(), CreateRevision: e.Rev()}
	log := cfg.Logger.With("election_key", fence.Key, "revision", fence.CreateRevision)
	log.Info("elected leader")

	lctx, lcancel := context.WithCancel(ctx)
	defer lcancel()
	lost := make(chan struct{})
	go func() {
		defer close(lost)
		if why := watchLoss(lctx, cli, sess, fence); why != "" {
			log.Warn("leadership lost", "why", why)
		}
		lcancel()
	}()
	err = lead(lctx, fence)
	lcancel()
	<-lost
	rctx, rcancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
	defer rcancel()
	if rerr := e.Resign(rctx); rerr != nil {
		log.Debug("resign", "err", rerr)
	}
	log.Info("no longer leader")
	return err
}

// watchLoss returns why the leadership is lost: the session's lease is gone
// or the election key was deleted (an operator forcing a new election). It
// returns "" when ctx ends first.
func watchLoss(ctx context.Context, cli *clientv3.Client, sess *concurrency.Session, fence *basinv1.Fence) string {
	wch := cli.Watch(clientv3.WithRequireLeader(ctx), fence.Key, clientv3.WithRev(fence.CreateRevision))
	for {
		select {
		case <-ctx.Done():
			return ""
		case <-sess.Done():
			return "session lease expired or could not be renewed"
		case resp, ok := <-wch:
			if ctx.Err() != nil {
				return ""
			}
			// Without the watch this replica cannot tell whether it still
			// leads: step down rather than risk acting.
			if !ok {
				return "watch on the election key ended"
			}
			if err := resp.Err(); err != nil {
				return fmt.Sprintf("watch on the election key failed: %v", err)
			}
			for _, ev := range resp.Events {
				if ev.Type == clientv3.EventTypeDelete {
					return "election key deleted"
				}
			}
		}
	}
}
