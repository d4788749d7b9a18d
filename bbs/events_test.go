package bbs

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// eventLog checks a subscription's events as they come: per record, every
// event must continue from the previous one (before == last after, by
// revision), so a lost or repeated change breaks the chain.
type eventLog struct {
	t    *testing.T
	last map[string]int64 // record -> revision of its last state; -1 removed
	n    int
}

func newEventLog(t *testing.T) *eventLog { return &eventLog{t: t, last: map[string]int64{}} }

func (l *eventLog) step(id string, before, after int64) {
	l.t.Helper()
	l.n++
	prev, seen := l.last[id]
	switch {
	case before == 0 && seen && prev != -1:
		l.t.Errorf("%s created again at revision %d while it existed at %d", id, after, prev)
	case before != 0 && seen && prev != before:
		l.t.Errorf("%s: event continues from revision %d, last seen %d (a change was lost or repeated)", id, before, prev)
	}
	if after == 0 {
		l.last[id] = -1
	} else {
		l.last[id] = after
	}
}

func (l *eventLog) add(ev *basinv1.Event) {
	l.t.Helper()
	switch e := ev.GetEvent().(type) {
	case *basinv1.Event_ActualLrpCreated:
		l.step(actualID(e.ActualLrpCreated.GetActualLrp()), 0, e.ActualLrpCreated.GetActualLrp().GetRevision())
	case *basinv1.Event_ActualLrpChanged:
		l.step(actualID(e.ActualLrpChanged.GetAfter()), e.ActualLrpChanged.GetBefore().GetRevision(), e.ActualLrpChanged.GetAfter().GetRevision())
	case *basinv1.Event_ActualLrpRemoved:
		a := e.ActualLrpRemoved.GetActualLrp()
		l.step(actualID(a), a.GetRevision(), 0)
	case *basinv1.Event_DesiredLrpCreated:
		l.step("desired/"+e.DesiredLrpCreated.GetDesiredLrp().GetSchedule().GetProcessGuid(), 0, e.DesiredLrpCreated.GetDesiredLrp().GetRevision())
	case *basinv1.Event_DesiredLrpChanged:
		l.step("desired/"+e.DesiredLrpChanged.GetAfter().GetSchedule().GetProcessGuid(), e.DesiredLrpChanged.GetBefore().GetRevision(), e.DesiredLrpChanged.GetAfter().GetRevision())
	case *basinv1.Event_DesiredLrpRemoved:
		d := e.DesiredLrpRemoved.GetDesiredLrp()
		l.step("desired/"+d.GetSchedule().GetProcessGuid(), d.GetRevision(), 0)
	case *basinv1.Event_ActualLrpCrashed:
		l.n++
	}
}

func actualID(a *basinv1.ActualLRP) string {
	return fmt.Sprintf("actual/%s/%d", a.GetKey().GetProcessGuid(), a.GetKey().GetIndex())
}

// drain reads events until every record in want is at its revision (-1:
// removed), and fails if it takes too long.
func (l *eventLog) drain(sub *Subscription, want map[string]int64) {
	l.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for !l.reached(want) {
		ev, err := sub.Next(ctx)
		if err != nil {
			l.t.Fatalf("waiting for events: %v; have %v, want %v", err, l.last, want)
		}
		l.add(ev)
	}
}

func (l *eventLog) reached(want map[string]int64) bool {
	for id, rev := range want {
		last, seen := l.last[id]
		if !seen {
			last = -1 // never existed
		}
		if last != rev {
			return false
		}
	}
	return true
}

// currentRevisions reads the revision of every record under the store's prefix from etcd.
func currentRevisions(t *testing.T, s *Store, guids ...string) map[string]int64 {
	t.Helper()
	want := map[string]int64{}
	for _, g := range guids {
		resp, err := testClient.Get(context.Background(), s.Keys().DesiredSchedule(g))
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Kvs) == 0 {
			want["desired/"+g] = -1
		} else {
			want["desired/"+g] = resp.Kvs[0].ModRevision
		}
		for i := range int32(3) {
			resp, err := testClient.Get(context.Background(), s.Keys().Actual(g, i))
			if err != nil {
				t.Fatal(err)
			}
			id := fmt.Sprintf("actual/%s/%d", g, i)
			if len(resp.Kvs) == 0 {
				want[id] = -1
			} else {
				want[id] = resp.Kvs[0].ModRevision
			}
		}
	}
	return want
}

