package bbs

import (
	"errors"
	"fmt"
	"io"
	"sync"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"google.golang.org/protobuf/proto"
)

// Bounds of one WatchSchedules stream.
const (
	maxFollowPerMessage = 1000
	maxFollowPerStream  = 10000
	followerBuffer      = 4096
)

// followers fans the desired view's schedule changes out to the
// WatchSchedules streams that follow each LRP. A cell that watched every
// schedule in etcd would receive every LRP's changes (a thousand cells, a
// thousand copies of each); here each change goes only to the cells that
// run the LRP.
//
// follow and publish take mu, and the view applies a change to its map
// before it publishes it, so a follow racing a change either sees the new
// schedule in the view (and sends it) or is registered before the change is
// published (and gets it then): nothing newer than the caller's revision is
// missed; at worst a schedule comes twice, which callers ignore by revision.
type followers struct {
	mu     sync.Mutex
	byGUID map[string]map[*follower]struct{}
}

// follower is one stream's registrations and outbox.
type follower struct {
	guids map[string]struct{} // under followers.mu
	out   chan *basinv1.ScheduleChange
	// behind is closed when out overflowed: the stream ends and its caller
	// follows again from its revisions.
	behind     chan struct{}
	behindOnce sync.Once
}

func newFollowers() *followers {
	return &followers{byGUID: make(map[string]map[*follower]struct{})}
}

func (fs *followers) open() *follower {
	return &follower{guids: make(map[string]struct{}), out: make(chan *basinv1.ScheduleChange, followerBuffer), behind: make(chan struct{})}
}

func (fs *followers) close(f *follower) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	for g := range f.guids {
		fs.drop(f, g)
	}
}

func (fs *followers) drop(f *follower, guid string) {
	delete(f.guids, guid)
	if set := fs.byGUID[guid]; set != nil {
		delete(set, f)
		if len(set) == 0 {
			delete(fs.byGUID, guid)
		}
	}
}

// follow registers guid on f and sends the view's schedule when it is newer
// than rev.
func (fs *followers) follow(f *follower, guid string, rev int64, current func(string) *kvEntry) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if _, ok := f.guids[guid]; !ok && len(f.guids) >= maxFollowPerStream {
		return fieldErr("follow", "a stream follows at most %d LRPs", maxFollowPerStream)
	}
	f.guids[guid] = struct{}{}
	set := fs.byGUID[guid]
	if set == nil {
		set = make(map[*follower]struct{})
		fs.byGUID[guid] = set
	}
	set[f] = struct{}{}
	if e := current(guid); e != nil && e.modRev > rev {
		if c := scheduleChange(e); c != nil {
			f.send(c)
		}
	}
	return nil
}

func (fs *followers) unfollow(f *follower, guid string) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	fs.drop(f, guid)
}

// publish sends a schedule's new value to the streams following guid.
func (fs *followers) publish(guid string, e *kvEntry) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	set := fs.byGUID[guid]
	if len(set) == 0 {
		return
	}
	c := scheduleChange(e)
	if c == nil {
		return
	}
	for f := range set {
		f.send(c)
	}
}

func (f *follower) send(c *basinv1.ScheduleChange) {
	select {
	case f.out <- c:
	default:
		f.behindOnce.Do(func() { close(f.behind) })
	}
}

// scheduleChange decodes a schedule entry; nil if it does not decode.
func scheduleChange(e *kvEntry) *basinv1.ScheduleChange {
	s := &basinv1.DesiredLRPSchedule{}
	if proto.Unmarshal(e.val, s) != nil {
		return nil
	}
	return &basinv1.ScheduleChange{Schedule: s, Revision: e.modRev}
}

// scheduleNow is the view's schedule of guid, nil when there is none.
func (s *Store) scheduleNow(guid string) *kvEntry {
	e, ok := s.desired.current(s.keys.DesiredSchedule(guid))
	if !ok {
		return nil
	}
	return e
}

func (a *API) WatchSchedules(stream basinv1.BBSService_WatchSchedulesServer) error {
	ctx := stream.Context()
	fs := a.store.followers
	f := fs.open()
	defer fs.close(f)
	recvErr := make(chan error, 1)
	// The receiving goroutine ends with the stream: returning from the
	// handler ends its context, and Recv with it.
	go func() { recvErr <- a.followRequests(stream, f) }()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-recvErr:
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		case <-f.behind:
			return fmt.Errorf("%w: the schedule stream fell %d changes behind; follow again", ErrSlowSubscriber, followerBuffer)
		case c := <-f.out:
			resp := &basinv1.WatchSchedulesResponse{Changes: []*basinv1.ScheduleChange{c}}
			for more := true; more && len(resp.Changes) < maxFollowPerMessage; {
				select {
				case c := <-f.out:
					resp.Changes = append(resp.Changes, c)
				default:
					more = false
				}
			}
			if err := stream.Send(resp); err != nil {
				return err
			}
		}
	}
}

// followRequests applies the caller's follow and unfollow messages until
// the stream ends or one is invalid.
func (a *API) followRequests(stream basinv1.BBSService_WatchSchedulesServer, f *follower) error {
	fs := a.store.followers
	for {
		req, err := stream.Recv()
		if err != nil {
			return err
		}
		if len(req.GetFollow()) > maxFollowPerMessage {
			return fieldErr("follow", "must list at most %d LRPs, got %d", maxFollowPerMessage, len(req.GetFollow()))
		}
		if len(req.GetUnfollow()) > maxFollowPerMessage {
			return fieldErr("unfollow", "must list at most %d LRPs, got %d", maxFollowPerMessage, len(req.GetUnfollow()))
		}
		for i, in := range req.GetFollow() {
			if err := checkGUID(indexed("follow", i)+".process_guid", in.GetProcessGuid()); err != nil {
				return err
			}
			if in.GetRevision() < 0 {
				return fieldErr(indexed("follow", i)+".revision", "must not be negative, got %d", in.GetRevision())
			}
		}
		for i, g := range req.GetUnfollow() {
			if err := checkGUID(indexed("unfollow", i), g); err != nil {
				return err
			}
		}
		for _, in := range req.GetFollow() {
			if err := fs.follow(f, in.GetProcessGuid(), in.GetRevision(), a.store.scheduleNow); err != nil {
				return err
			}
		}
		for _, g := range req.GetUnfollow() {
			fs.unfollow(f, g)
		}
	}
}
