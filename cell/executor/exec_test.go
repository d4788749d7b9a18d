package executor

import (
	"slices"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/basinpaas/basin/stack"
)

func TestExecProcessKeepsTheContainersLimitsAsVcap(t *testing.T) {
	base := &specs.Process{
		Args: []string{launcherPath}, Cwd: "/home/vcap/app", Env: []string{"PORT=8080", "HOME=/home/vcap/app"},
		User:         specs.User{UID: 0, GID: 0},
		Capabilities: &specs.LinuxCapabilities{Bounding: []string{"CAP_NET_RAW"}},
		Rlimits:      []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Hard: fdLimit, Soft: fdLimit}},
	}
	tests := []struct {
		name string
		spec ExecSpec
		want func(t *testing.T, p *specs.Process)
	}{
		{"command", ExecSpec{Args: []string{"id", "-u"}, Env: []string{"A=b"}}, func(t *testing.T, p *specs.Process) {
			if !slices.Equal(p.Args, []string{"id", "-u"}) || p.Terminal || p.ConsoleSize != nil {
				t.Errorf("args %q terminal %v size %v", p.Args, p.Terminal, p.ConsoleSize)
			}
			if !slices.Equal(p.Env, []string{"PORT=8080", "HOME=/home/vcap/app", "A=b"}) {
				t.Errorf("env %q: want the container's then the request's", p.Env)
			}
		}},
		{"tty", ExecSpec{Args: LoginShell, TTY: true, Size: WindowSize{Rows: 40, Cols: 120}}, func(t *testing.T, p *specs.Process) {
			if !p.Terminal || p.ConsoleSize == nil || p.ConsoleSize.Height != 40 || p.ConsoleSize.Width != 120 {
				t.Errorf("terminal %v size %v: want a 40x120 terminal", p.Terminal, p.ConsoleSize)
			}
			if !slices.Contains(p.Env, "TERM=xterm-256color") {
				t.Errorf("env %q lacks TERM", p.Env)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := execProcess(base, tt.spec)
			if p.User.UID != stack.VcapUID || p.User.GID != stack.VcapGID || p.Cwd != "/home/vcap/app" {
				t.Errorf("user %+v cwd %q: want vcap in /home/vcap/app", p.User, p.Cwd)
			}
			if !p.NoNewPrivileges || p.Capabilities == nil || len(p.Capabilities.Bounding)+len(p.Capabilities.Effective)+
				len(p.Capabilities.Permitted)+len(p.Capabilities.Ambient)+len(p.Capabilities.Inheritable) != 0 {
				t.Errorf("capabilities %+v no-new-privileges %v: want none and set", p.Capabilities, p.NoNewPrivileges)
			}
			if len(p.Rlimits) != 1 {
				t.Errorf("rlimits %v: want the container's", p.Rlimits)
			}
			tt.want(t, p)
		})
	}
	if len(base.Env) != 2 || base.Args[0] != launcherPath {
		t.Errorf("the container's spec was modified: %+v", base)
	}
}

func TestAcquireExecBoundsSessions(t *testing.T) {
	i := &instance{}
	var releases []func()
	for range 2 {
		r, err := i.acquireExec(2)
		if err != nil {
			t.Fatal(err)
		}
		releases = append(releases, r)
	}
	if _, err := i.acquireExec(2); err == nil {
		t.Fatal("third session admitted with a limit of 2")
	}
	releases[0]()
	if _, err := i.acquireExec(2); err != nil {
		t.Fatalf("after a release: %v", err)
	}
}
