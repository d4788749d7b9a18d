package converger

import (
	"fmt"
	"time"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

// RestartPolicy is Diego's crash restart policy; every number configurable.
type RestartPolicy struct {
	// ImmediateRestarts: crashes up to this count restart at once (3).
	ImmediateRestarts int32
	// BaseDelay after the immediate restarts, doubling each crash (30 s).
	BaseDelay time.Duration
	// MaxDelay caps the doubling (16 min).
	MaxDelay time.Duration
	// MaxRestarts: past this many crashes the instance stays CRASHED (200).
	MaxRestarts int32
}

// DefaultRestartPolicy is Diego's.
func DefaultRestartPolicy() RestartPolicy {
	return RestartPolicy{ImmediateRestarts: 3, BaseDelay: 30 * time.Second, MaxDelay: 16 * time.Minute, MaxRestarts: 200}
}

// Delay is how long after its crash an instance with crashCount crashes
// restarts, and whether it restarts at all.
func (p RestartPolicy) Delay(crashCount int32) (time.Duration, bool) {
	if crashCount > p.MaxRestarts {
		return 0, false
	}
	if crashCount <= p.ImmediateRestarts {
		return 0, true
	}
	d := p.BaseDelay
	for i := p.ImmediateRestarts + 1; i < crashCount && d < p.MaxDelay; i++ {
		d *= 2
	}
	return min(d, p.MaxDelay), true
}

// Input is what the converger knows at one moment.
type Input struct {
	// Desired LRPs' schedules. When Complete, every desired LRP is here and
	// instances of LRPs not here are extra.
	Desired  []*basinv1.DesiredLRPSchedule
	Complete bool
	Actuals  []*basinv1.ActualLRP
	// Cells that have a presence key.
	Cells map[string]bool
	// Queued holds the auction queue keys present, as "guid/index".
	Queued map[string]bool
	Tasks  []*basinv1.Task
	Now    time.Time
}

// Unclaim puts an instance back in the auction queue.
type Unclaim struct {
	Key *basinv1.ActualLRPKey
	// Instance, when set, makes the unclaim apply only to that incarnation.
	Instance *basinv1.ActualLRPInstanceKey
	Reason   string
}

// TaskFailure fails a task.
type TaskFailure struct {
	TaskGUID string
	Reason   string
}

// Actions is what the converger does to make actual equal desired.
type Actions struct {
	// Missing names LRPs with instance slots below their desired count that
	// do not exist (full passes only).
	Missing      []string
	Retire       []*basinv1.ActualLRPKey
	Unclaim      []Unclaim
	FailTasks    []TaskFailure
	ResolveTasks []string
	// Next is the earliest time a deadline (a crash restart, an unclaimed
	// timeout, a task to resolve) falls due; zero when there is none.
	Next time.Time
}

// Timeouts are the converger's patience.
type Timeouts struct {
	// Unclaimed: an UNCLAIMED instance off the queue (a placement error)
	// this long is queued again.
	Unclaimed time.Duration
	// ResolveTask: a COMPLETED task its creator has not resolved this long
	// is deleted.
	ResolveTask time.Duration
}

// Plan compares desired with actual state and returns the repairs. It is a
// pure function of its input.
func Plan(in Input, policy RestartPolicy, to Timeouts) Actions {
	var act Actions
	due := func(at time.Time) bool {
		if !in.Now.Before(at) {
			return true
		}
		if act.Next.IsZero() || at.Before(act.Next) {
			act.Next = at
		}
		return false
	}
	desired := make(map[string]*basinv1.DesiredLRPSchedule, len(in.Desired))
	for _, d := range in.Desired {
		desired[d.GetProcessGuid()] = d
	}
	have := make(map[string]map[int32]bool)
	for _, a := range in.Actuals {
		guid, idx := a.GetKey().GetProcessGuid(), a.GetKey().GetIndex()
		d, known := desired[guid]
		if !known && !in.Complete {
			continue
		}
		if !known || idx >= d.GetInstances() {
			act.Retire = append(act.Retire, a.GetKey())
			continue
		}
		if have[guid] == nil {
			have[guid] = make(map[int32]bool)
		}
		have[guid][idx] = true
		since := time.Unix(0, a.GetSinceUnixNano())
		switch a.GetState() {
		case basinv1.ActualLRPState_ACTUAL_LRP_STATE_CLAIMED, basinv1.ActualLRPState_ACTUAL_LRP_STATE_RUNNING:
			if cell := a.GetInstanceKey().GetCellId(); !in.Cells[cell] {
				act.Unclaim = append(act.Unclaim, Unclaim{Key: a.GetKey(), Instance: a.GetInstanceKey(), Reason: fmt.Sprintf("cell %s is gone", cell)})
			}
		case basinv1.ActualLRPState_ACTUAL_LRP_STATE_CRASHED:
			delay, ok := policy.Delay(a.GetCrashCount())
			if ok && due(since.Add(delay)) {
				act.Unclaim = append(act.Unclaim, Unclaim{Key: a.GetKey(), Reason: fmt.Sprintf("restart after crash %d", a.GetCrashCount())})
			}
		case basinv1.ActualLRPState_ACTUAL_LRP_STATE_UNCLAIMED:
			if in.Queued[fmt.Sprintf("%s/%d", guid, idx)] {
				continue
			}
			if due(since.Add(to.Unclaimed)) {
				act.Unclaim = append(act.Unclaim, Unclaim{Key: a.GetKey(), Reason: "unclaimed and not queued: " + a.GetPlacementError()})
			}
		}
	}
	// Only a complete view can call an instance missing: a single LRP's
	// pass may run between a scale-up and the BBS creating its instances.
	for _, d := range in.Desired {
		if !in.Complete {
			break
		}
		for i := range d.GetInstances() {
			if !have[d.GetProcessGuid()][i] {
				act.Missing = append(act.Missing, d.GetProcessGuid())
				break
			}
		}
	}
	for _, t := range in.Tasks {
		switch t.GetState() {
		case basinv1.TaskState_TASK_STATE_RUNNING:
			if cell := t.GetCellId(); !in.Cells[cell] {
				act.FailTasks = append(act.FailTasks, TaskFailure{TaskGUID: t.GetTaskGuid(), Reason: fmt.Sprintf("cell %s disappeared before the task completed", cell)})
			}
		case basinv1.TaskState_TASK_STATE_COMPLETED:
			if due(time.Unix(0, t.GetUpdatedAtUnixNano()).Add(to.ResolveTask)) {
				act.ResolveTasks = append(act.ResolveTasks, t.GetTaskGuid())
			}
		}
	}
	return act
}
