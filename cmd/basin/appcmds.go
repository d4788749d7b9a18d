package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/basinpaas/basin/apps"
	"github.com/basinpaas/basin/cmd/basin/internal/manifest"
	"github.com/basinpaas/basin/cmd/basin/internal/ui"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

func newAppCommands() []*cobra.Command {
	return []*cobra.Command{
		newAppsCommand(), newAppCommand(), newScaleCommand(), newStartCommand(), newStopCommand(),
		newRestartCommand(), newRestartInstanceCommand(), newRestageCommand(), newDeleteCommand(),
		newEnvCommand(), newSetEnvCommand(), newUnsetEnvCommand(), newEventsCommand(),
	}
}

func stateName(s basinv1.AppState) string {
	switch s {
	case basinv1.AppState_APP_STATE_STARTED:
		return "started"
	case basinv1.AppState_APP_STATE_STOPPED:
		return "stopped"
	}
	return "-"
}

func instanceState(s basinv1.ActualLRPState) string {
	switch s {
	case basinv1.ActualLRPState_ACTUAL_LRP_STATE_UNCLAIMED, basinv1.ActualLRPState_ACTUAL_LRP_STATE_CLAIMED:
		return "starting"
	case basinv1.ActualLRPState_ACTUAL_LRP_STATE_RUNNING:
		return "running"
	case basinv1.ActualLRPState_ACTUAL_LRP_STATE_CRASHED:
		return "crashed"
	}
	return "down"
}

func routeList(rs []*basinv1.Route) string {
	var out []string
	for _, r := range rs {
		out = append(out, apps.RouteString(r))
	}
	return strings.Join(out, ", ")
}

func newAppsCommand() *cobra.Command {
	var asJSON *bool
	c := &cobra.Command{
		Use:     "apps",
		Short:   "List all apps",
		Example: "  basin apps\n  basin apps --json | jq '.[].app.name'",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := connect(cmd)
			if err != nil {
				return err
			}
			resp, err := s.apps.ListApps(cmd.Context(), &basinv1.ListAppsRequest{})
			if err != nil {
				return fmt.Errorf("list apps: %w", err)
			}
			if *asJSON {
				var ms []proto.Message
				for _, a := range resp.GetApps() {
					ms = append(ms, a)
				}
				return s.ui.JSON(ms)
			}
			if len(resp.GetApps()) == 0 {
				s.ui.Say("No apps found. Push one with `basin push NAME`.")
				return nil
			}
			var rows [][]string
			for _, sum := range resp.GetApps() {
				a := sum.GetApp()
				rows = append(rows, []string{a.GetName(), stateName(a.GetState()),
					fmt.Sprintf("web:%d/%d", sum.GetRunning(), a.GetInstances()), routeList(a.GetRoutes())})
			}
			s.ui.Table([]string{"name", "requested state", "processes", "routes"}, rows)
			return nil
		},
	}
	asJSON = jsonFlag(c)
	return c
}

func newAppCommand() *cobra.Command {
	var asJSON *bool
	c := &cobra.Command{
		Use:     "app NAME",
		Short:   "Show an app: its state, routes, droplet and instances",
		Example: "  basin app myapp\n  basin app myapp --json",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := connect(cmd)
			if err != nil {
				return err
			}
			resp, err := s.apps.GetApp(cmd.Context(), &basinv1.GetAppRequest{Name: args[0]})
			if err != nil {
				return fmt.Errorf("show app %s: %w", args[0], err)
			}
			if *asJSON {
				return s.ui.JSON(resp)
			}
			printSummary(s.ui, resp, time.Now())
			return nil
		},
	}
	asJSON = jsonFlag(c)
	return c
}

