package bbs

import (
	"context"
	"strings"
	"testing"
	"time"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
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
