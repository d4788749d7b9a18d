package bbs

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"go.etcd.io/etcd/client/v3/concurrency"
)

// TestConcurrentClaimOneWinner races several cells for each of 1,000
// instances: exactly one claim may win each race.
func TestConcurrentClaimOneWinner(t *testing.T) {
	s := startStore(t, StoreConfig{})
	ctx := context.Background()
	const instances, cells = 1000, 8
	if _, err := s.DesireLRP(ctx, testSchedule("race", instances), testRun()); err != nil {
		t.Fatal(err)
	}
	fences := make([]*basinv1.Fence, cells)
	for c := range cells {
		fences[c] = registerCell(t, s, fmt.Sprintf("cell-%d", c))
	}
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	var bad atomic.Int64
	for i := range int32(instances) {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			var wins atomic.Int32
			var race sync.WaitGroup
			start := make(chan struct{})
			for c := range cells {
				race.Go(func() {
					<-start
					ik := &basinv1.ActualLRPInstanceKey{InstanceGuid: fmt.Sprintf("inst-%d-%d", i, c), CellId: fmt.Sprintf("cell-%d", c)}
					_, err := s.ClaimActualLRP(ctx, &basinv1.ActualLRPKey{ProcessGuid: "race", Index: i}, ik, fences[c])
					switch {
					case err == nil:
						wins.Add(1)
					case errors.Is(err, ErrTransition):
					default:
						t.Errorf("claim %d by cell %d: unexpected error %v", i, c, err)
					}
				})
			}
			close(start)
			race.Wait()
			if wins.Load() != 1 {
				bad.Add(1)
				t.Errorf("instance %d: %d claims won, want exactly 1", i, wins.Load())
			}
		})
	}
	wg.Wait()
	if bad.Load() != 0 {
		return
	}
	// Every instance is claimed by one cell and indexed under it, and the
	// auction queue is empty.
	if n := countKeys(t, s.Keys().UnclaimedPrefix()); n != 0 {
		t.Errorf("%d instances still queued after all were claimed", n)
	}
	if n := countKeys(t, s.Keys().Prefix+"index/cell/"); n != instances {
		t.Errorf("cell index holds %d keys, want %d", n, instances)
	}
	all, err := s.ListActualLRPs(ctx, ActualFilter{ProcessGUID: "race"})
	if err != nil {
		t.Fatal(err)
	}
	perCell := 0
	for c := range cells {
		onCell, err := s.ListActualLRPs(ctx, ActualFilter{CellID: fmt.Sprintf("cell-%d", c)})
		if err != nil {
			t.Fatal(err)
		}
		perCell += len(onCell)
	}
	if len(all) != instances || perCell != instances {
		t.Errorf("listed %d actuals and %d through the cell index, want %d each", len(all), perCell, instances)
	}
}

