package bbs

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// A batch of transitions behaves exactly like the single calls: each item
// gets the result or the code its single call would have, independently.
func TestApplyActualLRPTransitionsIsPerItem(t *testing.T) {
	srv, cli := startServer(t, Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := cli.DesireLRP(ctx, &basinv1.DesireLRPRequest{Schedule: testSchedule("batch", 3), Run: testRun()}); err != nil {
		t.Fatal(err)
	}
	fence := registerCell(t, srv.Store(), "cell-a")
	other := registerCell(t, srv.Store(), "cell-b")
	ik := func(cell string, i int32) *basinv1.ActualLRPInstanceKey {
		return &basinv1.ActualLRPInstanceKey{InstanceGuid: cell + "-i" + string(rune('0'+i)), CellId: cell}
	}
	key := func(i int32) *basinv1.ActualLRPKey {
		return &basinv1.ActualLRPKey{ProcessGuid: "batch", Index: i, Domain: "apps"}
	}
	claim := func(cell string, f *basinv1.Fence, i int32) *basinv1.ActualLRPTransition {
		return &basinv1.ActualLRPTransition{Transition: &basinv1.ActualLRPTransition_Claim{
			Claim: &basinv1.ClaimActualLRPRequest{Key: key(i), InstanceKey: ik(cell, i), Fence: f}}}
	}
	start := func(cell string, f *basinv1.Fence, i int32) *basinv1.ActualLRPTransition {
		return &basinv1.ActualLRPTransition{Transition: &basinv1.ActualLRPTransition_Start{
			Start: &basinv1.StartActualLRPRequest{Key: key(i), InstanceKey: ik(cell, i), Fence: f,
				NetInfo: &basinv1.ActualLRPNetInfo{Address: "127.0.0.1"}}}}
	}

	resp, err := cli.ApplyActualLRPTransitions(ctx, &basinv1.ApplyActualLRPTransitionsRequest{Transitions: []*basinv1.ActualLRPTransition{
		claim("cell-a", fence, 0),
		claim("cell-a", fence, 1),
		claim("cell-a", fence, 7), // no such index
		start("cell-b", other, 2), // UNCLAIMED: start claims it in the same txn
		{},                        // nothing set
		claim("cell-a", &basinv1.Fence{Key: fence.Key, CreateRevision: fence.CreateRevision + 1000}, 2), // stale fence
	}})
	if err != nil {
		t.Fatal(err)
	}
	want := []codes.Code{codes.OK, codes.OK, codes.NotFound, codes.OK, codes.InvalidArgument, codes.FailedPrecondition}
	if len(resp.GetResults()) != len(want) {
		t.Fatalf("got %d results, want %d", len(resp.GetResults()), len(want))
	}
	for i, r := range resp.GetResults() {
		if codes.Code(r.GetCode()) != want[i] {
			t.Errorf("result %d: code %v (%s), want %v", i, codes.Code(r.GetCode()), r.GetMessage(), want[i])
		}
		if (r.GetCode() == 0) != (r.GetActualLrp() != nil) {
			t.Errorf("result %d: code %d with actual %v", i, r.GetCode(), r.GetActualLrp())
		}
	}
	if got := resp.GetResults()[3].GetActualLrp().GetState(); got != basinv1.ActualLRPState_ACTUAL_LRP_STATE_RUNNING {
		t.Errorf("started instance is %v", got)
	}

	// The second claim of index 0 by another cell loses, as a single call would.
	resp, err = cli.ApplyActualLRPTransitions(ctx, &basinv1.ApplyActualLRPTransitionsRequest{Transitions: []*basinv1.ActualLRPTransition{
		claim("cell-b", other, 0), start("cell-a", fence, 0), start("cell-a", fence, 1),
	}})
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range []codes.Code{codes.FailedPrecondition, codes.OK, codes.OK} {
		if got := codes.Code(resp.GetResults()[i].GetCode()); got != want {
			t.Errorf("second batch, result %d: %v (%s), want %v", i, got, resp.GetResults()[i].GetMessage(), want)
		}
	}

	tooMany := &basinv1.ApplyActualLRPTransitionsRequest{Transitions: make([]*basinv1.ActualLRPTransition, maxBatch+1)}
	if _, err := cli.ApplyActualLRPTransitions(ctx, tooMany); !hasField(err, codes.InvalidArgument, "transitions") {
		t.Errorf("oversized batch: %v", err)
	}
}

func TestListDesiredLRPsByGUID(t *testing.T) {
	_, cli := startServer(t, Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var guids []string
	for i := range 70 { // more than one batched read
		g := "bulk-" + string(rune('a'+i/26)) + string(rune('a'+i%26))
		guids = append(guids, g)
		if _, err := cli.DesireLRP(ctx, &basinv1.DesireLRPRequest{Schedule: testSchedule(g, 0), Run: testRun()}); err != nil {
			t.Fatal(err)
		}
	}
	resp, err := cli.ListDesiredLRPs(ctx, &basinv1.ListDesiredLRPsRequest{ProcessGuids: append(guids, "missing")})
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]bool{}
	for _, d := range resp.GetDesiredLrps() {
		if d.GetRun() == nil || d.GetRevision() == 0 {
			t.Errorf("%s: incomplete record %v", d.GetSchedule().GetProcessGuid(), d)
		}
		got[d.GetSchedule().GetProcessGuid()] = true
	}
	if len(got) != len(guids) {
		t.Errorf("got %d LRPs, want %d", len(got), len(guids))
	}
	if _, err := cli.ListDesiredLRPs(ctx, &basinv1.ListDesiredLRPsRequest{ProcessGuids: []string{"a/b"}}); !hasField(err, codes.InvalidArgument, "process_guids[0]") {
		t.Errorf("bad guid: %v", err)
	}
}

// hasField reports whether err has code and names field.
func hasField(err error, code codes.Code, field string) bool {
	return status.Code(err) == code && strings.Contains(status.Convert(err).Message(), field)
}

// startFrozenStore runs a store's committer but lists its views once and
// never watches: they know only what the store itself wrote or read, so a
// write made directly in etcd leaves them stale until the store reads the
// key, deterministically.
func startFrozenStore(t *testing.T) *Store {
	s, _ := startFrozenStoreStoppable(t)
	return s
}

// startFrozenStoreStoppable is startFrozenStore with a function that stops
// its committer, after which writes are queued but never done.
func startFrozenStoreStoppable(t *testing.T) (*Store, func()) {
	t.Helper()
	s := NewStore(testClient, StoreConfig{Prefix: testPrefix()})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); s.commit.run(ctx) }()
	stop := func() { cancel(); <-done }
	t.Cleanup(stop)
	for _, v := range []*view{s.desired, s.actual, s.tasks} {
		if err := v.relist(ctx); err != nil {
			t.Fatal(err)
		}
	}
	return s, stop
}

