package routetable

import (
	"context"
	"io"
	"log/slog"
	"strconv"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"

	"github.com/basinpaas/basin/bbs/embeddedetcd"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

func startEtcd(t *testing.T) *clientv3.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	e, err := embeddedetcd.Start(ctx, embeddedetcd.Config{Dir: t.TempDir()})
	if err != nil {
		t.Fatalf("start etcd: %v", err)
	}
	t.Cleanup(e.Close)
	cli, err := e.Client()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

func routeValue(t *testing.T, host string, port uint32) string {
	b, err := proto.Marshal(&basinv1.RouteEndpoint{Host: host, ProcessGuid: "g", Address: "127.0.0.1", Port: port})
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestSyncerRelistsAfterCompaction loses the watch's start revision to a
// compaction between list and watch: the syncer must list again and end up
// with exactly what etcd holds.
func TestSyncerRelistsAfterCompaction(t *testing.T) {
	cli := startEtcd(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	const prefix = "/t/routes/"
	put := func(key, host string, port uint32) {
		if _, err := cli.Put(ctx, prefix+key, routeValue(t, host, port)); err != nil {
			t.Fatal(err)
		}
	}
	put("a.test/g/0", "a.test", 1001)
	put("b.test/g/0", "b.test", 1002)

	tb := New()
	s := NewSyncer(tb, cli, prefix, slog.New(slog.NewTextHandler(io.Discard, nil)))
	s.retry = 10 * time.Millisecond
	gapped := false
	s.afterList = func(ctx context.Context, rev int64) {
		if gapped {
			return
		}
		gapped = true
		// Changes the watch from rev+1 would have carried, then gone.
		put("c.test/g/0", "c.test", 1003)
		if _, err := cli.Delete(ctx, prefix+"a.test/g/0"); err != nil {
			t.Error(err)
		}
		put("b.test/g/0", "b.test", 2002)
		resp, err := cli.Put(ctx, "/t/other", "x")
		if err != nil {
			t.Error(err)
			return
		}
		if _, err := cli.Compact(ctx, resp.Header.Revision); err != nil {
			t.Error(err)
		}
	}
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()

	waitFor(t, "the re-list", func() bool { return s.Relists() >= 2 })
	waitFor(t, "the table to match etcd", func() bool {
		b := tb.Lookup("b.test", "/")
		return tb.Lookup("a.test", "/") == nil && tb.Lookup("c.test", "/") != nil &&
			b != nil && b.Endpoints[0].Addr == "127.0.0.1:2002"
	})

	// And the watch after the re-list carries live changes.
	put("d.test/g/0", "d.test", 1004)
	waitFor(t, "a change after the re-list", func() bool { return tb.Lookup("d.test", "/") != nil })
	if _, err := cli.Delete(ctx, prefix+"d.test/g/0"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a delete after the re-list", func() bool { return tb.Lookup("d.test", "/") == nil })

	// A value that does not decode removes the route instead of keeping a stale one.
	if _, err := cli.Put(ctx, prefix+"c.test/g/0", "not a protobuf \xff"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a bad value to remove its route", func() bool { return tb.Lookup("c.test", "/") == nil })

	cancel()
	if err := <-done; err != nil {
		t.Fatalf("run: %v", err)
	}
	if n := tb.Len(); n != 1 {
		t.Fatalf("table holds %d routes, want 1 (b.test)", n)
	}
}

func TestDecodeEndpoint(t *testing.T) {
	cases := []struct {
		re      *basinv1.RouteEndpoint
		want    string
		wantErr bool
	}{
		{&basinv1.RouteEndpoint{Host: "h", Address: "10.0.0.1", Port: 8080}, "10.0.0.1:8080", false},
		{&basinv1.RouteEndpoint{Host: "h", Address: "::1", Port: 80}, "[::1]:80", false},
		{&basinv1.RouteEndpoint{Host: "", Address: "10.0.0.1", Port: 80}, "", true},
		{&basinv1.RouteEndpoint{Host: "h", Address: "10.0.0.1", Port: 0}, "", true},
		{&basinv1.RouteEndpoint{Host: "h", Address: "10.0.0.1", Port: 70000}, "", true},
	}
	for i, tc := range cases {
		t.Run(strconv.Itoa(i), func(t *testing.T) {
			b, _ := proto.Marshal(tc.re)
			e, err := DecodeEndpoint(b)
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error %v", err, tc.wantErr)
			}
			if err == nil && e.Addr != tc.want {
				t.Fatalf("addr %q, want %q", e.Addr, tc.want)
			}
		})
	}
}
