package rep

import (
	"context"
	"fmt"
	"time"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

// followSchedules keeps the routes of running instances in step with their
// desired LRP: a route mapped or unmapped through UpdateDesiredLRP is written
// or removed at once, without restarting anything. It follows, on the BBS's
// WatchSchedules stream, exactly the LRPs this cell runs, each from the
// revision of the schedule its instances hold, so the BBS sends anything
// newer at once and every later change as it happens; a cell no longer
// receives every other LRP's changes, as an etcd watch on all schedules
// made it. When the stream ends it opens another and follows everything
// again from the revisions it holds, so nothing is missed across a BBS
// restart.
//
// Instances follow once their schedule is read (lrpSpec, adoption). A change
// the BBS sent before an instance existed is not lost: the instance's claim
// comes after it, and its read is as of the claim or later.
func (r *Rep) followSchedules(ctx context.Context) error {
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		began := time.Now()
		err := r.followOnce(ctx)
		if ctx.Err() != nil {
			break
		}
		if time.Since(began) > time.Minute {
			backoff = 100 * time.Millisecond
		}
		r.log.Info("schedule stream ended; following again", "err", err, "in", backoff)
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
	return nil
}

// followOnce runs one stream: a goroutine sends what to follow while this
// one applies the changes that come back.
func (r *Rep) followOnce(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := r.bbs.WatchSchedules(ctx)
	if err != nil {
		return fmt.Errorf("open schedule stream: %w", err)
	}
	sent := make(chan error, 1)
	go func() {
		err := r.sendFollows(ctx, stream)
		cancel() // a failed send ends the stream, and Recv with it
		sent <- err
	}()
	for {
		resp, err := stream.Recv()
		if err != nil {
			cancel()
			if serr := <-sent; serr != nil && ctx.Err() == nil {
				return fmt.Errorf("send follows: %w", serr)
			}
			return fmt.Errorf("receive schedules: %w", err)
		}
		for _, c := range resp.GetChanges() {
			r.applySchedule(ctx, c.GetSchedule().GetProcessGuid(), c.GetSchedule(), c.GetRevision())
		}
	}
}

// maxFollowsPerMessage is the BBS's bound on one WatchSchedules message.
const maxFollowsPerMessage = 1000

// sendFollows follows each LRP this cell runs once: everything it holds
// when the stream opens, then what instances note as they read their
// schedules, and at every followSweep everything again, unfollowing the
// LRPs it no longer runs.
func (r *Rep) sendFollows(ctx context.Context, stream basinv1.BBSService_WatchSchedulesClient) error {
	const followSweep = 5 * time.Second
	sweep := time.NewTicker(followSweep)
	defer sweep.Stop()
	following := make(map[string]bool)
	want, all := r.heldSchedules(), true
	for {
		var follow []*basinv1.ScheduleInterest
		var unfollow []string
		for guid, rev := range want {
			if !following[guid] {
				following[guid] = true
				follow = append(follow, &basinv1.ScheduleInterest{ProcessGuid: guid, Revision: rev})
			}
		}
		for guid := range following {
			if _, ok := want[guid]; all && !ok {
				delete(following, guid)
				unfollow = append(unfollow, guid)
			}
		}
		for len(follow) > 0 || len(unfollow) > 0 {
			req := &basinv1.WatchSchedulesRequest{}
			n := min(len(follow), maxFollowsPerMessage)
			req.Follow, follow = follow[:n], follow[n:]
			n = min(len(unfollow), maxFollowsPerMessage)
			req.Unfollow, unfollow = unfollow[:n], unfollow[n:]
			if err := stream.Send(req); err != nil {
				return err
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-r.scheduleNoted:
			// Instances starting together note their schedules together:
			// gather them into one message.
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(followGather):
			}
			want, all = r.takeNoted(), false
		case <-sweep.C:
			want, all = r.heldSchedules(), true
		}
	}
}

// heldSchedules is, per LRP this cell runs, the oldest schedule revision
// its instances hold; instances whose schedule is not read yet do not count.
func (r *Rep) heldSchedules() map[string]int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	clear(r.noted) // all of them are in what this returns
	out := make(map[string]int64)
	for _, l := range r.lrps {
		if l.schedRev == 0 {
			continue
		}
		guid := l.key.GetProcessGuid()
		if rev, ok := out[guid]; !ok || l.schedRev < rev {
			out[guid] = l.schedRev
		}
	}
	return out
}

// notedSchedule tells sendFollows an instance of guid read its schedule at
// rev.
func (r *Rep) notedSchedule(guid string, rev int64) {
	r.mu.Lock()
	if old, ok := r.noted[guid]; !ok || rev < old {
		r.noted[guid] = rev
	}
	r.mu.Unlock()
	select {
	case r.scheduleNoted <- struct{}{}:
	default:
	}
}

// takeNoted returns the schedules noted since the last look.
func (r *Rep) takeNoted() map[string]int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := r.noted
	r.noted = make(map[string]int64)
	return out
}

// followGather is how long a noted schedule waits for others before it is
// followed; a change meanwhile is not lost (see followSchedules).
const followGather = 100 * time.Millisecond