// batchEnv is one batch case's world: an LRP "web", cells a and b, and
// cell-c whose fence is lost (its presence was re-created).
type batchEnv struct {
	s      *Store
	api    *API
	fences map[string]*basinv1.Fence
	revs   map[int32]int64 // revisions setup noted, for checks
}

func (e *batchEnv) key(i int32) *basinv1.ActualLRPKey {
	return &basinv1.ActualLRPKey{ProcessGuid: "web", Index: i, Domain: "apps"}
}

func (e *batchEnv) ik(cell string, i int32) *basinv1.ActualLRPInstanceKey {
	return &basinv1.ActualLRPInstanceKey{InstanceGuid: fmt.Sprintf("%s-i%d", cell, i), CellId: cell}
}

func (e *batchEnv) claim(cell string, i int32) *basinv1.ActualLRPTransition {
	return &basinv1.ActualLRPTransition{Transition: &basinv1.ActualLRPTransition_Claim{
		Claim: &basinv1.ClaimActualLRPRequest{Key: e.key(i), InstanceKey: e.ik(cell, i), Fence: e.fences[cell]}}}
}

func (e *batchEnv) start(cell string, i int32) *basinv1.ActualLRPTransition {
	return &basinv1.ActualLRPTransition{Transition: &basinv1.ActualLRPTransition_Start{
		Start: &basinv1.StartActualLRPRequest{Key: e.key(i), InstanceKey: e.ik(cell, i), Fence: e.fences[cell],
			NetInfo: &basinv1.ActualLRPNetInfo{Address: "10.0.0.1"}}}}
}