// printSummary prints cf's app summary. CPU, memory and disk use are not
// measured by the cells yet: they show as "-", with the quota beside.
func printSummary(u *ui.UI, resp *basinv1.GetAppResponse, now time.Time) {
	a := resp.GetApp()
	buildpack := a.GetDetectedBuildpack()
	if len(a.GetBuildpacks()) > 0 {
		buildpack = strings.Join(a.GetBuildpacks(), ", ")
	}
	if buildpack == "" {
		buildpack = "-"
	}
	cmdline := a.GetCommand()
	if cmdline == "" {
		cmdline = a.GetStagedCommand()
	}
	u.KeyValues([][2]string{
		{"name", a.GetName()},
		{"requested state", stateName(a.GetState())},
		{"routes", routeList(a.GetRoutes())},
		{"last uploaded", ui.Since(a.GetLastUploadedUnixNano(), now)},
		{"stack", a.GetStack()},
		{"buildpacks", buildpack},
	})
	running := 0
	var rows [][]string
	for _, in := range resp.GetInstances() {
		if !in.GetCurrent() {
			continue
		}
		st := instanceState(in.GetState())
		if st == "running" {
			running++
			st = u.Green(st)
		} else if st == "crashed" {
			st = u.Red(st)
		}
		details := ""
		switch {
		case in.GetState() == basinv1.ActualLRPState_ACTUAL_LRP_STATE_CRASHED:
			details, _, _ = strings.Cut(in.GetCrashReason(), "; last output:")
		case in.GetPlacementError() != "":
			details = in.GetPlacementError()
		}
		rows = append(rows, []string{"#" + strconv.Itoa(int(in.GetIndex())), st, ui.Since(in.GetSinceUnixNano(), now), "-",
			"- of " + ui.MB(a.GetMemoryMb()), "- of " + ui.MB(a.GetDiskMb()), details})
	}
	fmt.Fprintln(u.Out)
	u.KeyValues([][2]string{
		{"type", "web"},
		{"instances", fmt.Sprintf("%d/%d", running, a.GetInstances())},
		{"memory usage", ui.MB(a.GetMemoryMb())},
		{"start command", orDash(cmdline)},
	})
	if len(rows) > 0 {
		u.Table([]string{"", "state", "since", "cpu", "memory", "disk", "details"}, rows)
	} else if a.GetState() == basinv1.AppState_APP_STATE_STOPPED {
		u.Say("There are no running instances of this process.")
	}
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// waitRunning polls until every instance of the app's current version runs,
// printing "1 of 3 running" as it changes. A crash or the timeout fails it
// with the instance's reason.
func waitRunning(ctx context.Context, s *session, name string, timeout time.Duration) (*basinv1.GetAppResponse, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	last := ""
	for {
		resp, err := s.apps.GetApp(ctx, &basinv1.GetAppRequest{Name: name})
		if err != nil {
			if ctx.Err() != nil {
				return nil, fmt.Errorf("wait for %s to start: timed out after %s", name, timeout)
			}
			return nil, fmt.Errorf("wait for %s to start: %w", name, err)
		}
		want := resp.GetApp().GetInstances()
		running, crashed, unplaced := int32(0), []string{}, []string{}
		for _, in := range resp.GetInstances() {
			if !in.GetCurrent() {
				continue
			}
			switch in.GetState() {
			case basinv1.ActualLRPState_ACTUAL_LRP_STATE_RUNNING:
				running++
			case basinv1.ActualLRPState_ACTUAL_LRP_STATE_CRASHED:
				crashed = append(crashed, fmt.Sprintf("instance %d crashed: %s", in.GetIndex(), in.GetCrashReason()))
			default:
				if in.GetPlacementError() != "" {
					unplaced = append(unplaced, fmt.Sprintf("instance %d cannot be placed: %s", in.GetIndex(), in.GetPlacementError()))
				}
			}
		}
		line := fmt.Sprintf("   %d of %d instances running", running, want)
		if line != last {
			if s.ui.TTY {
				fmt.Fprintf(s.ui.Out, "\r%s", line)
			} else {
				fmt.Fprintln(s.ui.Out, line)
			}
			last = line
		}
		if len(crashed) > 0 {
			if s.ui.TTY {
				fmt.Fprintln(s.ui.Out)
			}
			return resp, ui.WithHint(fmt.Errorf("start app %s: %s", name, strings.Join(crashed, "\n")),
				fmt.Sprintf("See `basin logs %s --recent` and `basin events %s`.", name, name))
		}
		if len(unplaced) > 0 && int(running)+len(unplaced) >= int(want) {
			if s.ui.TTY {
				fmt.Fprintln(s.ui.Out)
			}
			return resp, ui.WithHint(fmt.Errorf("start app %s: %s", name, strings.Join(unplaced, "\n")),
				"No cell can take it: see `basin cells` for capacity and stacks, or ask for less memory or disk with `basin scale`.")
		}
		if running >= want {
			if s.ui.TTY {
				fmt.Fprintln(s.ui.Out)
			}
			return resp, nil
		}
		select {
		case <-ctx.Done():
			if s.ui.TTY {
				fmt.Fprintln(s.ui.Out)
			}
			return resp, ui.WithHint(fmt.Errorf("start app %s: %d of %d instances running after %s", name, running, want, timeout),
				fmt.Sprintf("See `basin app %s` for placement errors and `basin logs %s --recent`.", name, name))
		case <-time.After(300 * time.Millisecond):
		}
	}
}

const startTimeout = 3 * time.Minute

func newScaleCommand() *cobra.Command {
	var instances int32
	var mem, disk string
	c := &cobra.Command{
		Use:     "scale NAME [-i INSTANCES] [-m MEMORY] [-k DISK]",
		Short:   "Change an app's instance count (in place) or memory and disk (restarts it)",
		Example: "  basin scale myapp -i 5\n  basin scale myapp -m 512M -k 2G",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := connect(cmd)
			if err != nil {
				return err
			}
			req := &basinv1.ScaleAppRequest{Name: args[0]}
			if cmd.Flags().Changed("instances") {
				req.Instances = &instances
			}
			if mem != "" {
				mb, err := manifest.ParseMB(mem)
				if err != nil {
					return fmt.Errorf("-m: %w", err)
				}
				req.MemoryMb = &mb
			}
			if disk != "" {
				mb, err := manifest.ParseMB(disk)
				if err != nil {
					return fmt.Errorf("-k: %w", err)
				}
				req.DiskMb = &mb
			}
			if req.Instances == nil && req.MemoryMb == nil && req.DiskMb == nil {
				resp, err := s.apps.GetApp(cmd.Context(), &basinv1.GetAppRequest{Name: args[0]})
				if err != nil {
					return fmt.Errorf("show app %s: %w", args[0], err)
				}
				a := resp.GetApp()
				s.ui.KeyValues([][2]string{{"instances", strconv.Itoa(int(a.GetInstances()))}, {"memory", ui.MB(a.GetMemoryMb())}, {"disk", ui.MB(a.GetDiskMb())}})
				return nil
			}
			s.ui.Say("Scaling app %s...", s.ui.Cyan(args[0]))
			resp, err := s.apps.ScaleApp(cmd.Context(), req)
			if err != nil {
				return fmt.Errorf("scale app %s: %w", args[0], err)
			}
			if resp.GetRestarted() {
				s.ui.Say("Restarted with the new limits.")
			}
			if resp.GetApp().GetState() == basinv1.AppState_APP_STATE_STARTED {
				if _, err := waitRunning(cmd.Context(), s, args[0], startTimeout); err != nil {
					return err
				}
			}
			s.ui.OK()
			return nil
		},
	}
	c.Flags().Int32VarP(&instances, "instances", "i", 0, "number of instances")
	c.Flags().StringVarP(&mem, "memory", "m", "", "memory limit per instance (e.g. 256M, 1G)")
	c.Flags().StringVarP(&disk, "disk", "k", "", "disk limit per instance (e.g. 512M, 1G)")
	return c
}

