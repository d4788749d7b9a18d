package rep

import (
	"time"

	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/basinpaas/basin/cell/executor"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

const (
	stateUnclaimed = basinv1.ActualLRPState_ACTUAL_LRP_STATE_UNCLAIMED
	stateClaimed   = basinv1.ActualLRPState_ACTUAL_LRP_STATE_CLAIMED
	stateRunning   = basinv1.ActualLRPState_ACTUAL_LRP_STATE_RUNNING
	stateCrashed   = basinv1.ActualLRPState_ACTUAL_LRP_STATE_CRASHED
)

func TestPerformAcceptsWhatFits(t *testing.T) {
	e := newEnv(t, func(c *Config) {
		c.Capacity = &basinv1.CellCapacity{MemoryMb: 256, DiskMb: 200, Containers: 3}
	})
	// Nothing is desired: claims fail and reservations are released, but
	// Perform decides on resources alone, at once.
	tests := []struct {
		name   string
		start  *basinv1.LRPStart
		reason string
	}{
		{"fits", lrpStart("a", 0, 128), ""},
		{"memory", lrpStart("a", 1, 200), "insufficient resources: memory"},
		{"disk", &basinv1.LRPStart{Key: &basinv1.ActualLRPKey{ProcessGuid: "a", Index: 2}, Stack: "tiny",
			Resources: &basinv1.ResourceLimits{MemoryMb: 1, DiskMb: 500}}, "insufficient resources: disk"},
		{"stack", &basinv1.LRPStart{Key: &basinv1.ActualLRPKey{ProcessGuid: "a", Index: 3}, Stack: "bookworm",
			Resources: &basinv1.ResourceLimits{MemoryMb: 1, DiskMb: 1}}, "stack bookworm not on this cell"},
	}
	// Hold every reservation: the fake never gets a claimed instance, so
	// block the release by making the claim wait on a desired LRP that
	// exists and a start that never turns healthy.
	e.exec.autoHealthy = false
	e.desire("a", 4, 1)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp := e.perform(tt.start)
			got := ""
			if len(resp.GetRejectedLrps()) == 1 {
				got = resp.GetRejectedLrps()[0].GetReason()
			}
			if got != tt.reason {
				t.Errorf("reason %q, want %q", got, tt.reason)
			}
		})
	}
	st := e.rep.State()
	if st.GetAvailable().GetMemoryMb() != 128 || len(st.GetLrps()) != 1 || st.GetAvailable().GetContainers() != 2 {
		t.Errorf("state %v: want 128 MB and 2 containers left, one LRP", st)
	}
	if resp := e.perform(lrpStart("a", 0, 1)); len(resp.GetRejectedLrps()) != 1 || resp.GetRejectedLrps()[0].GetReason() != "instance already on this cell" {
		t.Errorf("a duplicate start was not rejected: %v", resp)
	}
}

func TestConcurrentPerformsNeverOvercommit(t *testing.T) {
	e := newEnv(t, func(c *Config) {
		c.Capacity = &basinv1.CellCapacity{MemoryMb: 1000, DiskMb: 100000, Containers: 1000}
	})
	e.exec.autoHealthy = false
	e.desire("many", 200, 10)
	var wg sync.WaitGroup
	var mu sync.Mutex
	accepted := 0
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var starts []*basinv1.LRPStart
			for j := range 10 {
				starts = append(starts, lrpStart("many", int32(i*10+j), 10))
			}
			resp, err := e.rep.Perform(e.ctx, &basinv1.PerformRequest{Lrps: starts})
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			accepted += len(starts) - len(resp.GetRejectedLrps())
			mu.Unlock()
		}()
	}
	wg.Wait()
	if accepted != 100 {
		t.Errorf("accepted %d instances of 10 MB on 1000 MB, want exactly 100", accepted)
	}
}

func TestStartMarksRunningThenRoutes(t *testing.T) {
	e := newEnv(t)
	e.desire("web", 2, 64)
	if resp := e.perform(lrpStart("web", 0, 64), lrpStart("web", 1, 64)); len(resp.GetRejectedLrps()) != 0 {
		t.Fatalf("rejected: %v", resp.GetRejectedLrps())
	}
	for i := range int32(2) {
		a := e.waitState("web", i, stateRunning)
		if a.GetInstanceKey().GetCellId() != "cell-a" || a.GetNetInfo().GetAddress() != "127.0.0.1" || len(a.GetNetInfo().GetPorts()) != 1 {
			t.Errorf("actual %v: want RUNNING on cell-a with net info", a)
		}
		var ep *basinv1.RouteEndpoint
		e.waitFor("route", func() bool { ep, _ = e.route("web.example.com", "web", i); return ep != nil })
		want := &basinv1.RouteEndpoint{Host: "web.example.com", ProcessGuid: "web", Index: i,
			InstanceGuid: a.GetInstanceKey().GetInstanceGuid(), Address: "127.0.0.1",
			Port: a.GetNetInfo().GetPorts()[0].GetHostPort(), Tags: map[string]string{"cell_id": "cell-a"}}
		if !proto.Equal(ep, want) {
			t.Errorf("route %v, want %v", ep, want)
		}
		in := e.exec.get(a.GetInstanceKey().GetInstanceGuid())
		if in.spec.StartCommand != "./server" || in.spec.MemoryMB != 64 || in.spec.Labels[LabelCellID] != "cell-a" {
			t.Errorf("spec %+v", in.spec)
		}
	}
	if n := e.rep.DropletFetches(); n != 1 {
		t.Errorf("droplet fetched %d times for two instances, want 1", n)
	}
	// Presence is under a lease, and every instance is in State.
	resp, err := e.etcd.Get(e.ctx, e.keys.Cell("cell-a"))
	if err != nil || len(resp.Kvs) != 1 || resp.Kvs[0].Lease == 0 {
		t.Fatalf("presence %v %v: want a key under a lease", resp, err)
	}
	if st := e.rep.State(); len(st.GetLrps()) != 2 || st.GetAvailable().GetMemoryMb() != 1024-128 {
		t.Errorf("state %v", st)
	}
}

