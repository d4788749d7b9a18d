//go:build integration

package integration

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"

	"github.com/basinpaas/basin/cell/containerdproc"
	"github.com/basinpaas/basin/stack"
)

// TestEnsureBookworm builds the bookworm stack when this machine has not
// (once per recipe, cached) and imports it into containerd once.
func TestEnsureBookworm(t *testing.T) {
	needCell(t)
	ctx, cancel := context.WithCancel(context.Background())
	dir, err := containerdproc.ShortDir("basin-stack-test")
	if err != nil {
		t.Fatal(err)
	}
	d, err := containerdproc.Start(ctx, containerdproc.Config{Dir: dir})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); <-d.Stopped(); os.RemoveAll(dir) })
	c, err := client.New(d.Address())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	t0 := time.Now()
	name, err := stack.Ensure(ctx, c, "bookworm", t.TempDir())
	if err != nil {
		t.Fatalf("Ensure bookworm: %v", err)
	}
	t.Logf("imported %s in %s", name, time.Since(t0).Round(time.Millisecond))
	if name != stack.SnapshotName("bookworm", stack.BookwormDigest()) {
		t.Errorf("snapshot %s, want %s", name, stack.SnapshotName("bookworm", stack.BookwormDigest()))
	}
	again, err := stack.Ensure(ctx, c, "bookworm", t.TempDir())
	if err != nil || again != name {
		t.Fatalf("second Ensure = %q, %v; want %q", again, err, name)
	}
	nctx := namespaces.WithNamespace(ctx, stack.Namespace)
	if err := c.SnapshotService(stack.Snapshotter).Remove(nctx, name); err != nil {
		t.Errorf("remove %s: %v", name, err)
	}
}
