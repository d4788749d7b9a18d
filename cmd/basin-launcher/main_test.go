package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestLauncherSourcesProfilesAndRunsCommand(t *testing.T) {
	tmp := t.TempDir()
	bin := filepath.Join(tmp, "basin-launcher")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	home := filepath.Join(tmp, "home")
	files := map[string]string{
		"profile.d/a.sh":       "export A=deps D=$(basename $DEPS_DIR)\n",
		"app/.profile.d/b.sh":  "export B=${A}-app\n",
		"app/.profile":         "export C=profile\n",
		"staging_info.yml":     `{"detected_buildpack":"x","start_command":"echo staged $C"}`,
		"app/placeholder.html": "",
	}
	for name, body := range files {
		p := filepath.Join(home, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"given command", []string{"echo", "$A", "$B", "$C", "$D", "$(basename $(pwd))"}, "deps deps-app profile deps app"},
		{"staged command", nil, "staged profile"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"-dir", filepath.Join(home, "app")}, tc.args...)
			out, err := exec.Command(bin, args...).CombinedOutput()
			if err != nil {
				t.Fatalf("launcher: %v\n%s", err, out)
			}
			if got := strings.TrimSpace(string(out)); got != tc.want {
				t.Errorf("output %q, want %q", got, tc.want)
			}
		})
	}
}
