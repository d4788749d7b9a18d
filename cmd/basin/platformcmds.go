package main

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/basinpaas/basin/cmd/basin/internal/ui"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// noStagingService explains a missing StagingService.
func noStagingService(what string, err error) error {
	if status.Code(err) == codes.Unimplemented {
		return ui.WithHint(fmt.Errorf("%s: this installation does not serve the StagingService, which keeps the buildpacks", what),
			"Upgrade the platform; apps can still be pushed as droplets with `basin push NAME --droplet PATH`.")
	}
	return fmt.Errorf("%s: %w", what, err)
}

func newPlatformCommands() []*cobra.Command {
	return []*cobra.Command{newBuildpacksCommand(), newCreateBuildpackCommand(), newUpdateBuildpackCommand(),
		newDeleteBuildpackCommand(), newStacksCommand(), newCellsCommand()}
}

func newBuildpacksCommand() *cobra.Command {
	var asJSON *bool
	c := &cobra.Command{
		Use:     "buildpacks",
		Short:   "List the admin buildpacks, in detection order",
		Example: "  basin buildpacks",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := connect(cmd)
			if err != nil {
				return err
			}
			resp, err := s.staging.ListBuildpacks(cmd.Context(), &basinv1.ListBuildpacksRequest{})
			if err != nil {
				return noStagingService("list buildpacks", err)
			}
			bps := resp.GetBuildpacks()
			slices.SortFunc(bps, func(a, b *basinv1.Buildpack) int { return int(a.GetPosition() - b.GetPosition()) })
			if *asJSON {
				var ms []proto.Message
				for _, b := range bps {
					ms = append(ms, b)
				}
				return s.ui.JSON(ms)
			}
			var rows [][]string
			for _, b := range bps {
				rows = append(rows, []string{strconv.Itoa(int(b.GetPosition())), b.GetName(), orDash(b.GetStack()),
					strconv.FormatBool(b.GetEnabled()), orDash(b.GetFilename())})
			}
			s.ui.Table([]string{"position", "name", "stack", "enabled", "filename"}, rows)
			return nil
		},
	}
	asJSON = jsonFlag(c)
	return c
}

func uploadBuildpack(cmd *cobra.Command, s *session, path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("open buildpack archive: %w", err)
	}
	defer f.Close()
	digest, size, err := s.bbs.UploadBlob(cmd.Context(), f, "")
	if err != nil {
		return "", fmt.Errorf("upload buildpack %s: %w", path, err)
	}
	s.ui.Say("Uploaded %s (%s)", filepath.Base(path), ui.Bytes(size))
	return digest, nil
}

func newCreateBuildpackCommand() *cobra.Command {
	var disable bool
	var stack string
	c := &cobra.Command{
		Use:     "create-buildpack NAME PATH POSITION",
		Short:   "Add an admin buildpack from a zip or tar.gz at a detection position",
		Example: "  basin create-buildpack my_buildpack ./my_buildpack.zip 1",
		Args:    cobra.ExactArgs(3),
		RunE: func(cmd *cobra.Command, args []string) error {
			pos, err := strconv.Atoi(args[2])
			if err != nil || pos < 0 {
				return fmt.Errorf("POSITION %q: want a number, 1 for first (0 for last)", args[2])
			}
			s, err := connect(cmd)
			if err != nil {
				return err
			}
			s.ui.Say("Creating buildpack %s...", s.ui.Cyan(args[0]))
			digest, err := uploadBuildpack(cmd, s, args[1])
			if err != nil {
				return err
			}
			_, err = s.staging.CreateBuildpack(cmd.Context(), &basinv1.CreateBuildpackRequest{Buildpack: &basinv1.Buildpack{
				Name: args[0], Position: int32(pos), Enabled: !disable, Digest: digest, Stack: stack, Filename: filepath.Base(args[1])}})
			if err != nil {
				return noStagingService("create buildpack "+args[0], err)
			}
			s.ui.OK()
			return nil
		},
	}
	c.Flags().BoolVar(&disable, "disable", false, "create it disabled")
	c.Flags().StringVarP(&stack, "stack", "s", "", "only for this stack")
	return c
}

