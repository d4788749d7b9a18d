package rep

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	"github.com/basinpaas/basin/cell/executor"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

// stackCABundle is where Debian stacks keep their trusted certificates.
const stackCABundle = "/etc/ssl/certs/ca-certificates.crt"

// LabelTaskGUID marks a task's container.
const LabelTaskGUID = "basin.io/task-guid"

// task is the rep's record of one task it holds resources for; guarded by
// Rep.mu after Perform.
type task struct {
	guid     string
	stack    string
	memoryMB int64
	diskMB   int64
	instance string // container (executor instance) guid, once started
	marker   string // brackets the result file's content in the output
	timedOut bool
	done     bool
	exited   chan struct{} // closed by completeTask
	staging  *stagingWork  // set for a staging task once its workspace exists
}

func (r *Rep) releaseTask(t *task) {
	r.mu.Lock()
	if r.tasks[t.guid] == t {
		delete(r.tasks, t.guid)
	}
	r.mu.Unlock()
}

// taskByInstance finds the task running in container guid; r.mu held.
func (r *Rep) taskByInstanceLocked(guid string) *task {
	for _, t := range r.tasks {
		if t.instance == guid {
			return t
		}
	}
	return nil
}

// taskInstanceGUID names a task's container: the executor allows 76
// characters, task guids may be longer.
func taskInstanceGUID(taskGUID string) string {
	id := "task-" + taskGUID
	if len(id) <= 76 {
		return id
	}
	sum := sha256.Sum256([]byte(taskGUID))
	return "task-" + hex.EncodeToString(sum[:])
}

