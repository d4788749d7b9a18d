package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"
	"strings"

	"github.com/spf13/cobra"
)

// debianPackages are what the platform runs on (ARCHITECTURE.md,
// "Dependencies"); scripts/setup.sh runs `basin setup` so the list lives here
// only.
var debianPackages = []string{"containerd", "runc", "containernetworking-plugins", "iptables", "iproute2", "busybox-static", "debootstrap"}

// testPackages are what the tests need besides: nginx with its DAV module
// for the WebDAV blobstore, and a JDK that builds the Java example.
var testPackages = []string{"nginx-light", "openjdk-17-jdk-headless"}

func newSetupCommand() *cobra.Command {
	var forTests bool
	cmd := &cobra.Command{
		Use:   "setup",
		Short: "Install the Debian packages basin needs (containerd, runc, CNI plugins, iptables, ...)",
		Long: `Install what basin needs on this machine from Debian's packages, saying what it
installs. It installs only what is missing, so it is safe to run again.
basin dev up runs it first.`,
		Example: "  sudo basin setup\n  sudo basin setup --for-tests",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			pkgs := debianPackages
			if forTests {
				pkgs = append(slices.Clone(pkgs), testPackages...)
			}
			return ensurePackages(cmd.Context(), cmd.OutOrStdout(), pkgs)
		},
	}
	cmd.Flags().BoolVar(&forTests, "for-tests", false, "also install what the tests use ("+strings.Join(testPackages, ", ")+")")
	return cmd
}

// missingPackages asks dpkg which of pkgs are not installed.
func missingPackages(ctx context.Context, pkgs []string) []string {
	var missing []string
	for _, p := range pkgs {
		out, err := exec.CommandContext(ctx, "dpkg-query", "-W", "-f=${Status}", p).Output()
		if err != nil || !strings.Contains(string(out), "install ok installed") {
			missing = append(missing, p)
		}
	}
	return missing
}

func ensurePackages(ctx context.Context, out io.Writer, pkgs []string) error {
	if _, err := exec.LookPath("dpkg-query"); err != nil {
		return fmt.Errorf("basin installs its dependencies with Debian's apt; this machine has no dpkg-query: install %s yourself", strings.Join(pkgs, ", "))
	}
	missing := missingPackages(ctx, pkgs)
	if len(missing) == 0 {
		return nil
	}
	if os.Geteuid() != 0 {
		return fmt.Errorf("missing Debian packages %s: run as root (sudo basin setup) to install them", strings.Join(missing, " "))
	}
	fmt.Fprintf(out, "  … installing %s from Debian's packages\n", strings.Join(missing, " "))
	run := func(args ...string) error {
		cmd := exec.CommandContext(ctx, "apt-get", args...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		if b, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("apt-get %s: %w\n%s", strings.Join(args, " "), err, lastLines(string(b), 15))
		}
		return nil
	}
	if err := run("update", "-qq"); err != nil {
		return err
	}
	if err := run(append([]string{"install", "-y", "-qq", "--no-install-recommends"}, missing...)...); err != nil {
		return err
	}
	if still := missingPackages(ctx, missing); len(still) > 0 {
		return fmt.Errorf("apt-get finished but %s are still not installed", strings.Join(still, " "))
	}
	fmt.Fprintf(out, "  ✓ installed %s\n", strings.Join(missing, " "))
	return nil
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
