package bbs

import (
	"context"
	"errors"
	"fmt"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

const (
	taskPending   = basinv1.TaskState_TASK_STATE_PENDING
	taskRunning   = basinv1.TaskState_TASK_STATE_RUNNING
	taskCompleted = basinv1.TaskState_TASK_STATE_COMPLETED
)

func isNotFound(err error) bool { return errors.Is(err, ErrNotFound) }

func decodeTask(key string, cur record) (*basinv1.Task, error) {
	if !cur.exists {
		return nil, fmt.Errorf("task %s: %w", key, ErrNotFound)
	}
	t := &basinv1.Task{}
	if err := proto.Unmarshal(cur.val, t); err != nil {
		return nil, fmt.Errorf("decode task %s: %w", key, err)
	}
	t.Revision = cur.modRev
	return t, nil
}

func taskStateName(s basinv1.TaskState) string {
	switch s {
	case taskPending:
		return "PENDING"
	case taskRunning:
		return "RUNNING"
	case taskCompleted:
		return "COMPLETED"
	}
	return s.String()
}

// DesireTask stores a PENDING task and puts it on the auction queue.
func (s *Store) DesireTask(ctx context.Context, guid, domain string, def *basinv1.TaskDefinition) (*basinv1.Task, error) {
	now := s.now().UnixNano()
	t := &basinv1.Task{TaskGuid: guid, Domain: domain, Definition: def, State: taskPending, CreatedAtUnixNano: now, UpdatedAtUnixNano: now}
	key, q := s.keys.Task(guid), s.keys.PendingTask(guid)
	val := marshal(t)
	res := s.commit.do(ctx, &txnItem{
		cmps:   []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(key), "=", 0)},
		ops:    []clientv3.Op{clientv3.OpPut(key, string(val)), clientv3.OpPut(q, "")},
		writes: []string{key, q},
	})
	if res.err != nil {
		return nil, fmt.Errorf("desire task %s: %w", guid, res.err)
	}
	if !res.succeeded {
		return nil, fmt.Errorf("task %s: %w", guid, ErrAlreadyExists)
	}
	s.tasks.noteWrite(key, val, res.rev, false)
	t.Revision = res.rev
	return t, nil
}

// taskTransition is recordTransition for a task, stamping its update time.
func (s *Store) taskTransition(ctx context.Context, guid string, fence *basinv1.Fence, fn stepFunc[*basinv1.Task]) (*basinv1.Task, error) {
	return recordTransition(ctx, s, s.keys.Task(guid), fence, decodeTask,
		func(t *basinv1.Task, rev int64) { t.Revision = rev },
		func(t *basinv1.Task, e *edits) (bool, error) {
			noop, err := fn(t, e)
			if err == nil && !noop {
				t.UpdatedAtUnixNano = s.now().UnixNano()
			}
			return noop, err
		})
}

// StartTask moves a PENDING task to RUNNING on a cell. shouldStart is false
// when this cell had already started it (a retry).
func (s *Store) StartTask(ctx context.Context, guid, cellID string, fence *basinv1.Fence) (t *basinv1.Task, shouldStart bool, err error) {
	t, err = s.taskTransition(ctx, guid, fence, func(t *basinv1.Task, e *edits) (bool, error) {
		switch {
		case t.GetState() == taskPending:
		case t.GetState() == taskRunning && t.GetCellId() == cellID:
			return true, nil
		default:
			return false, fmt.Errorf("start task %s on cell %s: %w: it is %s on cell %q", guid, cellID, ErrTransition, taskStateName(t.GetState()), t.GetCellId())
		}
		shouldStart = true
		t.State = taskRunning
		t.CellId = cellID
		e.del(s.keys.PendingTask(guid))
		return false, nil
	})
	return t, shouldStart, err
}

// CompleteTask records the outcome of a task the cell ran.
func (s *Store) CompleteTask(ctx context.Context, guid, cellID string, failed bool, reason, result string, fence *basinv1.Fence) (*basinv1.Task, error) {
	return s.taskTransition(ctx, guid, fence, func(t *basinv1.Task, e *edits) (bool, error) {
		if t.GetState() != taskRunning || t.GetCellId() != cellID {
			return false, fmt.Errorf("complete task %s on cell %s: %w: it is %s on cell %q", guid, cellID, ErrTransition, taskStateName(t.GetState()), t.GetCellId())
		}
		t.State = taskCompleted
		t.Failed = failed
		t.FailureReason = reason
		t.Result = result
		s.saveBuildCache(t, e)
		return false, nil
	})
}

