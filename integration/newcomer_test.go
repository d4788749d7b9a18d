//go:build integration

package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestReadmeNewcomer does what the README's first screen tells a newcomer:
// `make up` starts the platform (with free ports and a fresh BASIN_HOME, the
// only departures, through UP_FLAGS), then `basin push` of an example makes
// it answer through the router. (The second command, `make test`, is what CI
// runs.)
func TestReadmeNewcomer(t *testing.T) {
	needCell(t)
	const netID = 12
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	basin := filepath.Join(root, "bin", "basin")
	d := &devUp{api: freeLoopbackAddr(t), router: freeLoopbackAddr(t), home: t.TempDir()}
	flags := strings.Join([]string{"--api", d.api, "--etcd", freeLoopbackAddr(t), "--debug", freeLoopbackAddr(t),
		"--router", d.router, "--net-id", fmt.Sprint(netID)}, " ")
	t0 := time.Now()
	d.start(t, exec.Command("make", "-s", "-C", root, "up", "UP_FLAGS="+flags))
	t.Logf("make up: platform up in %s", time.Since(t0).Round(time.Millisecond))
	t.Cleanup(func() { removeNetBridges(netID) })
	d.downOnCleanup(t, basin)

	push := exec.Command(basin, "push", "static", "-p", filepath.Join(root, "examples", "static"))
	push.Env = append(os.Environ(), "BASIN_HOME="+d.home)
	t0 = time.Now()
	out, err := push.CombinedOutput()
	t.Logf("$ basin push static -p examples/static (%s)\n%s", time.Since(t0).Round(time.Millisecond), out)
	if err != nil {
		t.Fatalf("basin push: %v", err)
	}
	d.waitBody(t, "static.apps.localhost", "hello from static", time.Minute)
}
