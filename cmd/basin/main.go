// Command basin is the basin CLI: it runs a development platform on this
// machine (basin dev up) and talks to a basin installation.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/basinpaas/basin/cmd/basin/internal/ui"
	"github.com/spf13/cobra"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := newRootCommand().ExecuteContext(ctx); err != nil {
		stop()
		var code exitCode
		if errors.As(err, &code) {
			os.Exit(int(code))
		}
		u := ui.New(os.Stderr, os.Stderr)
		fmt.Fprintln(os.Stderr, u.Red("FAILED"))
		fmt.Fprintln(os.Stderr, ui.Explain(err, apiAddress))
		os.Exit(1)
	}
}

func newRootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:           "basin",
		Short:         "basin runs your apps: push code, get it staged, run, routed and healed",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(newVersionCommand(), newDevCommand(), newSetupCommand(), newCellCommand())
	root.AddCommand(newStackCommand(), newSSHCommand())
	root.AddCommand(newTargetCommands()...)
	root.AddCommand(newPushCommand(), newLogsCommand())
	root.AddCommand(newAppCommands()...)
	root.AddCommand(newRouteCommands()...)
	root.AddCommand(newTaskCommands()...)
	root.AddCommand(newPlatformCommands()...)
	return root
}

func newVersionCommand() *cobra.Command {
	return &cobra.Command{
		Use:     "version",
		Short:   "Print basin's version",
		Example: "  basin version",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fmt.Fprintf(cmd.OutOrStdout(), "basin %s\n", version)
			return nil
		},
	}
}