func TestDesireScaleAndRemove(t *testing.T) {
	s := startStore(t, StoreConfig{})
	ctx := context.Background()
	keys := s.Keys()
	// More instances than fit in one transaction.
	d, err := s.DesireLRP(ctx, testSchedule("big", 300), testRun())
	if err != nil {
		t.Fatal(err)
	}
	if d.GetRevision() == 0 {
		t.Error("desired LRP has no revision")
	}
	if n := countKeys(t, keys.ActualLRPPrefix("big")); n != 300 {
		t.Fatalf("%d actuals after desiring 300", n)
	}
	if n := countKeys(t, keys.UnclaimedPrefix()+"big/"); n != 300 {
		t.Fatalf("%d queue keys after desiring 300", n)
	}
	fence := registerCell(t, s, "c1")
	ik := &basinv1.ActualLRPInstanceKey{InstanceGuid: "i250", CellId: "c1"}
	if _, err := s.ClaimActualLRP(ctx, &basinv1.ActualLRPKey{ProcessGuid: "big", Index: 250}, ik, fence); err != nil {
		t.Fatal(err)
	}

	// Scaling down retires the highest indices, claimed or not, with their
	// index keys.
	n := int32(100)
	if _, err := s.UpdateDesiredLRP(ctx, "big", DesiredUpdate{Instances: &n}); err != nil {
		t.Fatal(err)
	}
	actuals, err := s.ListActualLRPs(ctx, ActualFilter{ProcessGUID: "big"})
	if err != nil {
		t.Fatal(err)
	}
	if len(actuals) != 100 {
		t.Fatalf("%d actuals after scaling to 100", len(actuals))
	}
	for _, a := range actuals {
		if a.GetKey().GetIndex() >= 100 {
			t.Errorf("index %d survived scaling to 100", a.GetKey().GetIndex())
		}
	}
	if c := countKeys(t, keys.CellIndexPrefix("c1")); c != 0 {
		t.Errorf("cell index of c1 holds %d keys after its instance was retired", c)
	}
	if c := countKeys(t, keys.UnclaimedPrefix()+"big/"); c != 100 {
		t.Errorf("%d queue keys after scaling to 100", c)
	}

	n = 120
	if _, err := s.UpdateDesiredLRP(ctx, "big", DesiredUpdate{Instances: &n}); err != nil {
		t.Fatal(err)
	}
	if c := countKeys(t, keys.ActualLRPPrefix("big")); c != 120 {
		t.Errorf("%d actuals after scaling to 120", c)
	}

	if err := s.RemoveDesiredLRP(ctx, "big"); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{keys.DesiredPrefix(), keys.ActualPrefix(), keys.UnclaimedPrefix()} {
		if c := countKeys(t, p); c != 0 {
			t.Errorf("%d keys left under %s after removing the LRP", c, p)
		}
	}
	if _, err := s.GetDesiredLRP(ctx, "big"); !errors.Is(err, ErrNotFound) {
		t.Errorf("get removed LRP: %v, want ErrNotFound", err)
	}
}

// TestConcurrentUpdatesLoseNothing: updates racing on one LRP either both
// apply or the loser gets ErrConflict; nothing is silently overwritten.
func TestConcurrentUpdatesLoseNothing(t *testing.T) {
	s := startStore(t, StoreConfig{})
	ctx := context.Background()
	d, err := s.DesireLRP(ctx, testSchedule("upd", 1), testRun())
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	const writers = 8
	errs := make([]error, writers)
	for w := range writers {
		wg.Go(func() {
			ann := fmt.Sprintf("w%d", w)
			var u DesiredUpdate
			if w%2 == 0 {
				u.Annotation = &ann
			} else {
				u.EnvSet, u.Env = true, []*basinv1.EnvVar{{Name: "W", Value: ann}}
			}
			_, errs[w] = s.UpdateDesiredLRP(ctx, "upd", u)
		})
	}
	wg.Wait()
	for w, err := range errs {
		if err != nil && !errors.Is(err, ErrConflict) {
			t.Errorf("writer %d: %v", w, err)
		}
	}
	got, err := s.GetDesiredLRP(ctx, "upd")
	if err != nil {
		t.Fatal(err)
	}
	if got.GetSchedule().GetAnnotation() == "" || len(got.GetRun().GetEnv()) != 1 {
		t.Errorf("an update was lost: annotation %q, env %v", got.GetSchedule().GetAnnotation(), got.GetRun().GetEnv())
	}

	// Conditional updates on the same revision: exactly one wins.
	rev := got.GetRevision()
	var wins atomic.Int32
	for w := range writers {
		wg.Go(func() {
			n := int32(w + 1)
			_, err := s.UpdateDesiredLRP(ctx, "upd", DesiredUpdate{Instances: &n, IfRevision: rev})
			switch {
			case err == nil:
				wins.Add(1)
			case !errors.Is(err, ErrConflict):
				t.Errorf("conditional update %d: %v", w, err)
			}
		})
	}
	wg.Wait()
	if wins.Load() != 1 {
		t.Errorf("%d conditional updates on revision %d won, want 1", wins.Load(), rev)
	}
	_ = d
}