func (e *batchEnv) crash(cell string, i int32) *basinv1.ActualLRPTransition {
	return &basinv1.ActualLRPTransition{Transition: &basinv1.ActualLRPTransition_Crash{
		Crash: &basinv1.CrashActualLRPRequest{Key: e.key(i), InstanceKey: e.ik(cell, i), Fence: e.fences[cell], Reason: "exited with status 1"}}}
}

// single runs t through its single call's handler.
func (e *batchEnv) single(ctx context.Context, t *basinv1.ActualLRPTransition) *basinv1.ActualLRPTransitionResult {
	switch op := t.GetTransition().(type) {
	case *basinv1.ActualLRPTransition_Claim:
		r, err := e.api.ClaimActualLRP(ctx, op.Claim)
		return transitionResult(r.GetActualLrp(), err)
	case *basinv1.ActualLRPTransition_Start:
		r, err := e.api.StartActualLRP(ctx, op.Start)
		return transitionResult(r.GetActualLrp(), err)
	case *basinv1.ActualLRPTransition_Crash:
		r, err := e.api.CrashActualLRP(ctx, op.Crash)
		return transitionResult(r.GetActualLrp(), err)
	}
	return nil
}

// setActual writes instance i's state directly to etcd, with its index keys,
// behind the store's back; cell "" leaves it without an instance key.
func (e *batchEnv) setActual(t *testing.T, i int32, state basinv1.ActualLRPState, cell string) {
	t.Helper()
	ctx := context.Background()
	a, err := e.s.GetActualLRP(ctx, "web", i)
	if err != nil {
		t.Fatal(err)
	}
	a.Revision = 0
	a.State = state
	a.InstanceKey = nil
	if cell != "" {
		a.InstanceKey = e.ik(cell, i)
	}
	k := e.s.Keys()
	ops := []clientv3.Op{clientv3.OpPut(k.Actual("web", i), string(marshal(a)))}
	if state == stateUnclaimed {
		ops = append(ops, clientv3.OpPut(k.Unclaimed("web", i), ""))
	} else {
		ops = append(ops, clientv3.OpDelete(k.Unclaimed("web", i)))
	}
	for _, c := range []string{"cell-a", "cell-b", "cell-c"} {
		if c == cell && (state == stateClaimed || state == stateRunning) {
			ops = append(ops, clientv3.OpPut(k.CellIndex(c, "web", i), ""))
		} else {
			ops = append(ops, clientv3.OpDelete(k.CellIndex(c, "web", i)))
		}
	}
	if _, err := testClient.Txn(ctx).Then(ops...).Commit(); err != nil {
		t.Fatal(err)
	}
}

// placed names an instance's state and cell, e.g. "RUNNING@cell-a".
func placed(a *basinv1.ActualLRP) string {
	if c := a.GetInstanceKey().GetCellId(); c != "" {
		return stateName(a.GetState()) + "@" + c
	}
	return stateName(a.GetState())
}

// batchOutcome is one acceptable result of a batch: each item's code and the
// instances' states after it ("GONE" for a removed one).
type batchOutcome struct {
	codes  []codes.Code
	states map[int32]string
}

