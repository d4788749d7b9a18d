package bbs

import (
	"context"
	"fmt"
	"sync"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"google.golang.org/protobuf/proto"
)

// hub fans events out to subscribers. A subscriber has a bounded buffer; one
// that lets it fill is dropped with ErrSlowSubscriber rather than making the
// BBS hold its backlog in memory.
type hub struct {
	buffer  int
	metrics *metrics

	mu   sync.Mutex
	subs map[*Subscription]struct{}
}

// Subscription receives events in etcd revision order per record.
type Subscription struct {
	hub    *hub
	guid   string
	events chan *basinv1.Event
	done   chan struct{}
	once   sync.Once
	err    error
}

func newHub(buffer int, m *metrics) *hub {
	if buffer <= 0 {
		buffer = 4096
	}
	return &hub{buffer: buffer, metrics: m, subs: make(map[*Subscription]struct{})}
}

func (h *hub) subscribe(guid string) *Subscription {
	s := &Subscription{hub: h, guid: guid, events: make(chan *basinv1.Event, h.buffer), done: make(chan struct{})}
	h.mu.Lock()
	h.subs[s] = struct{}{}
	h.mu.Unlock()
	h.metrics.subscribers.Inc()
	return s
}

// active reports whether anyone listens, so unheard events are not built.
func (h *hub) active() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.subs) > 0
}

// publish hands ev to every subscriber interested in guid without blocking.
func (h *hub) publish(guid string, ev *basinv1.Event) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for s := range h.subs {
		if s.guid != "" && s.guid != guid {
			continue
		}
		select {
		case s.events <- ev:
			h.metrics.eventsSent.Inc()
		default:
			h.metrics.droppedSubs.Inc()
			s.closeLocked(fmt.Errorf("%w: more than %d events behind; re-list and subscribe again", ErrSlowSubscriber, h.buffer))
		}
	}
}

func (s *Subscription) closeLocked(err error) {
	s.once.Do(func() {
		s.err = err
		delete(s.hub.subs, s)
		s.hub.metrics.subscribers.Dec()
		close(s.done)
	})
}

// Close ends the subscription.
func (s *Subscription) Close() {
	s.hub.mu.Lock()
	defer s.hub.mu.Unlock()
	s.closeLocked(nil)
}