// runTask moves the task to RUNNING on this cell and starts its container;
// its exit completes it (handleExit → completeTask).
func (r *Rep) runTask(ctx context.Context, t *task) {
	log := r.log.With("task", t.guid)
	resp, err := retry(ctx, func(ctx context.Context) (*basinv1.StartTaskResponse, error) {
		return r.bbs.StartTask(ctx, &basinv1.StartTaskRequest{TaskGuid: t.guid, CellId: r.cfg.CellID, Fence: r.currentFence()})
	})
	if err != nil || !resp.GetShouldStart() {
		log.Info("task not started here", "err", err, "should_start", resp.GetShouldStart())
		r.releaseTask(t)
		return
	}
	def := resp.GetTask().GetDefinition()
	fail := func(reason string) {
		log.Warn("task failed to start", "reason", reason)
		req := &basinv1.CompleteTaskRequest{TaskGuid: t.guid, CellId: r.cfg.CellID, Failed: true, FailureReason: truncate(reason)}
		if def.GetStaging() != nil {
			// Whoever staged reads a StagingResult whatever the outcome.
			res, _ := protojson.Marshal(&basinv1.StagingResult{FailedPhase: "setup", Stack: def.GetStack()})
			req.Result = string(res)
		}
		r.reportTask(context.WithoutCancel(ctx), req)
		r.releaseTask(t)
	}
	var st *stagingWork
	var stagingMounts []executor.Mount
	var stagingArgs []string
	if def.GetStaging() != nil {
		st, stagingMounts, stagingArgs, err = r.prepareStaging(ctx, t, def.GetStaging(), def.GetStack())
		if err != nil {
			res, _ := protojson.Marshal(&basinv1.StagingResult{FailedPhase: phaseOf(err), Stack: def.GetStack()})
			log.Warn("staging failed to start", "err", err)
			r.reportTask(context.WithoutCancel(ctx), &basinv1.CompleteTaskRequest{
				TaskGuid: t.guid, CellId: r.cfg.CellID, Failed: true, FailureReason: truncate("staging failed: " + err.Error()), Result: string(res)})
			r.releaseTask(t)
			return
		}
	}
	var d executor.Droplet
	if def.GetDroplet().GetDigest() != "" {
		p, err := r.drops.get(ctx, def.GetDroplet())
		if err != nil {
			fail("failed to start: " + err.Error())
			return
		}
		d = executor.Droplet{Digest: def.GetDroplet().GetDigest(), Path: p}
	} else if d, err = emptyDroplet(r.cfg.DropletDir); err != nil {
		fail("failed to start: " + err.Error())
		return
	}
	marker := "basin-result-" + newGUID()
	spec := executor.Spec{
		InstanceGUID: taskInstanceGUID(t.guid), ProcessGUID: t.guid, Stack: def.GetStack(), Droplet: d,
		StartCommand: taskCommand(def.GetCommand(), def.GetResultFile(), marker),
		MemoryMB:     def.GetResources().GetMemoryMb(), DiskMB: def.GetResources().GetDiskMb(),
		PidsLimit:   def.GetResources().GetPids(),
		HealthCheck: executor.HealthCheck{Type: executor.HealthProcess},
		Labels:      map[string]string{LabelCellID: r.cfg.CellID, LabelTaskGUID: t.guid},
		App:         executor.AppInfo{GUID: t.guid, Name: t.guid},
	}
	if st != nil {
		// The builder as vcap in /tmp/app, its output tagged STG; HOME is
		// vcap's, CF_STACK names the stack as Cloud Foundry's staging does.
		spec.StartCommand, spec.Args, spec.Cwd, spec.Mounts = "", stagingArgs, stagingAppDir, stagingMounts
		spec.LogSource = executor.SourceStaging
		spec.App = executor.AppInfo{GUID: def.GetStaging().GetAppGuid(), Name: def.GetStaging().GetAppGuid()}
		spec.Env = append(spec.Env, "HOME=/home/vcap", "CF_STACK="+def.GetStack(), "LANG=en_US.UTF-8")
		spec.Env = append(spec.Env, r.cfg.StagingEnv...)
		if r.cfg.CABundle != "" {
			spec.Mounts = append(spec.Mounts, executor.Mount{Source: r.cfg.CABundle, Destination: stackCABundle, ReadOnly: true})
		}
	}
	for _, e := range def.GetEnv() {
		spec.Env = append(spec.Env, e.GetName()+"="+e.GetValue())
	}
	r.mu.Lock()
	t.instance, t.marker, t.staging = spec.InstanceGUID, marker, st
	r.mu.Unlock()
	if _, err := r.exec.Start(ctx, spec); err != nil {
		r.drops.forgetMissing(spec.Droplet.Digest, err)
		r.mu.Lock()
		t.instance, t.staging = "", nil
		r.mu.Unlock()
		if st != nil {
			os.RemoveAll(st.dir)
		}
		fail("failed to start: " + err.Error())
		return
	}
	timeout := r.cfg.TaskTimeout
	if ms := def.GetTimeoutMs(); ms > 0 {
		timeout = time.Duration(ms) * time.Millisecond
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case <-ctx.Done():
	case <-timer.C:
		r.mu.Lock()
		t.timedOut = !t.done
		r.mu.Unlock()
		log.Info("task timed out; stopping it", "timeout", timeout)
		if err := r.exec.Stop(context.WithoutCancel(ctx), spec.InstanceGUID, r.cfg.StopGrace); err != nil {
			log.Error("stop timed-out task", "err", err)
		}
	case <-t.exited:
	}
}

// completeTask reports a task's end with its result file's content.
func (r *Rep) completeTask(ctx context.Context, t *task, x *executor.ExitInfo) {
	r.mu.Lock()
	if t.done {
		r.mu.Unlock()
		return
	}
	t.done = true
	close(t.exited)
	timedOut, marker, inst := t.timedOut, t.marker, t.instance
	r.mu.Unlock()
	req := &basinv1.CompleteTaskRequest{TaskGuid: t.guid, CellId: r.cfg.CellID, Fence: r.currentFence()}
	if t.staging != nil {
		r.finishStaging(ctx, t, x, timedOut, req)
		r.reportTask(ctx, req)
		r.releaseTask(t)
		return
	}
	switch {
	case timedOut:
		req.Failed, req.FailureReason = true, "task timed out"
	case x.Stopped:
		req.Failed, req.FailureReason = true, "task stopped: the cell is evacuating or shutting down"
	case x.Status != 0:
		req.Failed, req.FailureReason = true, truncate(crashReason(x))
	}
	if buf, err := r.exec.Logs(inst); err == nil && !req.Failed {
		res, ok := extractResult(buf.Recent(1<<20), marker)
		if ok && len(res) > maxReasonBytes {
			req.Failed, req.FailureReason = true, fmt.Sprintf("result file is larger than %d bytes", maxReasonBytes)
		} else {
			req.Result = res
		}
	}
	r.reportTask(ctx, req)
	r.releaseTask(t)
}