// TestDeposedLeaderIsFenced: a leader that lost its election can no longer
// write, while the new leader can.
func TestDeposedLeaderIsFenced(t *testing.T) {
	s := startStore(t, StoreConfig{})
	ctx := context.Background()
	if _, err := s.DesireLRP(ctx, testSchedule("fenced", 2), testRun()); err != nil {
		t.Fatal(err)
	}
	electionKey := s.Keys().Leader("auctioneer")
	campaign := func(name string) (*concurrency.Session, *basinv1.Fence) {
		sess, err := concurrency.NewSession(testClient, concurrency.WithTTL(5))
		if err != nil {
			t.Fatal(err)
		}
		e := concurrency.NewElection(sess, electionKey)
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		if err := e.Campaign(cctx, name); err != nil {
			t.Fatal(err)
		}
		return sess, &basinv1.Fence{Key: e.Key(), CreateRevision: e.Rev()}
	}
	oldSess, oldFence := campaign("old")
	key0 := &basinv1.ActualLRPKey{ProcessGuid: "fenced", Index: 0}
	if _, err := s.FailActualLRP(ctx, key0, "insufficient resources: memory", oldFence); err != nil {
		t.Fatalf("leader's fenced write: %v", err)
	}
	// The old leader's lease ends (as when it is partitioned away) and a new
	// leader is elected.
	if err := oldSess.Close(); err != nil {
		t.Fatal(err)
	}
	newSess, newFence := campaign("new")
	defer newSess.Close()

	key1 := &basinv1.ActualLRPKey{ProcessGuid: "fenced", Index: 1}
	_, err := s.FailActualLRP(ctx, key1, "no cell with stack tiny", oldFence)
	if !errors.Is(err, ErrFenceLost) {
		t.Fatalf("deposed leader's write: %v, want ErrFenceLost", err)
	}
	if a, _ := s.GetActualLRP(ctx, "fenced", 1); a.GetPlacementError() != "" {
		t.Fatalf("deposed leader's write landed: %v", a)
	}
	if _, err := s.FailActualLRP(ctx, key1, "no cell with stack tiny", newFence); err != nil {
		t.Fatalf("new leader's write: %v", err)
	}
	// A cell whose presence was re-created (lease lost, then re-registered)
	// holds a new fence; its old one no longer works.
	cellFence := registerCell(t, s, "c1")
	if _, err := testClient.Delete(ctx, cellFence.GetKey()); err != nil {
		t.Fatal(err)
	}
	registerCell(t, s, "c1")
	_, err = s.UnclaimActualLRP(ctx, key1, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = s.ClaimActualLRP(ctx, key1, &basinv1.ActualLRPInstanceKey{InstanceGuid: "i", CellId: "c1"}, cellFence)
	if !errors.Is(err, ErrFenceLost) {
		t.Fatalf("claim with a lost presence: %v, want ErrFenceLost", err)
	}
}

func TestTaskLifecycle(t *testing.T) {
	s := startStore(t, StoreConfig{})
	ctx := context.Background()
	def := &basinv1.TaskDefinition{Stack: "tiny", Command: "echo hi", Resources: &basinv1.ResourceLimits{MemoryMb: 64, DiskMb: 64, Pids: 16}}
	if _, err := s.DesireTask(ctx, "t1", "apps", def); err != nil {
		t.Fatal(err)
	}
	if _, err := s.DesireTask(ctx, "t1", "apps", def); !errors.Is(err, ErrAlreadyExists) {
		t.Fatalf("desire twice: %v", err)
	}
	if n := countKeys(t, s.Keys().PendingTaskPrefix()); n != 1 {
		t.Fatalf("%d pending keys, want 1", n)
	}
	f1, f2 := registerCell(t, s, "c1"), registerCell(t, s, "c2")
	_, should, err := s.StartTask(ctx, "t1", "c1", f1)
	if err != nil || !should {
		t.Fatalf("start: should=%v err=%v", should, err)
	}
	if _, should, err = s.StartTask(ctx, "t1", "c1", f1); err != nil || should {
		t.Fatalf("start again on the same cell: should=%v err=%v", should, err)
	}
	if _, _, err := s.StartTask(ctx, "t1", "c2", f2); !errors.Is(err, ErrTransition) {
		t.Fatalf("start on another cell: %v", err)
	}
	if err := s.ResolveTask(ctx, "t1", nil); !errors.Is(err, ErrTransition) {
		t.Fatalf("resolve a running task: %v", err)
	}
	if _, err := s.CompleteTask(ctx, "t1", "c2", false, "", "", f2); !errors.Is(err, ErrTransition) {
		t.Fatalf("complete from another cell: %v", err)
	}
	done, err := s.CompleteTask(ctx, "t1", "c1", false, "", "42", f1)
	if err != nil || done.GetResult() != "42" || done.GetState() != taskCompleted {
		t.Fatalf("complete: %v %v", done, err)
	}
	if n := countKeys(t, s.Keys().PendingTaskPrefix()); n != 0 {
		t.Fatalf("%d pending keys after start", n)
	}
	if err := s.ResolveTask(ctx, "t1", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetTask(ctx, "t1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get resolved task: %v", err)
	}
	if _, err := s.DesireTask(ctx, "t2", "apps", def); err != nil {
		t.Fatal(err)
	}
	c, err := s.CancelTask(ctx, "t2")
	if err != nil || !c.GetFailed() || c.GetState() != taskCompleted {
		t.Fatalf("cancel: %v %v", c, err)
	}
}

func TestCrashCountResetsAfterLongRun(t *testing.T) {
	now := time.Unix(1000, 0)
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
	s := startStore(t, StoreConfig{Now: clock, CrashResetAfter: 5 * time.Minute})
	ctx := context.Background()
	if _, err := s.DesireLRP(ctx, testSchedule("crashy", 1), testRun()); err != nil {
		t.Fatal(err)
	}
	fence := registerCell(t, s, "c1")
	key := &basinv1.ActualLRPKey{ProcessGuid: "crashy", Index: 0}
	run := func(run time.Duration) *basinv1.ActualLRP {
		t.Helper()
		ik := &basinv1.ActualLRPInstanceKey{InstanceGuid: fmt.Sprintf("i%d", now.Unix()), CellId: "c1"}
		if _, err := s.StartActualLRP(ctx, key, ik, &basinv1.ActualLRPNetInfo{Address: "127.0.0.1"}, fence); err != nil {
			t.Fatal(err)
		}
		advance(run)
		a, err := s.CrashActualLRP(ctx, key, ik, "exited with status 1", fence)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.UnclaimActualLRP(ctx, key, nil, nil); err != nil {
			t.Fatal(err)
		}
		return a
	}
	for want := int32(1); want <= 3; want++ {
		if a := run(time.Second); a.GetCrashCount() != want {
			t.Fatalf("crash count %d, want %d", a.GetCrashCount(), want)
		}
	}
	if a := run(6 * time.Minute); a.GetCrashCount() != 1 {
		t.Fatalf("crash count after a long run: %d, want 1", a.GetCrashCount())
	}
}

// TestCreateMissingActualLRPs: instances lost between a scale-up's batches
// (the BBS died) are created again, once, with their queue keys; a deposed
// leader cannot.
func TestCreateMissingActualLRPs(t *testing.T) {
	s := startStore(t, StoreConfig{})
	ctx := context.Background()
	if _, err := s.DesireLRP(ctx, testSchedule("holes", 5), testRun()); err != nil {
		t.Fatal(err)
	}
	for _, i := range []int32{1, 4} {
		if _, err := testClient.Delete(ctx, s.Keys().Actual("holes", i)); err != nil {
			t.Fatal(err)
		}
		if _, err := testClient.Delete(ctx, s.Keys().Unclaimed("holes", i)); err != nil {
			t.Fatal(err)
		}
	}
	created, err := s.CreateMissingActualLRPs(ctx, "holes", nil)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(created) != "[1 4]" {
		t.Errorf("created %v, want [1 4]", created)
	}
	if n := countKeys(t, s.Keys().UnclaimedPrefix()+"holes/"); n != 5 {
		t.Errorf("%d queue keys, want 5", n)
	}
	if created, err := s.CreateMissingActualLRPs(ctx, "holes", nil); err != nil || len(created) != 0 {
		t.Errorf("second call created %v, %v; want nothing", created, err)
	}

	if _, err := testClient.Delete(ctx, s.Keys().Actual("holes", 2)); err != nil {
		t.Fatal(err)
	}
	stale := &basinv1.Fence{Key: s.Keys().Leader("converger") + "/gone", CreateRevision: 1}
	if _, err := s.CreateMissingActualLRPs(ctx, "holes", stale); !errors.Is(err, ErrFenceLost) {
		t.Errorf("deposed leader: %v, want ErrFenceLost", err)
	}
	if _, err := s.GetActualLRP(ctx, "holes", 2); !errors.Is(err, ErrNotFound) {
		t.Errorf("deposed leader's creation landed: %v", err)
	}
}