func newUpdateBuildpackCommand() *cobra.Command {
	var path string
	var position int32
	var enable, disable bool
	c := &cobra.Command{
		Use:     "update-buildpack NAME [-p PATH] [-i POSITION] [--enable|--disable]",
		Short:   "Change an admin buildpack's archive, position or enablement",
		Example: "  basin update-buildpack ruby -i 1\n  basin update-buildpack ruby -p ./ruby.zip --enable",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if enable && disable {
				return fmt.Errorf("--enable and --disable contradict each other")
			}
			s, err := connect(cmd)
			if err != nil {
				return err
			}
			req := &basinv1.UpdateBuildpackRequest{Name: args[0]}
			if cmd.Flags().Changed("position") {
				req.Position = &position
			}
			if enable || disable {
				e := enable
				req.Enabled = &e
			}
			if path != "" {
				digest, err := uploadBuildpack(cmd, s, path)
				if err != nil {
					return err
				}
				fn := filepath.Base(path)
				req.Digest, req.Filename = &digest, &fn
			}
			s.ui.Say("Updating buildpack %s...", s.ui.Cyan(args[0]))
			if _, err := s.staging.UpdateBuildpack(cmd.Context(), req); err != nil {
				return noStagingService("update buildpack "+args[0], err)
			}
			s.ui.OK()
			return nil
		},
	}
	c.Flags().StringVarP(&path, "path", "p", "", "new archive")
	c.Flags().Int32VarP(&position, "position", "i", 0, "new detection position")
	c.Flags().BoolVar(&enable, "enable", false, "enable it")
	c.Flags().BoolVar(&disable, "disable", false, "disable it")
	return c
}

func newDeleteBuildpackCommand() *cobra.Command {
	var force bool
	c := &cobra.Command{
		Use:     "delete-buildpack NAME [-f]",
		Short:   "Delete an admin buildpack",
		Example: "  basin delete-buildpack my_buildpack -f",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if !force && !confirm(cmd, fmt.Sprintf("Really delete the buildpack %s? [yN]: ", args[0])) {
				fmt.Fprintln(cmd.OutOrStdout(), "Delete cancelled.")
				return nil
			}
			s, err := connect(cmd)
			if err != nil {
				return err
			}
			s.ui.Say("Deleting buildpack %s...", s.ui.Cyan(args[0]))
			if _, err := s.staging.DeleteBuildpack(cmd.Context(), &basinv1.DeleteBuildpackRequest{Name: args[0]}); err != nil {
				return noStagingService("delete buildpack "+args[0], err)
			}
			s.ui.OK()
			return nil
		},
	}
	c.Flags().BoolVarP(&force, "force", "f", false, "do not ask for confirmation")
	return c
}

func newStacksCommand() *cobra.Command {
	var asJSON *bool
	c := &cobra.Command{
		Use:     "stacks",
		Short:   "List the stacks apps can run on, and how many cells offer each",
		Example: "  basin stacks",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := connect(cmd)
			if err != nil {
				return err
			}
			resp, err := s.bbs.ListCells(cmd.Context(), &basinv1.ListCellsRequest{})
			if err != nil {
				return fmt.Errorf("list stacks: %w", err)
			}
			count := map[string]int{}
			for _, c := range resp.GetCells() {
				for _, st := range c.GetStacks() {
					count[st]++
				}
			}
			type stack struct {
				Name  string `json:"name"`
				Cells int    `json:"cells"`
			}
			var out []stack
			for n, c := range count {
				out = append(out, stack{n, c})
			}
			slices.SortFunc(out, func(a, b stack) int { return strings.Compare(a.Name, b.Name) })
			if *asJSON {
				if out == nil {
					out = []stack{}
				}
				return s.ui.JSON(out)
			}
			if len(out) == 0 {
				s.ui.Say("No stacks: no cell is running.")
				return nil
			}
			var rows [][]string
			for _, st := range out {
				rows = append(rows, []string{st.Name, strconv.Itoa(st.Cells)})
			}
			s.ui.Table([]string{"name", "cells"}, rows)
			return nil
		},
	}
	asJSON = jsonFlag(c)
	return c
}