// startLike runs start, stop or restart and waits for the result.
func startLike(use, short, example string, run func(ctx context.Context, s *session, name string) (*basinv1.App, error), verb, what string, wait bool) *cobra.Command {
	return &cobra.Command{
		Use:     use,
		Short:   short,
		Example: example,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := connect(cmd)
			if err != nil {
				return err
			}
			s.ui.Say("%s app %s...", verb, s.ui.Cyan(args[0]))
			if _, err := run(cmd.Context(), s, args[0]); err != nil {
				return fmt.Errorf("%s app %s: %w", what, args[0], err)
			}
			if wait {
				resp, err := waitRunning(cmd.Context(), s, args[0], startTimeout)
				if err != nil {
					return err
				}
				fmt.Fprintln(s.ui.Out)
				printSummary(s.ui, resp, time.Now())
				return nil
			}
			s.ui.OK()
			return nil
		},
	}
}

func newStartCommand() *cobra.Command {
	return startLike("start NAME", "Start an app", "  basin start myapp", func(ctx context.Context, s *session, name string) (*basinv1.App, error) {
		r, err := s.apps.StartApp(ctx, &basinv1.StartAppRequest{Name: name})
		return r.GetApp(), err
	}, "Starting", "start", true)
}

func newStopCommand() *cobra.Command {
	return startLike("stop NAME", "Stop an app: all its instances go, its settings stay", "  basin stop myapp", func(ctx context.Context, s *session, name string) (*basinv1.App, error) {
		r, err := s.apps.StopApp(ctx, &basinv1.StopAppRequest{Name: name})
		return r.GetApp(), err
	}, "Stopping", "stop", false)
}