func TestClaimLostReleasesTheReservation(t *testing.T) {
	e := newEnv(t)
	e.desire("taken", 1, 64)
	other := e.registerOtherCell("cell-b")
	if _, err := e.bbs.ClaimActualLRP(e.ctx, &basinv1.ClaimActualLRPRequest{Key: &basinv1.ActualLRPKey{ProcessGuid: "taken"},
		InstanceKey: &basinv1.ActualLRPInstanceKey{InstanceGuid: "theirs", CellId: "cell-b"}, Fence: other}); err != nil {
		t.Fatal(err)
	}
	e.perform(lrpStart("taken", 0, 64))
	e.waitFor("reservation released", func() bool { return len(e.rep.State().GetLrps()) == 0 })
	if n := len(e.exec.running()); n != 0 {
		t.Errorf("%d containers started for an instance another cell claimed", n)
	}
}

func TestCrashRemovesRouteBeforeReporting(t *testing.T) {
	e := newEnv(t)
	e.desire("crashy", 1, 64)
	e.perform(lrpStart("crashy", 0, 64))
	a := e.waitState("crashy", 0, stateRunning)
	var routeRev int64
	e.waitFor("route", func() bool { _, routeRev = e.route("crashy.example.com", "crashy", 0); return routeRev != 0 })
	guid := a.GetInstanceKey().GetInstanceGuid()
	e.exec.get(guid).logs.Append(executor.SourceApp, "stderr", "panic: out of cheese")
	e.exec.exit(guid, executor.ExitInfo{Status: 3, Reason: "app exited with status 3"})
	crashed := e.waitState("crashy", 0, stateCrashed)
	if !strings.Contains(crashed.GetCrashReason(), "app exited with status 3") || !strings.Contains(crashed.GetCrashReason(), "out of cheese") {
		t.Errorf("crash reason %q: want the exit status and the last output", crashed.GetCrashReason())
	}
	// The route's delete revision comes before the CRASHED record's.
	wch := e.etcd.Watch(e.ctx, e.keys.Route("crashy.example.com", "", "crashy", 0), clientv3.WithRev(routeRev+1))
	wr := <-wch
	if len(wr.Events) == 0 || wr.Events[0].Type != clientv3.EventTypeDelete {
		t.Fatalf("no route delete after the route was written: %+v", wr)
	}
	if del := wr.Events[0].Kv.ModRevision; del >= crashed.GetRevision() {
		t.Errorf("route deleted at revision %d, CRASHED at %d: the route must go first", del, crashed.GetRevision())
	}
	e.waitFor("resources released", func() bool { return len(e.rep.State().GetLrps()) == 0 })
}

func TestRetiredInstanceIsStopped(t *testing.T) {
	e := newEnv(t)
	e.desire("shrink", 1, 64)
	e.perform(lrpStart("shrink", 0, 64))
	a := e.waitState("shrink", 0, stateRunning)
	e.waitFor("route", func() bool { ep, _ := e.route("shrink.example.com", "shrink", 0); return ep != nil })
	if _, err := e.bbs.RetireActualLRP(e.ctx, &basinv1.RetireActualLRPRequest{Key: a.GetKey()}); err != nil {
		t.Fatal(err)
	}
	guid := a.GetInstanceKey().GetInstanceGuid()
	e.waitFor("stopped", func() bool { return e.exec.wasStopped(guid) })
	if ep, _ := e.route("shrink.example.com", "shrink", 0); ep != nil {
		t.Errorf("route %v still there after the instance was retired", ep)
	}
	e.waitFor("resources released", func() bool { return len(e.rep.State().GetLrps()) == 0 })
}

// TestRetiredInstanceLeavesTheRouterBeforeStopping: a retired instance's
// route goes first, and the container gets its stop only RouteDrain later,
// so a router that has not yet seen the deletion never sends to a stopping
// instance (what a rolling deploy needs for zero failed requests).
func TestRetiredInstanceLeavesTheRouterBeforeStopping(t *testing.T) {
	const drain = 400 * time.Millisecond
	e := newEnv(t, func(c *Config) { c.RouteDrain = drain })
	e.desire("drain", 1, 64)
	e.perform(lrpStart("drain", 0, 64))
	a := e.waitState("drain", 0, stateRunning)
	e.waitFor("route", func() bool { ep, _ := e.route("drain.example.com", "drain", 0); return ep != nil })
	if _, err := e.bbs.RetireActualLRP(e.ctx, &basinv1.RetireActualLRPRequest{Key: a.GetKey()}); err != nil {
		t.Fatal(err)
	}
	guid := a.GetInstanceKey().GetInstanceGuid()
	e.waitFor("route removed", func() bool { ep, _ := e.route("drain.example.com", "drain", 0); return ep == nil })
	gone := time.Now()
	if _, called := e.exec.stopCalled(guid); called {
		t.Fatal("the container was stopped no later than its route was removed")
	}
	e.waitFor("stopped", func() bool { return e.exec.wasStopped(guid) })
	at, _ := e.exec.stopCalled(guid)
	if d := at.Sub(gone); d < drain-100*time.Millisecond {
		t.Errorf("stop came %s after the route went, want about %s", d, drain)
	}
}

