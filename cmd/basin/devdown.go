package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/basinpaas/basin/cell"
	"github.com/spf13/cobra"
)

func newDevDownCommand() *cobra.Command {
	var dir string
	down := &cobra.Command{
		Use:   "down",
		Short: "Remove everything basin dev up created on this machine",
		Long: `Remove what basin dev up left on this machine: the apps' containers with
their snapshots, network namespaces and port mappings, the cells' bridges and
firewall chains, and the platform's state (etcd data, blobs, droplets). Stop
basin dev up (Ctrl-C) first.`,
		Example: "  sudo basin dev down",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return devDown(cmd.Context(), cmd.OutOrStdout(), dir)
		},
	}
	down.Flags().StringVar(&dir, "dir", defaultDevDir(), "the state directory basin dev up used")
	return down
}

const pidFile = "basin.pid"

// writePID records dev up's process so dev down refuses to run under it.
func writePID(dir string) error {
	return os.WriteFile(filepath.Join(dir, pidFile), []byte(strconv.Itoa(os.Getpid())+"\n"), 0o600)
}

// runningPID returns the pid of a dev up still running on dir, or 0.
func runningPID(dir string) int {
	b, err := os.ReadFile(filepath.Join(dir, pidFile))
	if err != nil {
		return 0
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 || pid == os.Getpid() {
		return 0
	}
	if err := syscall.Kill(pid, 0); err != nil {
		return 0
	}
	return pid
}

func devDown(ctx context.Context, out io.Writer, dir string) error {
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		fmt.Fprintf(out, "nothing to remove: %s does not exist\n", dir)
		return nil
	}
	if pid := runningPID(dir); pid != 0 {
		return fmt.Errorf("basin dev up is still running on %s (pid %d): stop it with Ctrl-C first", dir, pid)
	}
	step := func(format string, args ...any) { fmt.Fprintf(out, "  ✓ "+format+"\n", args...) }
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	cellDirs, _ := filepath.Glob(filepath.Join(dir, "cells", "cell-*"))
	if len(cellDirs) > 0 {
		// The executor checks its launcher even when it only tears down.
		launcher, err := launcherPath()
		if err != nil {
			return err
		}
		ctrd, addr, stopCtrd, err := connectContainerd(ctx, filepath.Join(dir, "containerd"), log)
		if err != nil {
			return err
		}
		defer stopCtrd()
		step("containerd    %s", addr)
		netID := readNetID(dir)
		base := cell.Config{ID: "cell", StateDir: filepath.Join(dir, "cells"), Containerd: ctrd, LauncherPath: launcher, Logger: log}
		var errs []error
		for _, d := range cellDirs {
			i, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(d), "cell-"))
			if err != nil {
				continue
			}
			cfg := devCellConfig(base, netID, i)
			if err := cell.Purge(ctx, cfg); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", cfg.ID, err))
				continue
			}
			step("%-13s containers, network and firewall removed", cfg.ID)
		}
		if err := errors.Join(errs...); err != nil {
			return fmt.Errorf("clean up cells (state in %s kept): %w", dir, err)
		}
		stopCtrd()
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove %s: %w", dir, err)
	}
	step("state         %s removed", dir)
	if err := os.Remove(targetPath()); err == nil {
		step("target        %s removed", targetPath())
	}
	return nil
}