func newRestartCommand() *cobra.Command {
	var strategy string
	c := &cobra.Command{
		Use:   "restart NAME [--strategy rolling]",
		Short: "Restart an app with its current settings (env, command, limits)",
		Long: `Restart an app: a new version of it starts with the app's current settings.
By default the old instances stop first (brief downtime); with --strategy
rolling the new instances start and take traffic before the old ones stop.`,
		Example: "  basin restart myapp\n  basin restart myapp --strategy rolling",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := connect(cmd)
			if err != nil {
				return err
			}
			name := args[0]
			switch strategy {
			case "", "default":
				s.ui.Say("Restarting app %s...", s.ui.Cyan(name))
				if _, err := s.apps.RestartApp(cmd.Context(), &basinv1.RestartAppRequest{Name: name}); err != nil {
					return fmt.Errorf("restart app %s: %w", name, err)
				}
			case "rolling":
				s.ui.Say("Restarting app %s with a rolling deploy...", s.ui.Cyan(name))
				if err := roll(cmd.Context(), s, name); err != nil {
					return err
				}
			default:
				return fmt.Errorf("--strategy %q: the strategies are rolling and default", strategy)
			}
			resp, err := waitRunning(cmd.Context(), s, name, startTimeout)
			if err != nil {
				return err
			}
			fmt.Fprintln(s.ui.Out)
			printSummary(s.ui, resp, time.Now())
			return nil
		},
	}
	c.Flags().StringVar(&strategy, "strategy", "", "rolling: no downtime")
	return c
}

// roll runs a rolling deploy and prints its progress.
func roll(ctx context.Context, s *session, name string) error {
	stream, err := s.apps.RollApp(ctx, &basinv1.RollAppRequest{Name: name, TimeoutMs: startTimeout.Milliseconds()})
	if err != nil {
		return fmt.Errorf("rolling deploy of %s: %w", name, err)
	}
	last := ""
	for {
		p, err := stream.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return ui.WithHint(fmt.Errorf("rolling deploy of %s: %w", name, err),
				fmt.Sprintf("The old version keeps serving. See `basin events %s` and `basin logs %s --recent`.", name, name))
		}
		line := fmt.Sprintf("   new: %d of %d instances running and routed; old: %d left", p.GetNewRoutable(), p.GetInstances(), p.GetOldInstances())
		if line != last {
			s.ui.Say("%s", line)
			last = line
		}
	}
}

func newRestartInstanceCommand() *cobra.Command {
	return &cobra.Command{
		Use:     "restart-app-instance NAME INDEX",
		Short:   "Stop one instance of an app; it is started again at once",
		Example: "  basin restart-app-instance myapp 0",
		Args:    cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			idx, err := strconv.Atoi(args[1])
			if err != nil || idx < 0 {
				return fmt.Errorf("INDEX %q: want an instance number such as 0", args[1])
			}
			s, err := connect(cmd)
			if err != nil {
				return err
			}
			s.ui.Say("Restarting instance %d of app %s...", idx, s.ui.Cyan(args[0]))
			if _, err := s.apps.RestartAppInstance(cmd.Context(), &basinv1.RestartAppInstanceRequest{Name: args[0], Index: int32(idx)}); err != nil {
				return fmt.Errorf("restart instance %d of %s: %w", idx, args[0], err)
			}
			s.ui.OK()
			return nil
		},
	}
}

