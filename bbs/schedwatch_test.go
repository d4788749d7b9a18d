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

func TestWatchSchedules(t *testing.T) {
	_, cli := startServer(t, Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	revs := map[string]int64{}
	for _, g := range []string{"a", "b", "c"} {
		resp, err := cli.DesireLRP(ctx, &basinv1.DesireLRPRequest{Schedule: testSchedule(g, 1), Run: testRun()})
		if err != nil {
			t.Fatal(err)
		}
		revs[g] = resp.GetDesiredLrp().GetRevision()
	}
	stream, err := cli.WatchSchedules(ctx)
	if err != nil {
		t.Fatal(err)
	}
	follow := func(g string, rev int64) {
		t.Helper()
		if err := stream.Send(&basinv1.WatchSchedulesRequest{Follow: []*basinv1.ScheduleInterest{{ProcessGuid: g, Revision: rev}}}); err != nil {
			t.Fatal(err)
		}
	}
	route := func(g, host string) int64 {
		t.Helper()
		resp, err := cli.UpdateDesiredLRP(ctx, &basinv1.UpdateDesiredLRPRequest{ProcessGuid: g, Routes: &basinv1.RouteList{Routes: []*basinv1.Route{{Host: host}}}})
		if err != nil {
			t.Fatal(err)
		}
		return resp.GetDesiredLrp().GetRevision()
	}
	// next is the next change received; each step ends with a change the
	// test waits for, so anything sent in between shows up first.
	var pending []*basinv1.ScheduleChange
	next := func() *basinv1.ScheduleChange {
		t.Helper()
		for len(pending) == 0 {
			resp, err := stream.Recv()
			if err != nil {
				t.Fatalf("receive: %v", err)
			}
			pending = resp.GetChanges()
		}
		c := pending[0]
		pending = pending[1:]
		return c
	}
	expect := func(step, g string, rev int64, host string) {
		t.Helper()
		c := next()
		if c.GetSchedule().GetProcessGuid() != g || c.GetRevision() != rev || c.GetSchedule().GetRoutes()[0].GetHost() != host {
			t.Fatalf("%s: got %s at %d routed to %v, want %s at %d routed to %s", step, c.GetSchedule().GetProcessGuid(), c.GetRevision(),
				c.GetSchedule().GetRoutes(), g, rev, host)
		}
	}

	follow("a", 0)
	expect("following from 0 sends the current schedule", "a", revs["a"], "a.apps.example.com")
	follow("b", revs["b"])
	rev := route("c", "c2.example.com") // not followed: not sent
	rev = route("b", "b2.example.com")
	expect("a schedule held is not sent again; a change is", "b", rev, "b2.example.com")
	rev = route("a", "a2.example.com")
	expect("changes of a followed LRP are sent", "a", rev, "a2.example.com")
	old := rev
	rev = route("a", "a3.example.com")
	expect("a change", "a", rev, "a3.example.com")
	// The view holds a3 now (it published it): following again from an
	// older revision sends it again.
	follow("a", old)
	expect("the newer schedule on following again", "a", rev, "a3.example.com")
	if err := stream.Send(&basinv1.WatchSchedulesRequest{Unfollow: []string{"a"}}); err != nil {
		t.Fatal(err)
	}
	// The unfollow is applied before the next follow is read: the stream's
	// messages are handled in order.
	follow("c", 0)
	cRev := revsNow(ctx, t, cli, "c")
	expect("c from 0 after its change", "c", cRev, "c2.example.com")
	route("a", "a4.example.com") // unfollowed: not sent
	rev = route("b", "b3.example.com")
	expect("an unfollowed LRP sends nothing", "b", rev, "b3.example.com")
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); err == nil {
		t.Fatal("stream went on after CloseSend")
	}
}

func revsNow(ctx context.Context, t *testing.T, cli *Client, g string) int64 {
	t.Helper()
	resp, err := cli.GetDesiredLRP(ctx, &basinv1.GetDesiredLRPRequest{ProcessGuid: g})
	if err != nil {
		t.Fatal(err)
	}
	return resp.GetDesiredLrp().GetRevision()
}

func TestWatchSchedulesRefusesBadRequests(t *testing.T) {
	_, cli := startServer(t, Config{})
	many := make([]*basinv1.ScheduleInterest, maxFollowPerMessage+1)
	for i := range many {
		many[i] = &basinv1.ScheduleInterest{ProcessGuid: "a"}
	}
	for _, tc := range []struct {
		name  string
		req   *basinv1.WatchSchedulesRequest
		field string
	}{
		{"bad guid", &basinv1.WatchSchedulesRequest{Follow: []*basinv1.ScheduleInterest{{ProcessGuid: "a"}, {ProcessGuid: "no/slash"}}}, "follow[1].process_guid"},
		{"negative revision", &basinv1.WatchSchedulesRequest{Follow: []*basinv1.ScheduleInterest{{ProcessGuid: "a", Revision: -1}}}, "follow[0].revision"},
		{"too many", &basinv1.WatchSchedulesRequest{Follow: many}, "follow"},
		{"bad unfollow", &basinv1.WatchSchedulesRequest{Unfollow: []string{""}}, "unfollow[0]"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			stream, err := cli.WatchSchedules(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if err := stream.Send(tc.req); err != nil {
				t.Fatal(err)
			}
			_, err = stream.Recv()
			if status.Code(err) != codes.InvalidArgument || !strings.Contains(status.Convert(err).Message(), tc.field) {
				t.Fatalf("got %v, want INVALID_ARGUMENT naming %s", err, tc.field)
			}
		})
	}
}

func TestFollowerFallingBehindEnds(t *testing.T) {
	fs := newFollowers()
	f := fs.open()
	e := &kvEntry{val: marshal(testSchedule("a", 1)), modRev: 5}
	if err := fs.follow(f, "a", 5, func(string) *kvEntry { return e }); err != nil {
		t.Fatal(err)
	}
	if len(f.out) != 0 {
		t.Fatalf("a schedule at the held revision was sent")
	}
	for range followerBuffer {
		fs.publish("a", e)
	}
	select {
	case <-f.behind:
		t.Fatal("behind before the buffer overflowed")
	default:
	}
	fs.publish("a", e)
	select {
	case <-f.behind:
	default:
		t.Fatal("not behind after the buffer overflowed")
	}
	fs.close(f)
	if len(fs.byGUID) != 0 {
		t.Fatalf("closed follower still registered: %v", fs.byGUID)
	}
}