// TestApplyActualChangesAsSingleCalls: the batch path gives each item what
// its single call would: same codes and messages, noops, retries on a stale
// view, lost fences, and items on one key serialised in some order.
func TestApplyActualChangesAsSingleCalls(t *testing.T) {
	ok, fp, nf, inv := codes.OK, codes.FailedPrecondition, codes.NotFound, codes.InvalidArgument
	type env = batchEnv
	tests := []struct {
		name string
		// frozen: the store's view never hears from its watch, so setup's
		// direct etcd writes leave it stale.
		frozen    bool
		instances int32 // of "web"; 4 when 0
		setup     func(t *testing.T, e *env)
		batch     func(e *env) []*basinv1.ActualLRPTransition
		want      []batchOutcome // one of these must match
		// conflicts is how many guards must fail on the way; -1: any.
		conflicts int
		// recheck: failed items fail again the same way as single calls
		// (their records did not change).
		recheck bool
		check   func(t *testing.T, e *env, rs []*basinv1.ActualLRPTransitionResult)
	}{{
		name: "claims, starts and crashes",
		setup: func(t *testing.T, e *env) {
			ctx := context.Background()
			if _, err := e.s.ClaimActualLRP(ctx, e.key(2), e.ik("cell-a", 2), e.fences["cell-a"]); err != nil {
				t.Fatal(err)
			}
			if _, err := e.s.StartActualLRP(ctx, e.key(3), e.ik("cell-a", 3), &basinv1.ActualLRPNetInfo{Address: "10.0.0.1"}, e.fences["cell-a"]); err != nil {
				t.Fatal(err)
			}
		},
		batch: func(e *env) []*basinv1.ActualLRPTransition {
			return []*basinv1.ActualLRPTransition{e.claim("cell-a", 0), e.start("cell-b", 1), e.start("cell-a", 2), e.crash("cell-a", 3)}
		},
		want: []batchOutcome{{[]codes.Code{ok, ok, ok, ok},
			map[int32]string{0: "CLAIMED@cell-a", 1: "RUNNING@cell-b", 2: "RUNNING@cell-a", 3: "CRASHED"}}},
		conflicts: 0,
		check: func(t *testing.T, e *env, rs []*basinv1.ActualLRPTransitionResult) {
			if n := rs[3].GetActualLrp().GetCrashCount(); n != 1 {
				t.Errorf("crash count %d, want 1", n)
			}
			if a := rs[1].GetActualLrp().GetNetInfo().GetAddress(); a != "10.0.0.1" {
				t.Errorf("started with address %q", a)
			}
		},
	}, {
		name: "a repeated claim is a noop",
		setup: func(t *testing.T, e *env) {
			a, err := e.s.ClaimActualLRP(context.Background(), e.key(0), e.ik("cell-a", 0), e.fences["cell-a"])
			if err != nil {
				t.Fatal(err)
			}
			e.revs[0] = a.GetRevision()
		},
		batch: func(e *env) []*basinv1.ActualLRPTransition {
			return []*basinv1.ActualLRPTransition{e.claim("cell-a", 0), e.claim("cell-a", 0)}
		},
		want:      []batchOutcome{{[]codes.Code{ok, ok}, map[int32]string{0: "CLAIMED@cell-a", 1: "UNCLAIMED"}}},
		conflicts: 0,
		check: func(t *testing.T, e *env, rs []*basinv1.ActualLRPTransitionResult) {
			for i, r := range rs {
				if got := r.GetActualLrp().GetRevision(); got != e.revs[0] {
					t.Errorf("item %d: revision %d, want the claim's %d: a noop writes nothing", i, got, e.revs[0])
				}
			}
		},
	}, {
		name: "refusals carry their single call's code and message",
		setup: func(t *testing.T, e *env) {
			if _, err := e.s.ClaimActualLRP(context.Background(), e.key(0), e.ik("cell-a", 0), e.fences["cell-a"]); err != nil {
				t.Fatal(err)
			}
		},
		batch: func(e *env) []*basinv1.ActualLRPTransition {
			badKey := e.claim("cell-a", 2)
			badKey.GetClaim().Key.ProcessGuid = "a/b"
			noNet := e.start("cell-a", 2)
			noNet.GetStart().NetInfo = nil
			return []*basinv1.ActualLRPTransition{
				e.claim("cell-b", 0), // another cell claimed it
				e.crash("cell-a", 1), // UNCLAIMED
				e.claim("cell-a", 7), // no such instance
				badKey, noNet, {},
				e.start("cell-a", 3), // and a valid one among them
			}
		},
		want: []batchOutcome{{[]codes.Code{fp, fp, nf, inv, inv, inv, ok},
			map[int32]string{0: "CLAIMED@cell-a", 1: "UNCLAIMED", 2: "UNCLAIMED", 3: "RUNNING@cell-a"}}},
		conflicts: 0,
		recheck:   true,
		check: func(t *testing.T, e *env, rs []*basinv1.ActualLRPTransitionResult) {
			for i, want := range map[int]string{
				3: "key.process_guid: ",
				4: "net_info: is required",
				5: "transitions[5]: must set claim, start or crash",
			} {
				if !strings.HasPrefix(rs[i].GetMessage(), want) {
					t.Errorf("item %d: message %q, want it to start with %q", i, rs[i].GetMessage(), want)
				}
			}
		},
	}, {
		name:   "stale view refuses what etcd allows: decided again on a fresh read",
		frozen: true,
		setup: func(t *testing.T, e *env) {
			if _, err := e.s.ClaimActualLRP(context.Background(), e.key(0), e.ik("cell-a", 0), e.fences["cell-a"]); err != nil {
				t.Fatal(err)
			}
			e.setActual(t, 0, stateUnclaimed, "") // the view still says CLAIMED
		},
		batch: func(e *env) []*basinv1.ActualLRPTransition {
			return []*basinv1.ActualLRPTransition{e.claim("cell-b", 0), e.claim("cell-a", 1)}
		},
		want:      []batchOutcome{{[]codes.Code{ok, ok}, map[int32]string{0: "CLAIMED@cell-b", 1: "CLAIMED@cell-a"}}},
		conflicts: 0,
	}, {
		name:   "stale view allows what etcd refuses: the guard fails and the retry refuses",
		frozen: true,
		setup: func(t *testing.T, e *env) {
			e.setActual(t, 0, stateClaimed, "cell-a") // the view still says UNCLAIMED
		},
		batch: func(e *env) []*basinv1.ActualLRPTransition {
			return []*basinv1.ActualLRPTransition{e.claim("cell-b", 0)}
		},
		want:      []batchOutcome{{[]codes.Code{fp}, map[int32]string{0: "CLAIMED@cell-a"}}},
		conflicts: 1,
		recheck:   true,
	}, {
		name:   "stale view guesses the wrong step: the guard fails and the retry succeeds",
		frozen: true,
		setup: func(t *testing.T, e *env) {
			e.setActual(t, 0, stateClaimed, "cell-a") // the view still says UNCLAIMED
		},
		batch: func(e *env) []*basinv1.ActualLRPTransition {
			return []*basinv1.ActualLRPTransition{e.start("cell-a", 0), e.claim("cell-a", 1)}
		},
		want:      []batchOutcome{{[]codes.Code{ok, ok}, map[int32]string{0: "RUNNING@cell-a", 1: "CLAIMED@cell-a"}}},
		conflicts: 1,
	}, {
		name:   "stale view still has a removed instance",
		frozen: true,
		setup: func(t *testing.T, e *env) {
			k := e.s.Keys()
			if _, err := testClient.Txn(context.Background()).Then(
				clientv3.OpDelete(k.Actual("web", 0)), clientv3.OpDelete(k.Unclaimed("web", 0))).Commit(); err != nil {
				t.Fatal(err)
			}
		},
		batch: func(e *env) []*basinv1.ActualLRPTransition {
			return []*basinv1.ActualLRPTransition{e.claim("cell-a", 0)}
		},
		want:      []batchOutcome{{[]codes.Code{nf}, map[int32]string{0: "GONE"}}},
		conflicts: 1,
		recheck:   true,
	}, {
		name: "a lost fence fails its item only",
		batch: func(e *env) []*basinv1.ActualLRPTransition {
			return []*basinv1.ActualLRPTransition{e.claim("cell-c", 0), e.claim("cell-a", 1), e.start("cell-c", 2)}
		},
		want: []batchOutcome{{[]codes.Code{fp, ok, fp},
			map[int32]string{0: "UNCLAIMED", 1: "CLAIMED@cell-a", 2: "UNCLAIMED"}}},
		conflicts: 0,
		recheck:   true,
		check: func(t *testing.T, e *env, rs []*basinv1.ActualLRPTransitionResult) {
			for _, i := range []int{0, 2} {
				if !strings.Contains(rs[i].GetMessage(), ErrFenceLost.Error()) {
					t.Errorf("item %d: %q does not say the fence is lost", i, rs[i].GetMessage())
				}
			}
		},
	}, {
		name: "two cells claim one instance: one wins",
		batch: func(e *env) []*basinv1.ActualLRPTransition {
			return []*basinv1.ActualLRPTransition{e.claim("cell-a", 0), e.claim("cell-b", 0)}
		},
		want: []batchOutcome{
			{[]codes.Code{ok, fp}, map[int32]string{0: "CLAIMED@cell-a"}},
			{[]codes.Code{fp, ok}, map[int32]string{0: "CLAIMED@cell-b"}},
		},
		conflicts: -1,
	}, {
		name: "claim and start of one instance, in either order",
		batch: func(e *env) []*basinv1.ActualLRPTransition {
			return []*basinv1.ActualLRPTransition{e.claim("cell-a", 0), e.start("cell-a", 0)}
		},
		want:      []batchOutcome{{[]codes.Code{ok, ok}, map[int32]string{0: "RUNNING@cell-a"}}},
		conflicts: -1,
	}, {
		name:   "claim and crash of one instance, on a frozen view",
		frozen: true,
		batch: func(e *env) []*basinv1.ActualLRPTransition {
			return []*basinv1.ActualLRPTransition{e.claim("cell-a", 0), e.crash("cell-a", 0)}
		},
		want: []batchOutcome{
			{[]codes.Code{ok, ok}, map[int32]string{0: "CRASHED"}},        // claim, then crash
			{[]codes.Code{ok, fp}, map[int32]string{0: "CLAIMED@cell-a"}}, // crash refused, then claim
		},
		conflicts: -1,
	}, {
		name: "one instance many times",
		batch: func(e *env) []*basinv1.ActualLRPTransition {
			return []*basinv1.ActualLRPTransition{
				e.claim("cell-a", 0), e.start("cell-a", 0), e.claim("cell-a", 0), e.start("cell-a", 0),
				e.claim("cell-a", 1), e.claim("cell-a", 1),
			}
		},
		want:      []batchOutcome{{[]codes.Code{ok, ok, ok, ok, ok, ok}, map[int32]string{0: "RUNNING@cell-a", 1: "CLAIMED@cell-a"}}},
		conflicts: -1,
	}, {
		name:      "more writes than one etcd transaction holds",
		instances: 300,
		batch: func(e *env) []*basinv1.ActualLRPTransition {
			var ts []*basinv1.ActualLRPTransition
			for i := range int32(300) {
				ts = append(ts, e.claim("cell-a", i))
			}
			return ts
		},
		want: func() []batchOutcome {
			o := batchOutcome{states: map[int32]string{}}
			for i := range int32(300) {
				o.codes = append(o.codes, ok)
				o.states[i] = "CLAIMED@cell-a"
			}
			return []batchOutcome{o}
		}(),
		conflicts: 0,
	}}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			var s *Store
			if tc.frozen {
				s = startFrozenStore(t)
			} else {
				s = startStore(t, StoreConfig{})
			}
			n := tc.instances
			if n == 0 {
				n = 4
			}
			if _, err := s.DesireLRP(ctx, testSchedule("web", n), testRun()); err != nil {
				t.Fatal(err)
			}
			e := &env{s: s, api: NewAPI(s, Limits{}), revs: map[int32]int64{}, fences: map[string]*basinv1.Fence{
				"cell-a": registerCell(t, s, "cell-a"),
				"cell-b": registerCell(t, s, "cell-b"),
				"cell-c": registerCell(t, s, "cell-c"),
			}}
			if _, err := testClient.Delete(ctx, e.fences["cell-c"].GetKey()); err != nil {
				t.Fatal(err)
			}
			registerCell(t, s, "cell-c") // its old fence is lost
			if tc.setup != nil {
				tc.setup(t, e)
			}
			ts := tc.batch(e)
			conflicts := counterValue(t, s.metrics.conflicts)

			resp, err := e.api.ApplyActualLRPTransitions(ctx, &basinv1.ApplyActualLRPTransitionsRequest{Transitions: ts})
			if err != nil {
				t.Fatal(err)
			}
			rs := resp.GetResults()
			if len(rs) != len(ts) {
				t.Fatalf("%d results for %d transitions", len(rs), len(ts))
			}
			got := batchOutcome{states: map[int32]string{}}
			for i, r := range rs {
				got.codes = append(got.codes, codes.Code(r.GetCode()))
				if (r.GetCode() == 0) != (r.GetActualLrp() != nil) {
					t.Errorf("item %d: code %d with actual %v", i, r.GetCode(), r.GetActualLrp())
				}
				if r.GetCode() == 0 && r.GetActualLrp().GetRevision() == 0 {
					t.Errorf("item %d: no revision", i)
				}
			}
			for i := range n {
				a, err := s.GetActualLRP(ctx, "web", i)
				switch {
				case errors.Is(err, ErrNotFound):
					got.states[i] = "GONE"
					continue
				case err != nil:
					t.Fatal(err)
				}
				got.states[i] = placed(a)
				checkIndexKeys(t, s, a)
			}
			matched := false
			for _, w := range tc.want {
				matched = matched || slices.Equal(w.codes, got.codes) && statesMatch(w.states, got.states)
			}
			if !matched {
				t.Errorf("got codes %v, states %v; want one of %+v", got.codes, got.states, tc.want)
				for i, r := range rs {
					if r.GetCode() != 0 {
						t.Logf("item %d: %s", i, r.GetMessage())
					}
				}
			}
			if d := counterValue(t, s.metrics.conflicts) - conflicts; tc.conflicts >= 0 && d != float64(tc.conflicts) {
				t.Errorf("%v guard conflicts, want %d", d, tc.conflicts)
			}
			if tc.recheck {
				for i, r := range rs {
					if r.GetCode() == 0 || ts[i].GetTransition() == nil {
						continue
					}
					if again := e.single(ctx, ts[i]); again.GetCode() != r.GetCode() || again.GetMessage() != r.GetMessage() {
						t.Errorf("item %d: batch gave %v %q, the single call %v %q",
							i, codes.Code(r.GetCode()), r.GetMessage(), codes.Code(again.GetCode()), again.GetMessage())
					}
				}
			}
			if tc.check != nil {
				tc.check(t, e, rs)
			}
		})
	}
}