func TestRestartAdoptsOwnedAndDestroysTheRest(t *testing.T) {
	e := newEnv(t)
	e.desire("keep", 2, 64)
	e.perform(lrpStart("keep", 0, 64), lrpStart("keep", 1, 64))
	kept := e.waitState("keep", 0, stateRunning)
	e.waitState("keep", 1, stateRunning)
	if _, err := e.bbs.DesireTask(e.ctx, &basinv1.DesireTaskRequest{TaskGuid: "long", Definition: &basinv1.TaskDefinition{
		Stack: "tiny", Command: "sleep 1000", Resources: &basinv1.ResourceLimits{MemoryMb: 32, DiskMb: 32, Pids: 16}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.rep.Perform(e.ctx, &basinv1.PerformRequest{Tasks: []*basinv1.TaskStart{{TaskGuid: "long", Stack: "tiny",
		Resources: &basinv1.ResourceLimits{MemoryMb: 32, DiskMb: 32}}}}); err != nil {
		t.Fatal(err)
	}
	e.waitFor("task container", func() bool { return e.exec.get(taskInstanceGUID("long")) != nil })
	e.stop() // the cell process ends; its containers stay

	// The restarted process finds: keep/0's container (still owned), a
	// container of another cell's, one whose instance moved away, and no
	// container for keep/1.
	e.exec.mu.Lock()
	for guid, in := range e.exec.instances {
		if guid == kept.GetInstanceKey().GetInstanceGuid() {
			in.info.State = executor.StateRunning
			e.exec.preexist[guid] = in.info
		}
	}
	e.exec.instances = map[string]*fakeInst{}
	e.exec.preexist["moved"] = executor.Info{InstanceGUID: "moved", ProcessGUID: "keep", Index: 5, State: executor.StateRunning,
		Labels: map[string]string{LabelCellID: "cell-a"}}
	e.exec.preexist["neighbour"] = executor.Info{InstanceGUID: "neighbour", ProcessGUID: "x", State: executor.StateRunning,
		Labels: map[string]string{LabelCellID: "cell-b"}}
	e.exec.mu.Unlock()
	oldRev := kept.GetRevision()

	e.startRep(e.rep.cfg)
	e.exec.mu.Lock()
	adopted, destroyed := e.exec.adopted, e.exec.destroyed
	_, neighbourLeft := e.exec.preexist["neighbour"]
	e.exec.mu.Unlock()
	if len(adopted) != 1 || adopted[0] != kept.GetInstanceKey().GetInstanceGuid() {
		t.Errorf("adopted %v, want only %s", adopted, kept.GetInstanceKey().GetInstanceGuid())
	}
	if len(destroyed) != 1 || destroyed[0] != "moved" || !neighbourLeft {
		t.Errorf("destroyed %v, want only the moved instance (and the other cell's left alone)", destroyed)
	}
	if a := e.actual("keep", 0); a.GetRevision() != oldRev || a.GetState() != stateRunning {
		t.Errorf("adopted actual %v changed (revision %d before)", a, oldRev)
	}
	if ep, _ := e.route("keep.example.com", "keep", 0); ep == nil || ep.GetInstanceGuid() != kept.GetInstanceKey().GetInstanceGuid() {
		t.Errorf("route of the adopted instance %v", ep)
	}
	if a := e.waitState("keep", 1, stateCrashed); !strings.Contains(a.GetCrashReason(), "instance lost") {
		t.Errorf("instance without a container %v: want CRASHED as lost", a)
	}
	task, err := e.bbs.GetTask(e.ctx, &basinv1.GetTaskRequest{TaskGuid: "long"})
	if err != nil || task.GetTask().GetState() != basinv1.TaskState_TASK_STATE_COMPLETED || !task.GetTask().GetFailed() {
		t.Errorf("task of the previous process %v %v: want COMPLETED, failed", task, err)
	}
}

func TestLostLeaseDropsMovedInstancesThenRegistersAgain(t *testing.T) {
	e := newEnv(t)
	e.desire("part", 2, 64)
	e.perform(lrpStart("part", 0, 64), lrpStart("part", 1, 64))
	stay := e.waitState("part", 0, stateRunning)
	moved := e.waitState("part", 1, stateRunning)
	e.waitFor("routes", func() bool { ep, _ := e.route("part.example.com", "part", 0); return ep != nil })
	oldFence := e.rep.currentFence()

	// A partition: meanwhile part/1 went to another cell. Write that
	// straight into etcd, leaving this cell's index key, so only the
	// ownership check before re-registering can notice it.
	e.rep.mu.Lock()
	lease := e.rep.lease
	e.rep.mu.Unlock()
	elsewhere := proto.Clone(moved).(*basinv1.ActualLRP)
	elsewhere.InstanceKey = &basinv1.ActualLRPInstanceKey{InstanceGuid: "b-1", CellId: "cell-b"}
	elsewhere.Revision = 0
	val, _ := proto.Marshal(elsewhere)
	if _, err := e.etcd.Put(e.ctx, e.keys.Actual("part", 1), string(val)); err != nil {
		t.Fatal(err)
	}
	if _, err := e.etcd.Revoke(e.ctx, lease); err != nil {
		t.Fatal(err)
	}
	e.waitFor("new fence", func() bool {
		f := e.rep.currentFence()
		return f.GetCreateRevision() != oldFence.GetCreateRevision()
	})
	e.waitFor("moved instance stopped", func() bool { return e.exec.wasStopped(moved.GetInstanceKey().GetInstanceGuid()) })
	if e.exec.wasStopped(stay.GetInstanceKey().GetInstanceGuid()) {
		t.Error("the instance still owned was stopped")
	}
	e.waitFor("route re-written", func() bool { ep, _ := e.route("part.example.com", "part", 0); return ep != nil })
	// The old fence no longer works; the rep's new one does.
	_, err := e.bbs.CrashActualLRP(e.ctx, &basinv1.CrashActualLRPRequest{Key: stay.GetKey(), InstanceKey: stay.GetInstanceKey(), Reason: "x", Fence: oldFence})
	if err == nil {
		t.Error("a crash with the old fence was accepted")
	}
}

func TestEvacuationWaitsForTheReplacement(t *testing.T) {
	e := newEnv(t)
	e.desire("evac", 1, 64)
	e.perform(lrpStart("evac", 0, 64))
	a := e.waitState("evac", 0, stateRunning)
	guid := a.GetInstanceKey().GetInstanceGuid()
	e.waitFor("route", func() bool { ep, _ := e.route("evac.example.com", "evac", 0); return ep != nil })

	done := make(chan error, 1)
	go func() { done <- e.rep.Evacuate(e.ctx, 0) }()
	e.waitState("evac", 0, stateUnclaimed)
	if resp := e.perform(lrpStart("other", 0, 1)); len(resp.GetRejectedLrps()) != 1 || resp.GetRejectedLrps()[0].GetReason() != "cell is evacuating" {
		t.Errorf("Perform while evacuating: %v", resp)
	}
	if !e.rep.State().GetPresence().GetEvacuating() {
		t.Error("State does not say evacuating")
	}
	if resp, err := e.etcd.Get(e.ctx, e.keys.Cell("cell-a")); err != nil || len(resp.Kvs) != 1 {
		t.Errorf("presence while evacuating: %v %v", resp, err)
	} else {
		p := &basinv1.CellPresence{}
		if err := proto.Unmarshal(resp.Kvs[0].Value, p); err != nil || !p.GetEvacuating() || resp.Kvs[0].Lease == 0 {
			t.Errorf("presence %v (lease %x): want evacuating, under the lease", p, resp.Kvs[0].Lease)
		}
	}
	// Still serving: its index key went, but it waits for a replacement.
	if e.exec.wasStopped(guid) {
		t.Fatal("stopped before a replacement ran")
	}
	if ep, _ := e.route("evac.example.com", "evac", 0); ep == nil {
		t.Fatal("route gone before a replacement ran")
	}
	other := e.registerOtherCell("cell-b")
	ik := &basinv1.ActualLRPInstanceKey{InstanceGuid: "b-0", CellId: "cell-b"}
	if _, err := e.bbs.StartActualLRP(e.ctx, &basinv1.StartActualLRPRequest{Key: a.GetKey(), InstanceKey: ik,
		NetInfo: &basinv1.ActualLRPNetInfo{Address: "127.0.0.2"}, Fence: other}); err != nil {
		t.Fatal(err)
	}
	// The replacement writes the same route key; the evacuated instance
	// must not delete it.
	val, _ := proto.Marshal(&basinv1.RouteEndpoint{Host: "evac.example.com", ProcessGuid: "evac", InstanceGuid: "b-0", Address: "127.0.0.2", Port: 1})
	if _, err := e.etcd.Put(e.ctx, e.keys.Route("evac.example.com", "", "evac", 0), string(val)); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("Evacuate: %v", err)
	}
	if !e.exec.wasStopped(guid) {
		t.Error("evacuated instance not stopped")
	}
	if ep, _ := e.route("evac.example.com", "evac", 0); ep.GetInstanceGuid() != "b-0" {
		t.Errorf("route %v: the replacement's route was removed", ep)
	}
	if a := e.actual("evac", 0); a.GetState() != stateRunning || a.GetInstanceKey().GetCellId() != "cell-b" {
		t.Errorf("actual %v: want RUNNING on cell-b", a)
	}
}

func TestTaskRunsAndReportsItsResult(t *testing.T) {
	e := newEnv(t)
	e.exec.autoHealthy = true
	tests := []struct {
		name       string
		status     uint32
		result     string
		wantFailed bool
	}{
		{"succeeds", 0, "42", false},
		{"fails", 7, "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			guid := "task-" + tt.name
			if _, err := e.bbs.DesireTask(e.ctx, &basinv1.DesireTaskRequest{TaskGuid: guid, Definition: &basinv1.TaskDefinition{
				Stack: "tiny", Command: "echo hi", ResultFile: "/tmp/out",
				Resources: &basinv1.ResourceLimits{MemoryMb: 32, DiskMb: 32, Pids: 16}}}); err != nil {
				t.Fatal(err)
			}
			resp, err := e.rep.Perform(e.ctx, &basinv1.PerformRequest{Tasks: []*basinv1.TaskStart{{TaskGuid: guid, Stack: "tiny",
				Resources: &basinv1.ResourceLimits{MemoryMb: 32, DiskMb: 32}}}})
			if err != nil || len(resp.GetRejectedTasks()) != 0 {
				t.Fatalf("perform task: %v %v", resp, err)
			}
			inst := taskInstanceGUID(guid)
			var in *fakeInst
			e.waitFor("task container", func() bool { in = e.exec.get(inst); return in != nil })
			if !strings.Contains(in.spec.StartCommand, "echo hi") || !strings.Contains(in.spec.StartCommand, "/tmp/out") {
				t.Errorf("task command %q", in.spec.StartCommand)
			}
			e.rep.mu.Lock()
			marker := e.rep.tasks[guid].marker
			e.rep.mu.Unlock()
			in.logs.Append(executor.SourceApp, "stdout", "hi")
			if tt.result != "" {
				in.logs.Append(executor.SourceApp, "stderr", marker)
				in.logs.Append(executor.SourceApp, "stderr", "NDI=") // base64 of "42"
				in.logs.Append(executor.SourceApp, "stderr", marker+"-end")
			}
			e.exec.exit(inst, executor.ExitInfo{Status: tt.status, Reason: fmt.Sprintf("app exited with status %d", tt.status)})
			var task *basinv1.Task
			e.waitFor("task completed", func() bool {
				r, err := e.bbs.GetTask(e.ctx, &basinv1.GetTaskRequest{TaskGuid: guid})
				task = r.GetTask()
				return err == nil && task.GetState() == basinv1.TaskState_TASK_STATE_COMPLETED
			})
			if task.GetFailed() != tt.wantFailed || task.GetResult() != tt.result || task.GetCellId() != "cell-a" {
				t.Errorf("task %v: want failed=%v result %q", task, tt.wantFailed, tt.result)
			}
		})
	}
}

func TestDropletFetch(t *testing.T) {
	e := newEnv(t)
	tests := []struct {
		name string
		ref  *basinv1.DropletRef
		want string // error substring, "" for success
	}{
		{"file", e.droplet, ""},
		{"digest mismatch", &basinv1.DropletRef{Digest: "sha256:" + strings.Repeat("0", 64), Url: e.droplet.GetUrl()}, "want sha256:000"},
		{"not in the blobstore", &basinv1.DropletRef{Digest: "sha256:" + strings.Repeat("1", 64)}, "blob not found"},
		{"bad digest", &basinv1.DropletRef{Digest: "md5:x", Url: e.droplet.GetUrl()}, "not sha256"},
		{"scheme", &basinv1.DropletRef{Digest: "sha256:" + strings.Repeat("2", 64), Url: "ftp://x/y"}, "scheme"},
	}
	body := []byte("a droplet served over http")
	sum := sha256.Sum256(body)
	var served atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		served.Add(1)
		if r.URL.Path != "/d.tgz" {
			http.NotFound(w, r)
			return
		}
		w.Write(body)
	}))
	defer srv.Close()
	httpRef := &basinv1.DropletRef{Digest: "sha256:" + hex.EncodeToString(sum[:]), Url: srv.URL + "/d.tgz"}
	// A droplet named by digest alone comes from the BBS's blobstore.
	stored := []byte("a droplet in the blobstore")
	storedDigest, _, err := e.bbs.UploadBlob(context.Background(), bytes.NewReader(stored), "")
	if err != nil {
		t.Fatal(err)
	}
	tests = append(tests,
		struct {
			name string
			ref  *basinv1.DropletRef
			want string
		}{"http", httpRef, ""},
		struct {
			name string
			ref  *basinv1.DropletRef
			want string
		}{"http 404", &basinv1.DropletRef{Digest: "sha256:" + strings.Repeat("3", 64), Url: srv.URL + "/missing"}, "status 404"},
		struct {
			name string
			ref  *basinv1.DropletRef
			want string
		}{"blobstore", &basinv1.DropletRef{Digest: storedDigest}, ""},
	)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := e.rep.drops.get(context.Background(), tt.ref)
			if (err == nil) != (tt.want == "") || (err != nil && !strings.Contains(err.Error(), tt.want)) {
				t.Errorf("get = %v, want %q", err, tt.want)
			}
		})
	}
}