// reportTask completes a task, retrying while the BBS still shows it
// running here (a refusal may come from a fence gone stale during lease
// renewal), so it is never left RUNNING on a live cell.
func (r *Rep) reportTask(ctx context.Context, req *basinv1.CompleteTaskRequest) {
	deadline := time.Now().Add(crashReportPatience)
	for {
		_, err := retry(ctx, func(ctx context.Context) (*basinv1.CompleteTaskResponse, error) {
			req.Fence = r.currentFence()
			return r.bbs.CompleteTask(ctx, req)
		})
		if err == nil {
			return
		}
		resp, gerr := r.bbs.GetTask(ctx, &basinv1.GetTaskRequest{TaskGuid: req.GetTaskGuid()})
		if isGone(gerr) || (gerr == nil && (resp.GetTask().GetState() != basinv1.TaskState_TASK_STATE_RUNNING || resp.GetTask().GetCellId() != r.cfg.CellID)) {
			return
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			r.log.Error("complete task", "task", req.GetTaskGuid(), "err", err)
			return
		}
		select {
		case <-ctx.Done():
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func truncate(s string) string {
	if len(s) > maxReasonBytes {
		return s[:maxReasonBytes-3] + "..."
	}
	return s
}

// taskCommand runs the user's command, then prints the result file base64
// encoded between markers on stderr: the container is gone by the time the
// rep reports, and its output is what survives.
func taskCommand(cmd, resultFile, marker string) string {
	if resultFile == "" {
		return cmd
	}
	q := "'" + strings.ReplaceAll(resultFile, "'", `'\''`) + "'"
	return fmt.Sprintf("(\n%s\n); rc=$?; if [ -f %s ]; then echo %s >&2; base64 %s >&2; echo %s-end >&2; fi; exit $rc",
		cmd, q, marker, q, marker)
}

// extractResult finds the result between the markers in the output.
func extractResult(lines []executor.LogLine, marker string) (string, bool) {
	var b strings.Builder
	in := false
	for _, l := range lines {
		if l.Source != executor.SourceApp || l.Stream != "stderr" {
			continue
		}
		switch {
		case l.Text == marker:
			in = true
			b.Reset()
		case l.Text == marker+"-end":
			raw, err := base64.StdEncoding.DecodeString(b.String())
			if err != nil {
				return "", false
			}
			return string(raw), true
		case in:
			b.WriteString(strings.TrimSpace(l.Text))
		}
	}
	return "", false
}

// emptyDroplet is the droplet tasks without one run in: the CF directory
// layout and nothing else, written once into the cache.
func emptyDroplet(dir string) (executor.Droplet, error) {
	var raw bytes.Buffer
	zw := gzip.NewWriter(&raw)
	tw := tar.NewWriter(zw)
	for _, d := range []string{"app/", "deps/", "profile.d/", "tmp/", "logs/"} {
		if err := tw.WriteHeader(&tar.Header{Name: d, Typeflag: tar.TypeDir, Mode: 0o755, ModTime: time.Unix(0, 0)}); err != nil {
			return executor.Droplet{}, err
		}
	}
	if err := tw.Close(); err != nil {
		return executor.Droplet{}, err
	}
	zw.ModTime = time.Unix(0, 0)
	if err := zw.Close(); err != nil {
		return executor.Droplet{}, err
	}
	sum := sha256.Sum256(raw.Bytes())
	hexSum := hex.EncodeToString(sum[:])
	p := filepath.Join(dir, "sha256-"+hexSum+".tgz")
	if _, err := os.Stat(p); err == nil {
		return executor.Droplet{Digest: "sha256:" + hexSum, Path: p}, nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return executor.Droplet{}, fmt.Errorf("empty droplet: %w", err)
	}
	tmp := p + ".tmp-" + newGUID()
	if err := os.WriteFile(tmp, raw.Bytes(), 0o600); err != nil {
		return executor.Droplet{}, fmt.Errorf("empty droplet: %w", err)
	}
	if err := os.Rename(tmp, p); err != nil {
		return executor.Droplet{}, fmt.Errorf("empty droplet: %w", err)
	}
	return executor.Droplet{Digest: "sha256:" + hexSum, Path: p}, nil
}

// phaseOf is the staging phase an error is reported under.
func phaseOf(err error) string {
	var se *stagingError
	if errors.As(err, &se) {
		return se.phase
	}
	return "setup"
}