// Next returns the next event, or an error once the subscription was dropped
// or ctx is done. Events queued before a drop are still delivered first.
func (s *Subscription) Next(ctx context.Context) (*basinv1.Event, error) {
	select {
	case ev := <-s.events:
		return ev, nil
	default:
	}
	select {
	case ev := <-s.events:
		return ev, nil
	case <-s.done:
		select {
		case ev := <-s.events:
			return ev, nil
		default:
		}
		if s.err != nil {
			return nil, s.err
		}
		return nil, context.Canceled
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Events turn view changes into API events.

func (s *Store) onActualChange(rev int64, changes []change) {
	if !s.hub.active() {
		return
	}
	for _, c := range changes {
		before := decodeActualEntry(c.before)
		after := decodeActualEntry(c.after)
		var guid string
		switch {
		case after != nil:
			guid = after.GetKey().GetProcessGuid()
		case before != nil:
			guid = before.GetKey().GetProcessGuid()
		default:
			continue
		}
		switch {
		case before == nil && after != nil:
			s.hub.publish(guid, &basinv1.Event{Revision: rev, Event: &basinv1.Event_ActualLrpCreated{ActualLrpCreated: &basinv1.ActualLRPCreatedEvent{ActualLrp: after}}})
		case after == nil:
			s.hub.publish(guid, &basinv1.Event{Revision: rev, Event: &basinv1.Event_ActualLrpRemoved{ActualLrpRemoved: &basinv1.ActualLRPRemovedEvent{ActualLrp: before}}})
		default:
			s.hub.publish(guid, &basinv1.Event{Revision: rev, Event: &basinv1.Event_ActualLrpChanged{ActualLrpChanged: &basinv1.ActualLRPChangedEvent{Before: before, After: after}}})
		}
		if after.GetState() == basinv1.ActualLRPState_ACTUAL_LRP_STATE_CRASHED &&
			(before.GetState() != basinv1.ActualLRPState_ACTUAL_LRP_STATE_CRASHED || before.GetCrashCount() != after.GetCrashCount()) {
			s.hub.publish(guid, &basinv1.Event{Revision: rev, Event: &basinv1.Event_ActualLrpCrashed{ActualLrpCrashed: &basinv1.ActualLRPCrashedEvent{
				Key:           after.GetKey(),
				InstanceKey:   before.GetInstanceKey(),
				CrashCount:    after.GetCrashCount(),
				CrashReason:   after.GetCrashReason(),
				SinceUnixNano: after.GetSinceUnixNano(),
			}}})
		}
	}
}

func (s *Store) onTaskChange(rev int64, changes []change) {
	if !s.hub.active() {
		return
	}
	for _, c := range changes {
		before := decodeTaskEntry(c.before)
		after := decodeTaskEntry(c.after)
		switch {
		case before == nil && after != nil:
			s.hub.publish(after.GetTaskGuid(), &basinv1.Event{Revision: rev, Event: &basinv1.Event_TaskCreated{TaskCreated: &basinv1.TaskCreatedEvent{Task: after}}})
		case before != nil && after == nil:
			s.hub.publish(before.GetTaskGuid(), &basinv1.Event{Revision: rev, Event: &basinv1.Event_TaskRemoved{TaskRemoved: &basinv1.TaskRemovedEvent{Task: before}}})
		case before != nil:
			s.hub.publish(after.GetTaskGuid(), &basinv1.Event{Revision: rev, Event: &basinv1.Event_TaskChanged{TaskChanged: &basinv1.TaskChangedEvent{Before: before, After: after}}})
		}
	}
}

// onDesiredChange groups the schedule and run keys of one LRP, which change
// together in one transaction, into one event.
func (s *Store) onDesiredChange(rev int64, changes []change) {
	for _, c := range changes {
		if guid, part, ok := s.keys.DesiredPart(c.key); ok && part == "schedule" && c.after != nil {
			s.followers.publish(guid, c.after)
		}
	}
	if !s.hub.active() {
		return
	}
	type parts struct {
		sched, run       *kvEntry
		schedSet, runSet bool
	}
	touched := make(map[string]*parts)
	var order []string
	for _, c := range changes {
		guid, part, ok := s.keys.DesiredPart(c.key)
		if !ok {
			continue
		}
		p := touched[guid]
		if p == nil {
			p = &parts{}
			touched[guid] = p
			order = append(order, guid)
		}
		switch part {
		case "schedule":
			p.sched, p.schedSet = c.before, true
		case "run":
			p.run, p.runSet = c.before, true
		}
	}
	for _, guid := range order {
		p := touched[guid]
		afterSched, _ := s.desired.current(s.keys.DesiredSchedule(guid))
		afterRun, _ := s.desired.current(s.keys.DesiredRun(guid))
		beforeSched, beforeRun := p.sched, p.run
		if !p.schedSet {
			beforeSched = afterSched
		}
		if !p.runSet {
			beforeRun = afterRun
		}
		before := decodeDesiredEntries(beforeSched, beforeRun)
		after := decodeDesiredEntries(afterSched, afterRun)
		switch {
		case before == nil && after != nil:
			s.hub.publish(guid, &basinv1.Event{Revision: rev, Event: &basinv1.Event_DesiredLrpCreated{DesiredLrpCreated: &basinv1.DesiredLRPCreatedEvent{DesiredLrp: after}}})
		case before != nil && after == nil:
			s.hub.publish(guid, &basinv1.Event{Revision: rev, Event: &basinv1.Event_DesiredLrpRemoved{DesiredLrpRemoved: &basinv1.DesiredLRPRemovedEvent{DesiredLrp: before}}})
		case before != nil && !proto.Equal(before, after):
			s.hub.publish(guid, &basinv1.Event{Revision: rev, Event: &basinv1.Event_DesiredLrpChanged{DesiredLrpChanged: &basinv1.DesiredLRPChangedEvent{Before: before, After: after}}})
		}
	}
}

func decodeActualEntry(e *kvEntry) *basinv1.ActualLRP {
	if e == nil {
		return nil
	}
	a := &basinv1.ActualLRP{}
	if proto.Unmarshal(e.val, a) != nil {
		return nil
	}
	a.Revision = e.modRev
	return a
}

func decodeTaskEntry(e *kvEntry) *basinv1.Task {
	if e == nil {
		return nil
	}
	t := &basinv1.Task{}
	if proto.Unmarshal(e.val, t) != nil {
		return nil
	}
	t.Revision = e.modRev
	return t
}

// decodeDesiredEntries needs both parts: a half-written LRP is not one.
func decodeDesiredEntries(sched, run *kvEntry) *basinv1.DesiredLRP {
	if sched == nil || run == nil {
		return nil
	}
	d := &basinv1.DesiredLRP{Schedule: &basinv1.DesiredLRPSchedule{}, Run: &basinv1.DesiredLRPRun{}, Revision: sched.modRev}
	if proto.Unmarshal(sched.val, d.Schedule) != nil || proto.Unmarshal(run.val, d.Run) != nil {
		return nil
	}
	return d
}