// TestEventsSurviveCompaction: the BBS loses its watch, changes happen and
// etcd compacts them away; when it comes back it re-lists and its
// subscribers see every record reach its current state, with no change lost
// or repeated.
func TestEventsSurviveCompaction(t *testing.T) {
	prefix := testPrefix()
	s := NewStore(testClient, StoreConfig{Prefix: prefix})
	stop := runStore(t, s)
	// A second store writes while the first one's watch is down.
	w := startStore(t, StoreConfig{Prefix: prefix})
	ctx := context.Background()
	sub := s.Subscribe("")
	defer sub.Close()
	log := newEventLog(t)

	if _, err := w.DesireLRP(ctx, testSchedule("a", 3), testRun()); err != nil {
		t.Fatal(err)
	}
	fence := registerCell(t, w, "c1")
	ik := &basinv1.ActualLRPInstanceKey{InstanceGuid: "a0", CellId: "c1"}
	k0 := &basinv1.ActualLRPKey{ProcessGuid: "a", Index: 0}
	if _, err := w.ClaimActualLRP(ctx, k0, ik, fence); err != nil {
		t.Fatal(err)
	}
	log.drain(sub, currentRevisions(t, w, "a"))

	stop()
	// While the watch is down: changes, creations and removals...
	if _, err := w.StartActualLRP(ctx, k0, ik, &basinv1.ActualLRPNetInfo{Address: "127.0.0.1"}, fence); err != nil {
		t.Fatal(err)
	}
	two := int32(2)
	if _, err := w.UpdateDesiredLRP(ctx, "a", DesiredUpdate{Instances: &two}); err != nil {
		t.Fatal(err)
	}
	if _, err := w.DesireLRP(ctx, testSchedule("b", 1), testRun()); err != nil {
		t.Fatal(err)
	}
	// ...then etcd compacts them away.
	resp, err := testClient.Get(ctx, "compact-marker")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := testClient.Compact(ctx, resp.Header.Revision, clientv3.WithCompactPhysical()); err != nil {
		t.Fatal(err)
	}

	relistsBefore := s.actual.relistCount()
	runStore(t, s)
	log.drain(sub, currentRevisions(t, w, "a", "b"))
	if s.actual.relistCount() == relistsBefore {
		t.Error("the store resumed its watch without hitting the compaction: the test did not exercise re-listing")
	}

	// Live changes after the re-list still arrive, once.
	if _, err := w.CrashActualLRP(ctx, k0, ik, "exited with status 2", fence); err != nil {
		t.Fatal(err)
	}
	log.drain(sub, currentRevisions(t, w, "a", "b"))
	if log.last["actual/a/2"] != -1 {
		t.Errorf("retired instance a/2 not reported removed: %v", log.last)
	}
}

func TestSlowSubscriberIsDropped(t *testing.T) {
	s := startStore(t, StoreConfig{SubscriberBuffer: 4})
	ctx := context.Background()
	slow := s.Subscribe("")
	defer slow.Close()
	// One desire makes 1 desired + 10 actual events: more than 4.
	if _, err := s.DesireLRP(ctx, testSchedule("many", 10), testRun()); err != nil {
		t.Fatal(err)
	}
	deadline, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	select {
	case <-slow.done:
	case <-deadline.Done():
		t.Fatal("slow subscriber was not dropped")
	}
	got := 0
	for {
		_, err := slow.Next(deadline)
		if err == nil {
			got++
			continue
		}
		if !errors.Is(err, ErrSlowSubscriber) {
			t.Fatalf("slow subscriber ended with %v, want ErrSlowSubscriber", err)
		}
		break
	}
	if got != 4 {
		t.Errorf("slow subscriber got %d buffered events before the drop, want 4", got)
	}
}

func TestSubscribeFiltersByGUID(t *testing.T) {
	s := startStore(t, StoreConfig{})
	ctx := context.Background()
	sub := s.Subscribe("mine")
	defer sub.Close()
	if _, err := s.DesireLRP(ctx, testSchedule("other", 1), testRun()); err != nil {
		t.Fatal(err)
	}
	if _, err := s.DesireLRP(ctx, testSchedule("mine", 1), testRun()); err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for range 2 {
		ev, err := sub.Next(wctx)
		if err != nil {
			t.Fatal(err)
		}
		var guid string
		switch e := ev.GetEvent().(type) {
		case *basinv1.Event_DesiredLrpCreated:
			guid = e.DesiredLrpCreated.GetDesiredLrp().GetSchedule().GetProcessGuid()
		case *basinv1.Event_ActualLrpCreated:
			guid = e.ActualLrpCreated.GetActualLrp().GetKey().GetProcessGuid()
		default:
			t.Fatalf("unexpected event %T", e)
		}
		if guid != "mine" {
			t.Errorf("subscriber for 'mine' got an event of %q", guid)
		}
	}
}