func TestDropletFetchedOncePerDigest(t *testing.T) {
	e := newEnv(t)
	body := []byte("one droplet, many instances")
	sum := sha256.Sum256(body)
	release := make(chan struct{})
	var served atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		served.Add(1)
		<-release // hold the download so every caller arrives during it
		w.Write(body)
	}))
	defer srv.Close()
	ref := &basinv1.DropletRef{Digest: "sha256:" + hex.EncodeToString(sum[:]), Url: srv.URL}
	var wg sync.WaitGroup
	errs := make(chan error, 10)
	for range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := e.rep.drops.get(e.ctx, ref)
			errs <- err
		}()
	}
	e.waitFor("download started", func() bool { return served.Load() == 1 })
	close(release)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if _, err := e.rep.drops.get(e.ctx, ref); err != nil {
		t.Error(err)
	}
	if n, f := served.Load(), e.rep.DropletFetches(); n != 1 || f != 1 {
		t.Errorf("served %d times, %d fetches counted; want 1", n, f)
	}
}

func TestTransientErrors(t *testing.T) {
	tests := []struct {
		code codes.Code
		want bool
	}{
		{codes.Unavailable, true}, {codes.Aborted, true}, {codes.ResourceExhausted, true},
		{codes.FailedPrecondition, false}, {codes.NotFound, false}, {codes.InvalidArgument, false},
	}
	for _, tt := range tests {
		t.Run(tt.code.String(), func(t *testing.T) {
			calls := 0
			_, err := retry(context.Background(), func(context.Context) (int, error) {
				calls++
				return 0, status.Error(tt.code, "x")
			})
			if transient(err) != tt.want || (tt.want && calls != 5) || (!tt.want && calls != 1) {
				t.Errorf("%v: transient %v after %d calls", tt.code, transient(err), calls)
			}
		})
	}
}

