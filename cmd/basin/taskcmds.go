package main

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/basinpaas/basin/cmd/basin/internal/manifest"
	"github.com/basinpaas/basin/cmd/basin/internal/ui"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"github.com/spf13/cobra"
	"google.golang.org/protobuf/proto"
)

func taskState(t *basinv1.Task) string {
	switch {
	case t.GetState() == basinv1.TaskState_TASK_STATE_COMPLETED && t.GetFailed():
		return "FAILED"
	case t.GetState() == basinv1.TaskState_TASK_STATE_COMPLETED:
		return "SUCCEEDED"
	case t.GetState() == basinv1.TaskState_TASK_STATE_RUNNING:
		return "RUNNING"
	}
	return "PENDING"
}

func newTaskCommands() []*cobra.Command {
	var command, name, mem, disk string
	var wait bool
	run := &cobra.Command{
		Use:   "run-task NAME --command CMD [--name TASK]",
		Short: "Run a one-off task in a copy of an app's droplet",
		Long: `Run a one-off command in a new container with the app's droplet and
environment. With --wait the command waits for the task and exits non-zero
if it failed.`,
		Example: "  basin run-task myapp --command 'rake db:migrate' --name migrate\n  basin run-task myapp --command 'exit 3' --wait",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := connect(cmd)
			if err != nil {
				return err
			}
			req := &basinv1.RunTaskRequest{Name: args[0], Command: command, TaskName: name}
			if mem != "" {
				if req.MemoryMb, err = parseMB("-m", mem); err != nil {
					return err
				}
			}
			if disk != "" {
				if req.DiskMb, err = parseMB("-k", disk); err != nil {
					return err
				}
			}
			s.ui.Say("Creating task for app %s...", s.ui.Cyan(args[0]))
			resp, err := s.apps.RunTask(cmd.Context(), req)
			if err != nil {
				return fmt.Errorf("run task on %s: %w", args[0], err)
			}
			s.ui.Say("Task %s has been submitted (guid %s).", s.ui.Cyan(resp.GetTaskName()), resp.GetTask().GetTaskGuid())
			if !wait {
				s.ui.OK()
				return nil
			}
			t, err := waitAppTask(cmd.Context(), s, args[0], resp.GetTask().GetTaskGuid(), 30*time.Minute)
			if err != nil {
				return err
			}
			if t.GetFailed() {
				return ui.WithHint(fmt.Errorf("task %s failed: %s", resp.GetTaskName(), t.GetFailureReason()), "See `basin tasks "+args[0]+"`.")
			}
			s.ui.Say("Task %s succeeded.", resp.GetTaskName())
			s.ui.OK()
			return nil
		},
	}
	run.Flags().StringVarP(&command, "command", "c", "", "command to run (required)")
	run.Flags().StringVar(&name, "name", "", "task name (default: random)")
	run.Flags().StringVarP(&mem, "memory", "m", "", "memory limit (default: the app's)")
	run.Flags().StringVarP(&disk, "disk", "k", "", "disk limit (default: the app's)")
	run.Flags().BoolVar(&wait, "wait", false, "wait for the task and exit non-zero when it fails")
	run.MarkFlagRequired("command")

	var asJSON *bool
	list := &cobra.Command{
		Use:     "tasks NAME",
		Short:   "List an app's tasks and how they ended",
		Example: "  basin tasks myapp",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := connect(cmd)
			if err != nil {
				return err
			}
			resp, err := s.apps.ListAppTasks(cmd.Context(), &basinv1.ListAppTasksRequest{Name: args[0]})
			if err != nil {
				return fmt.Errorf("list tasks of %s: %w", args[0], err)
			}
			if *asJSON {
				var ms []proto.Message
				for _, t := range resp.GetTasks() {
					ms = append(ms, t)
				}
				return s.ui.JSON(ms)
			}
			if len(resp.GetTasks()) == 0 {
				s.ui.Say("No tasks found for app %s.", args[0])
				return nil
			}
			var rows [][]string
			for _, t := range resp.GetTasks() {
				reason, _, _ := strings.Cut(t.GetTask().GetFailureReason(), "; last output:")
				rows = append(rows, []string{t.GetTaskName(), taskState(t.GetTask()),
					time.Unix(0, t.GetTask().GetCreatedAtUnixNano()).Format(time.RFC3339), t.GetTask().GetDefinition().GetCommand(), reason})
			}
			s.ui.Table([]string{"name", "state", "start time", "command", "failure reason"}, rows)
			return nil
		},
	}
	asJSON = jsonFlag(list)
	return []*cobra.Command{run, list}
}

func parseMB(flag, v string) (int64, error) {
	mb, err := manifest.ParseMB(v)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", flag, err)
	}
	return mb, nil
}

// waitAppTask waits for the app's task guid: the app layer moves a
// completed task into the app's history and resolves it in the BBS, so the
// BBS alone may no longer know it.
func waitAppTask(ctx context.Context, s *session, app, guid string, timeout time.Duration) (*basinv1.Task, error) {
	return pollTask(ctx, guid, timeout, func(ctx context.Context) (*basinv1.Task, error) {
		r, err := s.apps.ListAppTasks(ctx, &basinv1.ListAppTasksRequest{Name: app})
		for _, t := range r.GetTasks() {
			if t.GetTask().GetTaskGuid() == guid {
				return t.GetTask(), err
			}
		}
		return nil, err
	})
}
