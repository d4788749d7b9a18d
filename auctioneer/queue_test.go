package auctioneer

import (
	"testing"
	"time"

	"github.com/basinpaas/basin/bbs"
)

func TestQueue(t *testing.T) {
	keys := bbs.NewKeys("/q/")
	q := newQueue(keys)
	now := time.Unix(1000, 0)
	a, b, task := keys.Unclaimed("app", 0), keys.Unclaimed("app", 1), keys.PendingTask("t1")
	q.put(a)
	q.put(b)
	q.put(task)
	q.put(keys.Prefix + "index/unclaimed/garbage")

	got := q.take(now, 2, 10*time.Second)
	if len(got) != 2 || got[0].key != a || got[1].key != b {
		t.Fatalf("take = %+v, want the two oldest", got)
	}
	if got[0].kind != kindLRP || got[0].guid != "app" || got[1].index != 1 {
		t.Errorf("parsed %+v", got)
	}
	// Taken items are held back while they are auctioned.
	if rest := q.take(now, 10, time.Second); len(rest) != 1 || rest[0].kind != kindTask || rest[0].guid != "t1" {
		t.Fatalf("second take = %+v, want the task only", rest)
	}
	if n, next := q.due(now); n != 0 || !next.Equal(now.Add(time.Second)) {
		t.Errorf("due = %d, %s", n, next)
	}
	// A failure counts and delays; a re-put is a new incarnation.
	if n := q.retry(a, "insufficient resources: memory", now.Add(500*time.Millisecond)); n != 1 {
		t.Errorf("attempts %d, want 1", n)
	}
	if n := q.retry(a, "insufficient resources: memory", now); n != 2 {
		t.Errorf("attempts %d, want 2", n)
	}
	q.put(a)
	if n := q.retry(a, "x", now); n != 1 {
		t.Errorf("attempts after re-put %d, want 1", n)
	}
	if n := q.retry("/q/index/unclaimed/gone/0", "x", now); n != 0 {
		t.Errorf("retry of an absent key = %d", n)
	}
	// A re-list keeps state of what is still there and drops the rest,
	// only under its own prefix.
	q.replaceUnder(keys.UnclaimedPrefix(), []string{a, keys.Unclaimed("app", 2)})
	if q.len() != 3 {
		t.Errorf("len %d, want 3 (a, app/2, the task)", q.len())
	}
	if n := q.retry(a, "x", now); n != 2 {
		t.Errorf("attempts kept across re-list: %d, want 2", n)
	}
	q.del(a)
	if q.len() != 2 {
		t.Errorf("len %d after delete, want 2", q.len())
	}
}

func TestReasonLabel(t *testing.T) {
	for in, want := range map[string]string{
		"no cell with stack windows":        "no cell with stack",
		"no cell with placement tags [gpu]": "no cell with placement tags",
		"cell c1 unreachable":               "cell unreachable",
		"insufficient resources: memory":    "insufficient resources: memory",
	} {
		if got := reasonLabel(in); got != want {
			t.Errorf("reasonLabel(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestBusyPause(t *testing.T) {
	const ms = time.Millisecond
	for _, tc := range []struct {
		name               string
		due, maxBatch      int
		lastTook, sinceEnd time.Duration
		busyWindow, want   time.Duration
	}{
		{"nothing due: the idle path's window applies instead", 0, 100, 300 * ms, 0, time.Second, 0},
		{"a full batch goes at once", 100, 100, 300 * ms, 0, time.Second, 0},
		{"twice the last auction", 10, 100, 300 * ms, 0, time.Second, 600 * ms},
		{"less what passed since it ended", 10, 100, 300 * ms, 250 * ms, time.Second, 350 * ms},
		{"at most the busy window", 10, 100, 2 * time.Second, 0, time.Second, time.Second},
		{"a quick auction adds little", 10, 100, 5 * ms, 0, time.Second, 10 * ms},
		{"long past", 10, 100, 300 * ms, time.Second, time.Second, 0},
		{"first auction of a term", 10, 100, 0, time.Hour, time.Second, 0},
	} {
		if got := busyPause(tc.due, tc.maxBatch, tc.lastTook, tc.sinceEnd, tc.busyWindow); got != tc.want {
			t.Errorf("%s: busyPause = %v, want %v", tc.name, got, tc.want)
		}
	}
}