func TestExtractResult(t *testing.T) {
	line := func(stream, text string) executor.LogLine {
		return executor.LogLine{Source: executor.SourceApp, Stream: stream, Text: text}
	}
	tests := []struct {
		name  string
		lines []executor.LogLine
		want  string
		ok    bool
	}{
		{"none", []executor.LogLine{line("stdout", "hi")}, "", false},
		{"multi-line", []executor.LogLine{line("stderr", "M"), line("stderr", "aGVsbG8g"), line("stderr", "d29ybGQ="), line("stderr", "M-end")}, "hello world", true},
		{"stdout ignored", []executor.LogLine{line("stdout", "M"), line("stdout", "NDI="), line("stdout", "M-end")}, "", false},
		{"garbage", []executor.LogLine{line("stderr", "M"), line("stderr", "!!"), line("stderr", "M-end")}, "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := extractResult(tt.lines, "M")
			if got != tt.want || ok != tt.ok {
				t.Errorf("extractResult = %q %v, want %q %v", got, ok, tt.want, tt.ok)
			}
		})
	}
	if got := taskCommand("run it", "", "M"); got != "run it" {
		t.Errorf("taskCommand without a result file = %q", got)
	}
	if got := taskCommand("run it", "it's", "M"); !strings.Contains(got, `'it'\''s'`) {
		t.Errorf("taskCommand does not quote the result file: %q", got)
	}
}

