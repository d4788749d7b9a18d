package converger

import (
	"fmt"
	"slices"
	"testing"
	"time"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

func TestRestartPolicyDelay(t *testing.T) {
	p := DefaultRestartPolicy()
	tests := []struct {
		crashes int32
		delay   time.Duration
		restart bool
	}{
		{1, 0, true}, {2, 0, true}, {3, 0, true},
		{4, 30 * time.Second, true}, {5, time.Minute, true}, {6, 2 * time.Minute, true},
		{8, 8 * time.Minute, true}, {9, 16 * time.Minute, true}, {10, 16 * time.Minute, true},
		{200, 16 * time.Minute, true}, {201, 0, false},
	}
	for _, tt := range tests {
		d, ok := p.Delay(tt.crashes)
		if d != tt.delay || ok != tt.restart {
			t.Errorf("Delay(%d) = %s, %v; want %s, %v", tt.crashes, d, ok, tt.delay, tt.restart)
		}
	}
}

var now = time.Unix(1_800_000_000, 0)

func actual(guid string, idx int32, state basinv1.ActualLRPState, cell string, since time.Time) *basinv1.ActualLRP {
	a := &basinv1.ActualLRP{Key: &basinv1.ActualLRPKey{ProcessGuid: guid, Index: idx}, State: state, SinceUnixNano: since.UnixNano()}
	if cell != "" {
		a.InstanceKey = &basinv1.ActualLRPInstanceKey{InstanceGuid: fmt.Sprintf("i-%d", idx), CellId: cell}
	}
	return a
}

const (
	unclaimed = basinv1.ActualLRPState_ACTUAL_LRP_STATE_UNCLAIMED
	claimed   = basinv1.ActualLRPState_ACTUAL_LRP_STATE_CLAIMED
	running   = basinv1.ActualLRPState_ACTUAL_LRP_STATE_RUNNING
	crashed   = basinv1.ActualLRPState_ACTUAL_LRP_STATE_CRASHED
)

func keys(ks []*basinv1.ActualLRPKey) []string {
	var out []string
	for _, k := range ks {
		out = append(out, fmt.Sprintf("%s/%d", k.GetProcessGuid(), k.GetIndex()))
	}
	slices.Sort(out)
	return out
}

func unclaims(us []Unclaim) []string {
	var out []string
	for _, u := range us {
		out = append(out, fmt.Sprintf("%s/%d", u.Key.GetProcessGuid(), u.Key.GetIndex()))
	}
	slices.Sort(out)
	return out
}

func TestPlan(t *testing.T) {
	to := Timeouts{Unclaimed: 30 * time.Second, ResolveTask: 2 * time.Minute}
	web := &basinv1.DesiredLRPSchedule{ProcessGuid: "web", Instances: 3}
	cells := map[string]bool{"c1": true}
	tests := []struct {
		name      string
		in        Input
		missing   []string
		retire    []string
		unclaim   []string
		failTasks []string
		resolve   []string
		next      time.Time
	}{
		{
			name: "converged",
			in: Input{Complete: true, Desired: []*basinv1.DesiredLRPSchedule{web}, Cells: cells, Actuals: []*basinv1.ActualLRP{
				actual("web", 0, running, "c1", now), actual("web", 1, running, "c1", now), actual("web", 2, claimed, "c1", now)}},
		},
		{
			name: "missing and extra",
			in: Input{Complete: true, Desired: []*basinv1.DesiredLRPSchedule{web}, Cells: cells, Actuals: []*basinv1.ActualLRP{
				actual("web", 0, running, "c1", now), actual("web", 3, running, "c1", now), actual("web", 4, unclaimed, "", now),
				actual("gone", 0, running, "c1", now)}},
			missing: []string{"web"},
			retire:  []string{"gone/0", "web/3", "web/4"},
		},
		{
			name: "one LRP's pass neither creates nor retires unknown LRPs",
			in: Input{Desired: []*basinv1.DesiredLRPSchedule{web}, Cells: cells, Actuals: []*basinv1.ActualLRP{
				actual("web", 0, running, "c1", now), actual("gone", 0, running, "c1", now)}},
		},
		{
			name: "lost cell",
			in: Input{Complete: true, Desired: []*basinv1.DesiredLRPSchedule{web}, Cells: cells, Actuals: []*basinv1.ActualLRP{
				actual("web", 0, running, "c2", now), actual("web", 1, claimed, "c2", now), actual("web", 2, running, "c1", now)}},
			unclaim: []string{"web/0", "web/1"},
		},
		{
			name: "crashes by the policy",
			in: Input{Complete: true, Desired: []*basinv1.DesiredLRPSchedule{web}, Cells: cells, Actuals: []*basinv1.ActualLRP{
				func() *basinv1.ActualLRP { a := actual("web", 0, crashed, "", now); a.CrashCount = 3; return a }(),
				func() *basinv1.ActualLRP {
					a := actual("web", 1, crashed, "", now.Add(-10*time.Second))
					a.CrashCount = 4
					return a
				}(),
				func() *basinv1.ActualLRP {
					a := actual("web", 2, crashed, "", now.Add(-time.Hour))
					a.CrashCount = 201
					return a
				}(),
			}},
			unclaim: []string{"web/0"},
			next:    now.Add(20 * time.Second),
		},
		{
			name: "unclaimed off the queue too long",
			in: Input{Complete: true, Desired: []*basinv1.DesiredLRPSchedule{web}, Cells: cells,
				Queued: map[string]bool{"web/2": true},
				Actuals: []*basinv1.ActualLRP{
					func() *basinv1.ActualLRP {
						a := actual("web", 0, unclaimed, "", now.Add(-time.Minute))
						a.PlacementError = "insufficient resources: memory"
						return a
					}(),
					actual("web", 1, unclaimed, "", now.Add(-10*time.Second)),
					actual("web", 2, unclaimed, "", now.Add(-time.Hour)),
				}},
			unclaim: []string{"web/0"},
			next:    now.Add(20 * time.Second),
		},
		{
			name: "tasks",
			in: Input{Cells: cells, Tasks: []*basinv1.Task{
				{TaskGuid: "lost", State: basinv1.TaskState_TASK_STATE_RUNNING, CellId: "c2"},
				{TaskGuid: "fine", State: basinv1.TaskState_TASK_STATE_RUNNING, CellId: "c1"},
				{TaskGuid: "old", State: basinv1.TaskState_TASK_STATE_COMPLETED, UpdatedAtUnixNano: now.Add(-3 * time.Minute).UnixNano()},
				{TaskGuid: "new", State: basinv1.TaskState_TASK_STATE_COMPLETED, UpdatedAtUnixNano: now.Add(-time.Minute).UnixNano()},
			}},
			failTasks: []string{"lost"},
			resolve:   []string{"old"},
			next:      now.Add(time.Minute),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.in.Now = now
			act := Plan(tt.in, DefaultRestartPolicy(), to)
			if !slices.Equal(act.Missing, tt.missing) {
				t.Errorf("missing %v, want %v", act.Missing, tt.missing)
			}
			if got := keys(act.Retire); !slices.Equal(got, tt.retire) {
				t.Errorf("retire %v, want %v", got, tt.retire)
			}
			if got := unclaims(act.Unclaim); !slices.Equal(got, tt.unclaim) {
				t.Errorf("unclaim %v, want %v", got, tt.unclaim)
			}
			var failed []string
			for _, f := range act.FailTasks {
				failed = append(failed, f.TaskGUID)
			}
			if !slices.Equal(failed, tt.failTasks) {
				t.Errorf("fail tasks %v, want %v", failed, tt.failTasks)
			}
			if !slices.Equal(act.ResolveTasks, tt.resolve) {
				t.Errorf("resolve %v, want %v", act.ResolveTasks, tt.resolve)
			}
			if !act.Next.Equal(tt.next) {
				t.Errorf("next %s, want %s", act.Next, tt.next)
			}
		})
	}
}