func newRestageCommand() *cobra.Command {
	var strategy string
	c := &cobra.Command{
		Use:     "restage NAME [--strategy rolling]",
		Short:   "Stage an app's last uploaded bits again, then restart it on the new droplet",
		Example: "  basin restage myapp\n  basin restage myapp --strategy rolling",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := connect(cmd)
			if err != nil {
				return err
			}
			name := args[0]
			resp, err := s.apps.GetApp(cmd.Context(), &basinv1.GetAppRequest{Name: name})
			if err != nil {
				return fmt.Errorf("restage %s: %w", name, err)
			}
			a := resp.GetApp()
			if a.GetPackageDigest() == "" {
				return ui.WithHint(fmt.Errorf("restage %s: the app has no uploaded bits (it was pushed as a droplet, or never)", name),
					"Push its source with `basin push "+name+" -p PATH`.")
			}
			s.ui.Say("Restaging app %s...", s.ui.Cyan(name))
			if err := stage(cmd.Context(), s, a, a.GetPackageDigest()); err != nil {
				return err
			}
			if strategy == "rolling" {
				if err := roll(cmd.Context(), s, name); err != nil {
					return err
				}
			} else if _, err := s.apps.RestartApp(cmd.Context(), &basinv1.RestartAppRequest{Name: name}); err != nil {
				return fmt.Errorf("restart %s: %w", name, err)
			}
			r, err := waitRunning(cmd.Context(), s, name, startTimeout)
			if err != nil {
				return err
			}
			printSummary(s.ui, r, time.Now())
			return nil
		},
	}
	c.Flags().StringVar(&strategy, "strategy", "", "rolling: no downtime")
	return c
}

func newDeleteCommand() *cobra.Command {
	var force, routes bool
	c := &cobra.Command{
		Use:     "delete NAME [-f] [-r]",
		Short:   "Delete an app (its instances, settings and events)",
		Long:    "Delete an app. Its routes stay, unmapped, unless -r deletes them too.",
		Example: "  basin delete myapp -f\n  basin delete myapp -f -r",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			if !force {
				if !confirm(cmd, fmt.Sprintf("Really delete the app %s? [yN]: ", name)) {
					fmt.Fprintln(cmd.OutOrStdout(), "Delete cancelled.")
					return nil
				}
			}
			s, err := connect(cmd)
			if err != nil {
				return err
			}
			s.ui.Say("Deleting app %s...", s.ui.Cyan(name))
			_, err = s.apps.DeleteApp(cmd.Context(), &basinv1.DeleteAppRequest{Name: name, DeleteRoutes: routes})
			if status.Code(err) == codes.NotFound {
				s.ui.Say("App %s does not exist.", name)
				s.ui.OK()
				return nil
			}
			if err != nil {
				return fmt.Errorf("delete app %s: %w", name, err)
			}
			s.ui.OK()
			return nil
		},
	}
	c.Flags().BoolVarP(&force, "force", "f", false, "do not ask for confirmation")
	c.Flags().BoolVarP(&routes, "delete-routes", "r", false, "delete the app's routes too")
	return c
}

func confirm(cmd *cobra.Command, prompt string) bool {
	fmt.Fprint(cmd.OutOrStdout(), prompt)
	var answer string
	fmt.Fscanln(cmd.InOrStdin(), &answer)
	return strings.EqualFold(answer, "y") || strings.EqualFold(answer, "yes")
}