// A batch whose writes never complete returns when its context ends, each
// item with the error its single call would get, rather than hanging.
func TestApplyActualChangesEndsWithContext(t *testing.T) {
	s, stop := startFrozenStoreStoppable(t)
	if _, err := s.DesireLRP(context.Background(), testSchedule("web", 2), testRun()); err != nil {
		t.Fatal(err)
	}
	e := &batchEnv{s: s, api: NewAPI(s, Limits{}), fences: map[string]*basinv1.Fence{"cell-a": registerCell(t, s, "cell-a")}}
	stop()
	ts := []*basinv1.ActualLRPTransition{e.claim("cell-a", 0), e.start("cell-a", 1), e.claim("cell-a", 1)}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	resp, err := e.api.ApplyActualLRPTransitions(ctx, &basinv1.ApplyActualLRPTransitionsRequest{Transitions: ts})
	if err != nil {
		t.Fatal(err)
	}
	for i, r := range resp.GetResults() {
		if codes.Code(r.GetCode()) != codes.DeadlineExceeded {
			t.Errorf("item %d: %v %q, want DeadlineExceeded", i, codes.Code(r.GetCode()), r.GetMessage())
		}
		sctx, scancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		if again := e.single(sctx, ts[i]); again.GetMessage() != r.GetMessage() {
			t.Errorf("item %d: batch says %q, the single call %q", i, r.GetMessage(), again.GetMessage())
		}
		scancel()
	}
}