func TestTaskPastItsTimeoutIsStoppedAndFailed(t *testing.T) {
	e := newEnv(t)
	if _, err := e.bbs.DesireTask(e.ctx, &basinv1.DesireTaskRequest{TaskGuid: "slow", Definition: &basinv1.TaskDefinition{
		Stack: "tiny", Command: "sleep 1000", TimeoutMs: 50,
		Resources: &basinv1.ResourceLimits{MemoryMb: 32, DiskMb: 32, Pids: 16}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.rep.Perform(e.ctx, &basinv1.PerformRequest{Tasks: []*basinv1.TaskStart{{TaskGuid: "slow", Stack: "tiny",
		Resources: &basinv1.ResourceLimits{MemoryMb: 32, DiskMb: 32}}}}); err != nil {
		t.Fatal(err)
	}
	var task *basinv1.Task
	e.waitFor("task completed", func() bool {
		r, err := e.bbs.GetTask(e.ctx, &basinv1.GetTaskRequest{TaskGuid: "slow"})
		task = r.GetTask()
		return err == nil && task.GetState() == basinv1.TaskState_TASK_STATE_COMPLETED
	})
	if !task.GetFailed() || task.GetFailureReason() != "task timed out" {
		t.Errorf("task %v: want failed, timed out", task)
	}
	if !e.exec.wasStopped(taskInstanceGUID("slow")) {
		t.Error("the timed-out task's container was not stopped")
	}
	e.waitFor("resources released", func() bool { return e.rep.State().GetTasks() == 0 })
}

func TestCrashDuringLeaseRenewalIsStillReported(t *testing.T) {
	e := newEnv(t)
	e.desire("unlucky", 1, 64)
	e.perform(lrpStart("unlucky", 0, 64))
	a := e.waitState("unlucky", 0, stateRunning)
	e.rep.mu.Lock()
	lease := e.rep.lease
	e.rep.mu.Unlock()
	// The presence key goes; the crash comes before (or while) the rep
	// registers again, so its first report may carry the dead fence.
	if _, err := e.etcd.Revoke(e.ctx, lease); err != nil {
		t.Fatal(err)
	}
	e.exec.exit(a.GetInstanceKey().GetInstanceGuid(), executor.ExitInfo{Status: 1, Reason: "app exited with status 1"})
	if got := e.waitState("unlucky", 0, stateCrashed); !strings.Contains(got.GetCrashReason(), "status 1") {
		t.Errorf("crash reason %q", got.GetCrashReason())
	}
}

func TestRoutesFollowTheDesiredLRP(t *testing.T) {
	e := newEnv(t)
	e.desire("remap", 1, 64)
	e.perform(lrpStart("remap", 0, 64))
	a := e.waitState("remap", 0, stateRunning)
	e.waitFor("first route", func() bool { ep, _ := e.route("remap.example.com", "remap", 0); return ep != nil })
	tests := []struct {
		name  string
		hosts []string
	}{
		{"add", []string{"remap.example.com", "www.example.com"}},
		{"replace", []string{"api.example.com"}},
		{"none", nil},
	}
	all := []string{"remap.example.com", "www.example.com", "api.example.com"}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var routes []*basinv1.Route
			for _, h := range tt.hosts {
				routes = append(routes, &basinv1.Route{Host: h})
			}
			if _, err := e.bbs.UpdateDesiredLRP(e.ctx, &basinv1.UpdateDesiredLRPRequest{ProcessGuid: "remap",
				Routes: &basinv1.RouteList{Routes: routes}}); err != nil {
				t.Fatal(err)
			}
			e.waitFor("routes "+strings.Join(tt.hosts, ","), func() bool {
				for _, h := range all {
					ep, _ := e.route(h, "remap", 0)
					want := slices.Contains(tt.hosts, h)
					if (ep != nil) != want || (ep != nil && ep.GetInstanceGuid() != a.GetInstanceKey().GetInstanceGuid()) {
						return false
					}
				}
				return true
			})
		})
	}
	if e.exec.wasStopped(a.GetInstanceKey().GetInstanceGuid()) {
		t.Error("re-routing restarted the instance")
	}
}

