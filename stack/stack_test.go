package stack

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/basinpaas/basin/cell/containerdproc"
	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
)

func needBusybox(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("/bin/busybox"); err != nil {
		t.Skip("Debian's busybox-static is not installed (run scripts/setup.sh as root)")
	}
}

func TestBuildTiny(t *testing.T) {
	needBusybox(t)
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "rootfs")
	rootfs, err := BuildTiny(ctx, dir)
	if err != nil {
		t.Fatalf("BuildTiny: %v", err)
	}
	digest, err := TinyDigest(ctx, TinyOptions{})
	if err != nil {
		t.Fatalf("TinyDigest: %v", err)
	}
	if rootfs.Digest != digest || !strings.HasPrefix(digest, "sha256:") {
		t.Errorf("digest %q, TinyDigest %q: want equal sha256 digests", rootfs.Digest, digest)
	}
	tests := []struct {
		path     string
		contains string
	}{
		{"bin/sh", ""},         // resolves through the applet link
		{"usr/sbin/httpd", ""}, // an applet in another directory
		{"etc/passwd", "vcap:x:2000:2000:vcap:/home/vcap:"},
		{"etc/group", "vcap:x:2000:"},
	}
	for _, tc := range tests {
		t.Run(tc.path, func(t *testing.T) {
			b, err := os.ReadFile(filepath.Join(dir, tc.path))
			if err != nil {
				t.Fatalf("read %s: %v", tc.path, err)
			}
			if !strings.Contains(string(b), tc.contains) {
				t.Errorf("%s does not contain %q", tc.path, tc.contains)
			}
		})
	}
	for _, d := range []string{"tmp", "home/vcap"} {
		fi, err := os.Stat(filepath.Join(dir, d))
		if err != nil || !fi.IsDir() {
			t.Errorf("%s is not a directory: %v", d, err)
		}
	}
	if fi, _ := os.Stat(filepath.Join(dir, "tmp")); fi != nil && fi.Mode()&os.ModeSticky == 0 {
		t.Errorf("tmp mode %v, want sticky", fi.Mode())
	}
}

func TestImportOnce(t *testing.T) {
	needBusybox(t)
	if os.Geteuid() != 0 {
		t.Skip("importing into containerd needs root")
	}
	if err := containerdproc.Binaries(); err != nil {
		t.Skipf("containerd binaries not installed: %v", err)
	}
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

	name, err := Ensure(ctx, c, "tiny", t.TempDir())
	if err != nil {
		t.Fatalf("Ensure: %v", err)
	}
	nctx := namespaces.WithNamespace(ctx, Namespace)
	info, err := c.SnapshotService(Snapshotter).Stat(nctx, name)
	if err != nil {
		t.Fatalf("stat %s: %v", name, err)
	}
	if info.Labels[LabelGCRoot] == "" || info.Labels[LabelStack] != "tiny" {
		t.Errorf("labels %v: want gc root and stack", info.Labels)
	}
	again, err := Ensure(ctx, c, "tiny", t.TempDir())
	if err != nil || again != name {
		t.Fatalf("second Ensure = %q, %v; want %q", again, err, name)
	}
	n := 0
	if err := c.SnapshotService(Snapshotter).Walk(nctx, func(context.Context, snapshots.Info) error { n++; return nil }); err != nil {
		t.Fatal(err)
	}
	if n != 1 {
		t.Errorf("%d snapshots after two Ensure calls, want 1", n)
	}
	if err := c.SnapshotService(Snapshotter).Remove(nctx, name); err != nil {
		t.Errorf("remove %s: %v", name, err)
	}
}

// A caller waiting for another process's stack build gives up when its ctx
// ends, and takes the lock once it is released.
func TestLockFileWaitsInterruptibly(t *testing.T) {
	path := filepath.Join(t.TempDir(), ".lock")
	holder, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close()
	if err := syscall.Flock(int(holder.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	waiter, err := os.OpenFile(path, os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer waiter.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if err := lockFile(ctx, waiter); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("lock held elsewhere: got %v, want the ctx's deadline", err)
	}
	if err := syscall.Flock(int(holder.Fd()), syscall.LOCK_UN); err != nil {
		t.Fatal(err)
	}
	ctx2, cancel2 := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel2()
	if err := lockFile(ctx2, waiter); err != nil {
		t.Fatalf("lock released: %v", err)
	}
}
