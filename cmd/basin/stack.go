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
		Use:   "build tiny|bookworm",
		Short: "Build a stack's root filesystem, and import it into containerd when given a socket",
		Long: `Build a stack's root filesystem:

  tiny      Debian's busybox-static and user vcap (uid 2000), for fast tests.
  bookworm  Debian 12 (debootstrap minbase from the mirror in this machine's
            apt configuration) with the runtimes of the built-in buildpacks.
            Needs root; cached under /var/cache/basin/stacks by recipe digest,
            so it is built once per recipe.

With --dir the root filesystem is written there; with --containerd it is
also committed into containerd as a snapshot, once per recipe: cells then
start instances as overlays on it.`,
		Example: "  basin stack build tiny --dir /tmp/tiny\n  sudo basin stack build bookworm\n  sudo basin stack build bookworm --containerd /run/basin/containerd/containerd.sock",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			out := cmd.OutOrStdout()
			ctx := cmd.Context()
			t0 := time.Now()
			var rootfs stack.Rootfs
			var err error
			switch args[0] {
			case "tiny":
				target := dir
				if target == "" {
					tmp, err := os.MkdirTemp("", "basin-stack-")
					if err != nil {
						return err
					}
					defer os.RemoveAll(tmp)
					target = tmp + "/rootfs"
				}
				rootfs, err = stack.BuildTiny(ctx, target)
			case "bookworm":
				opts := stack.BookwormOptions{Log: cmd.ErrOrStderr()}
				if dir == "" {
					rootfs, err = stack.CachedBookworm(ctx, opts)
				} else {
					rootfs, err = stack.BuildBookworm(ctx, dir, opts)
				}
			default:
				return fmt.Errorf("stack %q: %w (stacks: tiny, bookworm)", args[0], stack.ErrUnknownStack)
			}
			if err != nil {
				return err
			}
			fmt.Fprintf(out, "built %s %s in %s (%s)\n", rootfs.Name, rootfs.Digest, rootfs.Dir, time.Since(t0).Round(time.Millisecond))
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
	build.Flags().StringVar(&dir, "dir", "", "where to write the root filesystem (default: tiny to a temporary directory removed after import; bookworm to the machine's cache)")
	build.Flags().StringVar(&containerd, "containerd", "", "containerd socket to import the stack into")
	st.AddCommand(build)
	return st
}
