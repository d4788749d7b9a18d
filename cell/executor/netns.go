package executor

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"runtime"
	"strconv"

	"golang.org/x/sys/unix"
)

// netNS is a network namespace kept alive by a bind mount on a file, so it
// outlives the thread that created it and survives a cell restart.
type netNS struct{ path string }

// newNetNS creates a network namespace pinned at a new file under dir. It is
// created on a dedicated OS thread that is never returned to Go's scheduler:
// that thread's namespace has changed, so it must die with its goroutine.
func newNetNS(dir string) (*netNS, error) {
	f, err := os.CreateTemp(dir, "ns-")
	if err != nil {
		return nil, fmt.Errorf("create network namespace in %s: %w", dir, err)
	}
	path := f.Name()
	f.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // no Unlock: the thread exits with the goroutine
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("unshare: %w", err)
			return
		}
		src := "/proc/self/task/" + strconv.Itoa(unix.Gettid()) + "/ns/net"
		if err := unix.Mount(src, path, "none", unix.MS_BIND, ""); err != nil {
			errc <- fmt.Errorf("bind mount %s: %w", src, err)
			return
		}
		errc <- nil
	}()
	if err := <-errc; err != nil {
		os.Remove(path)
		return nil, fmt.Errorf("create network namespace at %s: %w", path, err)
	}
	return &netNS{path: path}, nil
}

func loadNetNS(path string) *netNS { return &netNS{path: path} }

// GetPath is where the namespace is pinned.
func (n *netNS) GetPath() string { return n.path }

// Remove unpins the namespace (it goes away once no process is in it) and
// deletes the file. Removing a namespace already gone is not an error.
func (n *netNS) Remove() error {
	if err := unix.Unmount(n.path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount %s: %w", n.path, err)
	}
	if err := os.Remove(n.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove %s: %w", n.path, err)
	}
	return nil
}