// recordingBBS passes every call to the BBS, noting the revisions claims
// returned and the desired-LRP reads sent.
type recordingBBS struct {
	BBS
	mu        sync.Mutex
	claimRevs map[string]int64 // by "guid/index"
	reads     []*basinv1.ListDesiredLRPsRequest
}

func (b *recordingBBS) ApplyActualLRPTransitions(ctx context.Context, in *basinv1.ApplyActualLRPTransitionsRequest, opts ...grpc.CallOption) (*basinv1.ApplyActualLRPTransitionsResponse, error) {
	resp, err := b.BBS.ApplyActualLRPTransitions(ctx, in, opts...)
	b.mu.Lock()
	defer b.mu.Unlock()
	for i, tr := range in.GetTransitions() {
		if c := tr.GetClaim(); c != nil && err == nil && resp.GetResults()[i].GetCode() == 0 {
			b.claimRevs[fmt.Sprintf("%s/%d", c.GetKey().GetProcessGuid(), c.GetKey().GetIndex())] = resp.GetResults()[i].GetActualLrp().GetRevision()
		}
	}
	return resp, err
}

func (b *recordingBBS) ListDesiredLRPs(ctx context.Context, in *basinv1.ListDesiredLRPsRequest, opts ...grpc.CallOption) (*basinv1.ListDesiredLRPsResponse, error) {
	b.mu.Lock()
	b.reads = append(b.reads, proto.Clone(in).(*basinv1.ListDesiredLRPsRequest))
	b.mu.Unlock()
	return b.BBS.ListDesiredLRPs(ctx, in, opts...)
}

func TestDesiredReadIsAsOfTheClaim(t *testing.T) {
	e := newEnv(t)
	e.stop()
	rec := &recordingBBS{BBS: e.bbs, claimRevs: map[string]int64{}}
	e.repBBS = rec
	e.startRep(e.rep.cfg)
	e.desire("web", 1, 64)
	e.perform(lrpStart("web", 0, 64))
	e.waitState("web", 0, stateRunning)
	rec.mu.Lock()
	defer rec.mu.Unlock()
	claimRev := rec.claimRevs["web/0"]
	if claimRev == 0 {
		t.Fatalf("no claim of web/0 seen: %v", rec.claimRevs)
	}
	if len(rec.reads) != 1 || !slices.Equal(rec.reads[0].GetProcessGuids(), []string{"web"}) || rec.reads[0].GetMinRevision() != claimRev {
		t.Errorf("desired reads %v, want one of web at min_revision %d (the claim's)", rec.reads, claimRev)
	}
}

// lockedBuffer is a log destination the rep's goroutines share.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func TestStartLogNamesTheInstance(t *testing.T) {
	var logs lockedBuffer
	e := newEnv(t, func(c *Config) { c.Logger = slog.New(slog.NewTextHandler(&logs, nil)) })
	e.desire("web", 1, 64)
	e.perform(lrpStart("web", 0, 64))
	a := e.waitState("web", 0, stateRunning)
	want := fmt.Sprintf(`msg="instance running" cell=cell-a lrp=web/0 instance=%s took=`, a.GetInstanceKey().GetInstanceGuid())
	e.waitFor("the running line", func() bool { return strings.Contains(logs.String(), want) })
}