func newCellsCommand() *cobra.Command {
	var asJSON *bool
	c := &cobra.Command{
		Use:     "cells",
		Short:   "List cells with their capacity and what is placed on them",
		Example: "  basin cells\n  basin cells --json",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := connect(cmd)
			if err != nil {
				return err
			}
			cells, err := s.bbs.ListCells(cmd.Context(), &basinv1.ListCellsRequest{})
			if err != nil {
				return fmt.Errorf("list cells: %w", err)
			}
			scheds, err := s.bbs.ListDesiredLRPSchedules(cmd.Context(), &basinv1.ListDesiredLRPSchedulesRequest{})
			if err != nil {
				return fmt.Errorf("list cells: %w", err)
			}
			actuals, err := s.bbs.ListActualLRPs(cmd.Context(), &basinv1.ListActualLRPsRequest{})
			if err != nil {
				return fmt.Errorf("list cells: %w", err)
			}
			res := map[string]*basinv1.ResourceLimits{}
			for _, sc := range scheds.GetSchedules() {
				res[sc.GetProcessGuid()] = sc.GetResources()
			}
			type usage struct {
				CellID       string   `json:"cell_id"`
				Zone         string   `json:"zone"`
				Address      string   `json:"rep_address"`
				Stacks       []string `json:"stacks"`
				Evacuating   bool     `json:"evacuating"`
				MemoryMB     int64    `json:"memory_mb"`
				DiskMB       int64    `json:"disk_mb"`
				Containers   int32    `json:"containers"`
				UsedMemoryMB int64    `json:"used_memory_mb"`
				UsedDiskMB   int64    `json:"used_disk_mb"`
				Instances    int32    `json:"instances"`
			}
			byID := map[string]*usage{}
			var out []*usage
			for _, c := range cells.GetCells() {
				u := &usage{CellID: c.GetCellId(), Zone: c.GetZone(), Address: c.GetRepAddress(), Stacks: c.GetStacks(), Evacuating: c.GetEvacuating(),
					MemoryMB: c.GetCapacity().GetMemoryMb(), DiskMB: c.GetCapacity().GetDiskMb(), Containers: c.GetCapacity().GetContainers()}
				byID[u.CellID] = u
				out = append(out, u)
			}
			for _, a := range actuals.GetActualLrps() {
				u := byID[a.GetInstanceKey().GetCellId()]
				if u == nil || a.GetState() == basinv1.ActualLRPState_ACTUAL_LRP_STATE_CRASHED {
					continue
				}
				u.Instances++
				u.UsedMemoryMB += res[a.GetKey().GetProcessGuid()].GetMemoryMb()
				u.UsedDiskMB += res[a.GetKey().GetProcessGuid()].GetDiskMb()
			}
			slices.SortFunc(out, func(a, b *usage) int { return strings.Compare(a.CellID, b.CellID) })
			if *asJSON {
				if out == nil {
					out = []*usage{}
				}
				return s.ui.JSON(out)
			}
			if len(out) == 0 {
				s.ui.Say("No cells are running.")
				return nil
			}
			var rows [][]string
			for _, u := range out {
				state := "ok"
				if u.Evacuating {
					state = "evacuating"
				}
				rows = append(rows, []string{u.CellID, u.Zone, strings.Join(u.Stacks, ","),
					fmt.Sprintf("%s / %s", ui.MB(u.UsedMemoryMB), ui.MB(u.MemoryMB)),
					fmt.Sprintf("%s / %s", ui.MB(u.UsedDiskMB), ui.MB(u.DiskMB)),
					fmt.Sprintf("%d / %d", u.Instances, u.Containers), state, u.Address})
			}
			s.ui.Table([]string{"cell", "zone", "stacks", "memory (reserved)", "disk (reserved)", "containers", "state", "rep"}, rows)
			return nil
		},
	}
	asJSON = jsonFlag(c)
	return c
}