// saveBuildCache is the write that keeps a successful staging's build cache
// for the app's next staging, on whichever cell it runs: it goes in the
// same transaction as the task's completion, added to e.
func (s *Store) saveBuildCache(t *basinv1.Task, e *edits) {
	st := t.GetDefinition().GetStaging()
	if st == nil || t.GetFailed() || t.GetResult() == "" {
		return
	}
	var res basinv1.StagingResult
	if err := protojson.Unmarshal([]byte(t.GetResult()), &res); err != nil || !digestRE.MatchString(res.GetBuildCacheDigest()) {
		return
	}
	key := s.keys.BuildCache(st.GetAppGuid())
	val := marshal(&basinv1.BuildCache{AppGuid: st.GetAppGuid(), Digest: res.GetBuildCacheDigest(), TaskGuid: t.GetTaskGuid(),
		UpdatedAtUnixNano: s.now().UnixNano()})
	e.put(key, string(val))
}

// FailTask completes a PENDING or RUNNING task as failed: the auctioneer when
// no cell can take it, the converger when its cell is gone.
func (s *Store) FailTask(ctx context.Context, guid, reason string, fence *basinv1.Fence) (*basinv1.Task, error) {
	return s.endTask(ctx, guid, reason, fence, "fail")
}

// CancelTask completes a PENDING or RUNNING task as failed at the user's word;
// the cell running it sees the change and stops it.
func (s *Store) CancelTask(ctx context.Context, guid string) (*basinv1.Task, error) {
	return s.endTask(ctx, guid, "task was cancelled", nil, "cancel")
}

func (s *Store) endTask(ctx context.Context, guid, reason string, fence *basinv1.Fence, what string) (*basinv1.Task, error) {
	return s.taskTransition(ctx, guid, fence, func(t *basinv1.Task, e *edits) (bool, error) {
		if t.GetState() != taskPending && t.GetState() != taskRunning {
			return false, fmt.Errorf("%s task %s: %w: it is %s", what, guid, ErrTransition, taskStateName(t.GetState()))
		}
		t.State = taskCompleted
		t.Failed = true
		t.FailureReason = reason
		e.del(s.keys.PendingTask(guid))
		return false, nil
	})
}

// ResolveTask deletes a COMPLETED task once its creator has read the outcome.
func (s *Store) ResolveTask(ctx context.Context, guid string, fence *basinv1.Fence) error {
	key := s.keys.Task(guid)
	_, err := s.mutate(ctx, key, fence, func(cur record, p *plan) error {
		t, err := decodeTask(key, cur)
		if err != nil {
			return err
		}
		if t.GetState() != taskCompleted {
			return fmt.Errorf("resolve task %s: %w: it is %s, not COMPLETED", guid, ErrTransition, taskStateName(t.GetState()))
		}
		p.del(key)
		p.deleted = true
		return nil
	})
	return err
}

// GetTask reads one task.
func (s *Store) GetTask(ctx context.Context, guid string) (*basinv1.Task, error) {
	key := s.keys.Task(guid)
	resp, err := s.cli.Get(ctx, key)
	if err != nil {
		return nil, fmt.Errorf("get task %s: %w", guid, err)
	}
	if len(resp.Kvs) == 0 {
		return nil, fmt.Errorf("task %s: %w", guid, ErrNotFound)
	}
	return decodeTask(key, record{val: resp.Kvs[0].Value, modRev: resp.Kvs[0].ModRevision, exists: true})
}

// ListTasks reads tasks, optionally of one domain or cell.
func (s *Store) ListTasks(ctx context.Context, domain, cellID string) ([]*basinv1.Task, error) {
	var out []*basinv1.Task
	var decodeErr error
	if _, err := listPrefix(ctx, s.cli, s.keys.TaskPrefix(), 0, func(kv kvPair) {
		t, err := decodeTask(kv.key, record{val: kv.val, modRev: kv.modRev, exists: true})
		if err != nil {
			decodeErr = err
			return
		}
		if (domain == "" || t.GetDomain() == domain) && (cellID == "" || t.GetCellId() == cellID) {
			out = append(out, t)
		}
	}); err != nil {
		return nil, err
	}
	return out, decodeErr
}

// ListCells reads the presence of every live cell.
func (s *Store) ListCells(ctx context.Context) ([]*basinv1.CellPresence, error) {
	var out []*basinv1.CellPresence
	var decodeErr error
	if _, err := listPrefix(ctx, s.cli, s.keys.CellPrefix(), 0, func(kv kvPair) {
		c := &basinv1.CellPresence{}
		if err := proto.Unmarshal(kv.val, c); err != nil {
			decodeErr = fmt.Errorf("decode %s: %w", kv.key, err)
			return
		}
		out = append(out, c)
	}); err != nil {
		return nil, err
	}
	return out, decodeErr
}