func TestGaugesAreCountedWhenScraped(t *testing.T) {
	reg := prometheus.NewRegistry()
	e := newEnv(t, func(c *Config) { c.Metrics = NewMetrics(reg) })
	gauges := func() map[string]float64 {
		t.Helper()
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]float64{}
		for _, mf := range mfs {
			for _, m := range mf.GetMetric() {
				name := mf.GetName()
				for _, lp := range m.GetLabel() {
					name += "/" + lp.GetValue()
				}
				out[name] = m.GetGauge().GetValue()
			}
		}
		return out
	}
	e.desire("web", 2, 64)
	e.exec.autoHealthy = false
	e.perform(lrpStart("web", 0, 64), lrpStart("web", 1, 64))
	e.waitState("web", 0, stateClaimed)
	e.waitState("web", 1, stateClaimed)
	want := map[string]float64{"basin_rep_instances/reserved": 0, "basin_rep_instances/claimed": 2, "basin_rep_instances/running": 0,
		"basin_rep_instances/stopping": 0, "basin_rep_allocated_memory_mb": 128}
	e.waitFor("two claimed instances counted", func() bool {
		got := gauges()
		for k, v := range want {
			if got[k] != v {
				return false
			}
		}
		return true
	})
}

func TestDropletKnownPresentUntilAStartMissesIt(t *testing.T) {
	e := newEnv(t)
	c := e.rep.drops
	p, err := c.get(e.ctx, e.droplet)
	if err != nil {
		t.Fatal(err)
	}
	// Removed behind the rep's back: still taken as present, without a stat...
	if err := os.Remove(p); err != nil {
		t.Fatal(err)
	}
	steps := []struct {
		name        string
		startErr    error // a failed start's error passed to forgetMissing first, if any
		wantFetches int64
	}{
		{"known present", nil, 1},
		{"a start failing otherwise", errors.New("runc: exit status 1"), 1},
		// ...until a start misses a file: then it is fetched again.
		{"a start missing a file", fmt.Errorf("start x: open droplet: %w", fs.ErrNotExist), 2},
		{"present again", nil, 2},
	}
	for _, st := range steps {
		if st.startErr != nil {
			c.forgetMissing(e.droplet.GetDigest(), st.startErr)
		}
		got, err := c.get(e.ctx, e.droplet)
		if err != nil || got != p {
			t.Fatalf("%s: get = %q, %v; want %q", st.name, got, err, p)
		}
		if n := e.rep.DropletFetches(); n != st.wantFetches {
			t.Errorf("%s: %d fetches, want %d", st.name, n, st.wantFetches)
		}
	}
	if _, err := os.Stat(p); err != nil {
		t.Errorf("droplet not fetched back: %v", err)
	}
}

// flakyStreams breaks the rep's schedule streams on demand and refuses new
// ones while down.
type flakyStreams struct {
	BBS
	mu      sync.Mutex
	down    bool
	cancels []context.CancelFunc
	opened  int
}

func (f *flakyStreams) WatchSchedules(ctx context.Context, opts ...grpc.CallOption) (basinv1.BBSService_WatchSchedulesClient, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.down {
		return nil, status.Error(codes.Unavailable, "test: BBS down")
	}
	ctx, cancel := context.WithCancel(ctx)
	f.cancels = append(f.cancels, cancel)
	f.opened++
	return f.BBS.WatchSchedules(ctx, opts...)
}

// breakAll ends every open stream and refuses new ones until up.
func (f *flakyStreams) breakAll() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.down = true
	for _, c := range f.cancels {
		c()
	}
	f.cancels = nil
}

func (f *flakyStreams) up() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.down = false
}

func TestRoutesFollowAcrossABrokenScheduleStream(t *testing.T) {
	flaky := &flakyStreams{}
	e := newEnv(t)
	e.stop() // a rep on the flaky BBS instead
	flaky.BBS = e.bbs
	e.repBBS = flaky
	e.startRep(Config{
		CellID: "cell-b", Zone: "z1", Capacity: &basinv1.CellCapacity{MemoryMb: 1024, DiskMb: 4096, Containers: 10},
		RepAddress: "127.0.0.1:1", Keys: e.keys, LeaseTTL: 2 * time.Second, StopGrace: time.Second,
		DropletDir: t.TempDir() + "/cache",
	})
	e.desire("moved", 1, 64)
	e.perform(lrpStart("moved", 0, 64))
	e.waitState("moved", 0, stateRunning)
	e.waitFor("first route", func() bool { ep, _ := e.route("moved.example.com", "moved", 0); return ep != nil })

	// The change is made while the cell has no stream: it must get it when
	// it follows again, from the revision it holds.
	flaky.breakAll()
	if _, err := e.bbs.UpdateDesiredLRP(e.ctx, &basinv1.UpdateDesiredLRPRequest{ProcessGuid: "moved",
		Routes: &basinv1.RouteList{Routes: []*basinv1.Route{{Host: "new.example.com"}}}}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond) // the rep retries against the down BBS meanwhile
	if ep, _ := e.route("new.example.com", "moved", 0); ep != nil {
		t.Fatal("routed with no schedule stream open")
	}
	flaky.up()
	e.waitFor("route after following again", func() bool {
		ep, _ := e.route("new.example.com", "moved", 0)
		old, _ := e.route("moved.example.com", "moved", 0)
		return ep != nil && old == nil
	})
	flaky.mu.Lock()
	defer flaky.mu.Unlock()
	if flaky.opened < 2 {
		t.Errorf("%d schedule streams opened, want a second after the break", flaky.opened)
	}
}