func newEnvCommand() *cobra.Command {
	var asJSON *bool
	c := &cobra.Command{
		Use:     "env NAME",
		Short:   "Show the environment variables an app sets",
		Long:    "Show the user-provided environment of an app. The platform adds PORT, VCAP_APPLICATION, CF_INSTANCE_* and the rest in each instance.",
		Example: "  basin env myapp",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := connect(cmd)
			if err != nil {
				return err
			}
			resp, err := s.apps.GetApp(cmd.Context(), &basinv1.GetAppRequest{Name: args[0]})
			if err != nil {
				return fmt.Errorf("show env of %s: %w", args[0], err)
			}
			env := resp.GetApp().GetEnv()
			if *asJSON {
				if env == nil {
					env = map[string]string{}
				}
				return s.ui.JSON(env)
			}
			s.ui.Say("%s", s.ui.Bold("User-Provided:"))
			for _, k := range slices.Sorted(maps.Keys(env)) {
				s.ui.Say("%s: %s", k, env[k])
			}
			if len(env) == 0 {
				s.ui.Say("No user-provided environment variables have been set.")
			}
			return nil
		},
	}
	asJSON = jsonFlag(c)
	return c
}

func newSetEnvCommand() *cobra.Command {
	return &cobra.Command{
		Use:     "set-env NAME VAR VALUE",
		Short:   "Set an environment variable of an app (restart to apply)",
		Example: "  basin set-env myapp GREETING hello\n  basin restart myapp",
		Args:    cobra.ExactArgs(3),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := connect(cmd)
			if err != nil {
				return err
			}
			s.ui.Say("Setting env variable %s for app %s...", s.ui.Cyan(args[1]), s.ui.Cyan(args[0]))
			if _, err := s.apps.UpdateEnv(cmd.Context(), &basinv1.UpdateEnvRequest{Name: args[0], Set: map[string]string{args[1]: args[2]}}); err != nil {
				return fmt.Errorf("set %s on %s: %w", args[1], args[0], err)
			}
			s.ui.OK()
			s.ui.Say("Tip: use `basin restart %s` to make the change take effect.", args[0])
			return nil
		},
	}
}

func newUnsetEnvCommand() *cobra.Command {
	return &cobra.Command{
		Use:     "unset-env NAME VAR",
		Short:   "Remove an environment variable of an app (restart to apply)",
		Example: "  basin unset-env myapp GREETING",
		Args:    cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := connect(cmd)
			if err != nil {
				return err
			}
			s.ui.Say("Removing env variable %s from app %s...", s.ui.Cyan(args[1]), s.ui.Cyan(args[0]))
			if _, err := s.apps.UpdateEnv(cmd.Context(), &basinv1.UpdateEnvRequest{Name: args[0], Unset: []string{args[1]}}); err != nil {
				return fmt.Errorf("unset %s on %s: %w", args[1], args[0], err)
			}
			s.ui.OK()
			s.ui.Say("Tip: use `basin restart %s` to make the change take effect.", args[0])
			return nil
		},
	}
}

func newEventsCommand() *cobra.Command {
	var asJSON *bool
	c := &cobra.Command{
		Use:     "events NAME",
		Short:   "Show an app's recent events: changes and crashes",
		Example: "  basin events myapp",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := connect(cmd)
			if err != nil {
				return err
			}
			resp, err := s.apps.ListAppEvents(cmd.Context(), &basinv1.ListAppEventsRequest{Name: args[0]})
			if err != nil {
				return fmt.Errorf("list events of %s: %w", args[0], err)
			}
			if *asJSON {
				var ms []proto.Message
				for _, e := range resp.GetEvents() {
					ms = append(ms, e)
				}
				return s.ui.JSON(ms)
			}
			evs := resp.GetEvents()
			if len(evs) == 0 {
				s.ui.Say("No events for app %s.", args[0])
				return nil
			}
			var rows [][]string
			// cf prints the newest first.
			for i := len(evs) - 1; i >= 0; i-- {
				e := evs[i]
				rows = append(rows, []string{time.Unix(0, e.GetTimeUnixNano()).Format("2006-01-02T15:04:05.00-0700"), e.GetType(), "basin", e.GetDescription()})
			}
			s.ui.Table([]string{"time", "event", "actor", "description"}, rows)
			return nil
		},
	}
	asJSON = jsonFlag(c)
	return c
}