// statesMatch compares the instances want names; others may be anything.
func statesMatch(want, got map[int32]string) bool {
	for i, w := range want {
		if got[i] != w {
			return false
		}
	}
	return true
}

// checkIndexKeys: an instance is on the auction queue iff UNCLAIMED (without
// a placement error) and in a cell's index iff CLAIMED or RUNNING there.
func checkIndexKeys(t *testing.T, s *Store, a *basinv1.ActualLRP) {
	t.Helper()
	k := s.Keys()
	guid, i := a.GetKey().GetProcessGuid(), a.GetKey().GetIndex()
	exists := func(key string) bool {
		resp, err := testClient.Get(context.Background(), key, clientv3.WithCountOnly())
		if err != nil {
			t.Fatal(err)
		}
		return resp.Count > 0
	}
	if q, want := exists(k.Unclaimed(guid, i)), a.GetState() == stateUnclaimed && a.GetPlacementError() == ""; q != want {
		t.Errorf("%s/%d is %s; queued=%v", guid, i, placed(a), q)
	}
	for _, c := range []string{"cell-a", "cell-b", "cell-c"} {
		want := a.GetInstanceKey().GetCellId() == c && (a.GetState() == stateClaimed || a.GetState() == stateRunning)
		if got := exists(k.CellIndex(c, guid, i)); got != want {
			t.Errorf("%s/%d is %s; in %s's index=%v", guid, i, placed(a), c, got)
		}
	}
}

func counterValue(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}
