package main

import (
	"fmt"
	"os"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/spf13/cobra"

	"github.com/basinpaas/basin/stack"
)

func newStackCommand() *cobra.Command {
	st := &cobra.Command{
		Use:   "stack",
		Short: "Build the root filesystems apps run on",
	}
	var dir, containerd string
	build := &cobra.Command{
		Use:   "build tiny",
		Short: "Build a stack's root filesystem, and import it into containerd when given a socket",
		Long: `Build the tiny stack (Debian's busybox-static, user vcap uid 2000) into a
directory. With --containerd it is also committed into containerd as a
snapshot, once per recipe: cells then start instances as overlays on it.`,
		Example: "  basin stack build tiny --dir /tmp/tiny\n  sudo basin stack build tiny --containerd /run/basin/containerd/containerd.sock",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if args[0] != "tiny" {
				return fmt.Errorf("stack %q: %w (this version builds only tiny)", args[0], stack.ErrUnknownStack)
			}
			out := cmd.OutOrStdout()
			ctx := cmd.Context()
			t0 := time.Now()
			target := dir
			if target == "" {
				tmp, err := os.MkdirTemp("", "basin-stack-")
				if err != nil {
					return err
				}
				defer os.RemoveAll(tmp)
				target = tmp + "/rootfs"
			}
			rootfs, err := stack.BuildTiny(ctx, target)
			if err != nil {
				return err
			}
			fmt.Fprintf(out, "built tiny %s in %s (%s)\n", rootfs.Digest, target, time.Since(t0).Round(time.Millisecond))
			if containerd == "" {
				return nil
			}
			c, err := client.New(containerd)
			if err != nil {
				return fmt.Errorf("containerd at %s: %w", containerd, err)
			}
			defer c.Close()
			name, err := stack.Import(ctx, c, rootfs)
			if err != nil {
				return err
			}
			fmt.Fprintf(out, "imported as snapshot %s (%s in all)\n", name, time.Since(t0).Round(time.Millisecond))
			return nil
		},
	}
	build.Flags().StringVar(&dir, "dir", "", "where to write the root filesystem (default: a temporary directory, removed after import)")
	build.Flags().StringVar(&containerd, "containerd", "", "containerd socket to import the stack into")
	st.AddCommand(build)
	return st
}
