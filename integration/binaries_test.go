//go:build integration

package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

var (
	binMu  sync.Mutex
	binDir string               // removed by TestMain
	built  = map[string]error{} // command name -> its build's outcome
)

// command builds ../cmd/<name> once per test run and returns its path. Every
// command goes to one directory, so basin finds basin-launcher beside it as
// after make build; basin-launcher and basin-builder are static, since they run in containers.
func command(t *testing.T, name string) string {
	t.Helper()
	binMu.Lock()
	defer binMu.Unlock()
	if binDir == "" {
		dir, err := os.MkdirTemp("", "basin-it-bin-")
		if err != nil {
			t.Fatal(err)
		}
		binDir = dir
	}
	path := filepath.Join(binDir, name)
	err, done := built[name]
	if !done {
		cmd := exec.Command("go", "build", "-o", path, "../cmd/"+name)
		if name == "basin-launcher" || name == "basin-builder" {
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		}
		if out, e := cmd.CombinedOutput(); e != nil {
			err = fmt.Errorf("%w: %s", e, out)
		}
		built[name] = err
	}
	if err != nil {
		t.Fatalf("build cmd/%s: %v", name, err)
	}
	return path
}
