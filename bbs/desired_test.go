package bbs

import (
	"context"
	"strings"
	"testing"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestListDesiredLRPsAtRevision(t *testing.T) {
	srv, cli := startServer(t, Config{})
	ctx := context.Background()
	s := srv.Store()
	desire := func(guid string, instances int32) int64 {
		t.Helper()
		resp, err := cli.DesireLRP(ctx, &basinv1.DesireLRPRequest{Schedule: testSchedule(guid, instances), Run: testRun()})
		if err != nil {
			t.Fatal(err)
		}
		return resp.GetDesiredLrp().GetRevision()
	}
	desire("kept", 1)
	desire("updated", 1)
	three := int32(3)
	upd, err := cli.UpdateDesiredLRP(ctx, &basinv1.UpdateDesiredLRPRequest{ProcessGuid: "updated", Instances: &three})
	if err != nil {
		t.Fatal(err)
	}
	desire("gone", 1)
	if _, err := cli.RemoveDesiredLRP(ctx, &basinv1.RemoveDesiredLRPRequest{ProcessGuid: "gone"}); err != nil {
		t.Fatal(err)
	}
	fresh := desire("fresh", 1)
	// The last write is a claim, as a cell's read follows its claim: the
	// desired view's revision moves only with desired keys, so reaching
	// this one takes a progress notification from etcd.
	claimed, err := cli.ClaimActualLRP(ctx, &basinv1.ClaimActualLRPRequest{
		Key:         &basinv1.ActualLRPKey{ProcessGuid: "kept", Index: 0},
		InstanceKey: &basinv1.ActualLRPInstanceKey{InstanceGuid: "i0", CellId: "cell-a"},
		Fence:       registerCell(t, s, "cell-a")})
	if err != nil {
		t.Fatal(err)
	}
	claimRev := claimed.GetActualLrp().GetRevision()
	now, err := testClient.Get(ctx, "any")
	if err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name   string
		guids  []string
		minRev int64
		want   []string // process guids, in order
		source string   // view, etcd, or "" for a read that counts neither
		code   codes.Code
	}{
		{"at a claim's revision", []string{"kept", "unknown"}, claimRev, []string{"kept"}, "view", codes.OK},
		{"desired just before through the BBS", []string{"fresh"}, fresh, []string{"fresh"}, "view", codes.OK},
		{"updated", []string{"updated"}, upd.GetDesiredLrp().GetRevision(), []string{"updated"}, "view", codes.OK},
		{"deleted", []string{"gone", "kept", "fresh"}, now.Header.Revision, []string{"kept", "fresh"}, "view", codes.OK},
		{"far in the future falls back to etcd", []string{"updated", "gone", "kept"}, now.Header.Revision + 1_000_000, []string{"updated", "kept"}, "etcd", codes.OK},
		{"zero reads etcd as before", []string{"fresh", "gone", "kept"}, 0, []string{"fresh", "kept"}, "", codes.OK},
		{"negative", []string{"kept"}, -1, nil, "", codes.InvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			viewBefore := counterValue(t, s.metrics.desiredReads.WithLabelValues("view"))
			etcdBefore := counterValue(t, s.metrics.desiredReads.WithLabelValues("etcd"))
			resp, err := cli.ListDesiredLRPs(ctx, &basinv1.ListDesiredLRPsRequest{ProcessGuids: tt.guids, MinRevision: tt.minRev})
			if status.Code(err) != tt.code {
				t.Fatalf("got %v, want %v", err, tt.code)
			}
			if err != nil {
				if msg := status.Convert(err).Message(); !strings.HasPrefix(msg, "min_revision: ") {
					t.Errorf("message %q does not name min_revision", msg)
				}
				return
			}
			var got []string
			for _, d := range resp.GetDesiredLrps() {
				guid := d.GetSchedule().GetProcessGuid()
				got = append(got, guid)
				// The view answers what etcd holds, revision included.
				want, err := s.GetDesiredLRP(ctx, guid)
				if err != nil {
					t.Fatalf("read %s from etcd: %v", guid, err)
				}
				if d.GetRevision() != want.GetRevision() || d.GetSchedule().GetInstances() != want.GetSchedule().GetInstances() ||
					d.GetRun().GetStartCommand() != want.GetRun().GetStartCommand() {
					t.Errorf("%s: got %v, etcd holds %v", guid, d, want)
				}
			}
			if strings.Join(got, ",") != strings.Join(tt.want, ",") {
				t.Errorf("got %v, want %v", got, tt.want)
			}
			if d := counterValue(t, s.metrics.desiredReads.WithLabelValues("view")) - viewBefore; d != b2f(tt.source == "view") {
				t.Errorf("%v reads answered from the view, want source %q", d, tt.source)
			}
			if d := counterValue(t, s.metrics.desiredReads.WithLabelValues("etcd")) - etcdBefore; d != b2f(tt.source == "etcd") {
				t.Errorf("%v reads answered from etcd after waiting, want source %q", d, tt.source)
			}
		})
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
