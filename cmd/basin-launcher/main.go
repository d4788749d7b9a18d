// Command basin-launcher is the first process of every app container: it
// enters the app directory, sources the environment the buildpacks left
// (../profile.d/*, .profile.d/*, .profile) and execs the start command, the
// way Cloud Foundry's launcher does. It is built statically (CGO_ENABLED=0)
// and mounted read-only into containers, so it must not depend on the stack.
//
// Usage: basin-launcher [-dir DIR] START_COMMAND
//
// Without a start command it uses staging_info.yml's start_command.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
)

// script runs in the shell that sources the profiles, so functions and
// unexported variables they define are visible to the start command, which
// then replaces that shell. $1 is the app dir, $2 the shell, $3 the command.
const script = `cd "$1" || exit 1
for f in ../profile.d/*; do [ -f "$f" ] && . "$f"; done
for f in .profile.d/*; do [ -f "$f" ] && . "$f"; done
[ -f .profile ] && . ./.profile
exec "$2" -c "$3"
`

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintf(os.Stderr, "basin-launcher: %v\n", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("basin-launcher", flag.ContinueOnError)
	dir := fs.String("dir", "/home/vcap/app", "app directory")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cmd := strings.Join(fs.Args(), " ")
	if cmd == "" {
		c, err := stagedCommand(filepath.Join(filepath.Dir(*dir), "staging_info.yml"))
		if err != nil {
			return err
		}
		cmd = c
	}
	// Buildpacks' profile.d scripts find what supply left under DEPS_DIR;
	// the cell sets it, and it is always the droplet's deps/.
	if os.Getenv("DEPS_DIR") == "" {
		abs, err := filepath.Abs(filepath.Join(*dir, "..", "deps"))
		if err != nil {
			return err
		}
		os.Setenv("DEPS_DIR", abs)
	}
	if os.Getenv("PATH") == "" {
		os.Setenv("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
	}
	shell := "/bin/sh"
	for _, s := range []string{"/bin/bash", "/usr/bin/bash"} {
		if fi, err := os.Stat(s); err == nil && fi.Mode().IsRegular() {
			shell = s
			break
		}
	}
	argv := []string{filepath.Base(shell), "-c", script, "basin-launcher", *dir, shell, cmd}
	if os.Getpid() == 1 {
		os.Exit(runAsInit(shell, argv))
	}
	if err := syscall.Exec(shell, argv, os.Environ()); err != nil {
		return fmt.Errorf("exec %s: %w", shell, err)
	}
	return nil
}

// runAsInit runs the app as a child when the launcher is a container's
// PID 1. The kernel drops signals to PID 1 that it has no handler for, so
// an app running as PID 1 would ignore SIGTERM and always wait out the
// grace period; as init the launcher forwards signals to the app, reaps
// orphaned processes and exits with the app's status.
func runAsInit(shell string, argv []string) int {
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGQUIT, syscall.SIGUSR1, syscall.SIGUSR2)
	pid, err := syscall.ForkExec(shell, argv, &syscall.ProcAttr{
		Env:   os.Environ(),
		Files: []uintptr{0, 1, 2},
	})
	if err != nil {
		fmt.Fprintf(os.Stderr, "basin-launcher: start %s: %v\n", shell, err)
		return 1
	}
	go func() {
		for s := range sigs {
			_ = syscall.Kill(pid, s.(syscall.Signal))
		}
	}()
	for {
		var ws syscall.WaitStatus
		wpid, err := syscall.Wait4(-1, &ws, 0, nil)
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "basin-launcher: wait: %v\n", err)
			return 1
		}
		if wpid != pid {
			continue // an orphan reaped
		}
		if ws.Signaled() {
			return 128 + int(ws.Signal())
		}
		return ws.ExitStatus()
	}
}

// stagedCommand reads the start command from staging_info.yml, which basin
// (like Cloud Foundry) writes as JSON, a subset of YAML.
func stagedCommand(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("no start command given and %w", err)
	}
	var info struct {
		StartCommand string `json:"start_command"`
	}
	if err := json.Unmarshal(b, &info); err != nil {
		return "", fmt.Errorf("parse %s: %w", path, err)
	}
	if info.StartCommand == "" {
		return "", errors.New("no start command given and staging_info.yml has none")
	}
	return info.StartCommand, nil
}
