// Package stack builds the root filesystems apps run on ("stacks", as Cloud
// Foundry calls them) and commits them into containerd as snapshots, so an
// instance's root is an overlay on a shared read-only layer, not a copy.
//
// A stack is imported once per recipe: its snapshot name carries a digest of
// everything that went into it, so it is rebuilt only when the recipe (or the
// binaries it copies) changes.
package stack

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
)

const (
	// Namespace is the containerd namespace basin keeps everything in; a
	// ctx without a namespace gets this one.
	Namespace = "basin"
	// Snapshotter is the containerd snapshotter basin uses.
	Snapshotter = "overlayfs"
	// LabelGCRoot keeps a committed snapshot from containerd's garbage
	// collector: without a reference from a container or image, a parent
	// snapshot is collected, even while instances are being prepared on it.
	LabelGCRoot = "containerd.io/gc.root"
	// LabelStack names the stack a snapshot holds; LabelDigest its recipe.
	LabelStack  = "basin.io/stack"
	LabelDigest = "basin.io/digest"

	// VcapUID and VcapGID own apps' files and run their processes.
	VcapUID = 2000
	VcapGID = 2000
)

// ErrUnknownStack is returned for a stack name basin cannot build.
var ErrUnknownStack = errors.New("unknown stack")

// Rootfs is a built root filesystem on disk.
type Rootfs struct {
	Name   string // stack name, e.g. "tiny"
	Dir    string // where the files are
	Digest string // "sha256:<hex>" of the recipe that built it
}

// SnapshotName is the committed snapshot that holds a stack built from the
// recipe with this digest.
func SnapshotName(stack, digest string) string {
	return "basin/stack/" + stack + "/" + digest
}

// tinyRecipe is everything that determines the tiny stack's content. Change
// it (or the busybox binary) and the digest changes, forcing a rebuild.
type tinyRecipe struct {
	busybox string // path of Debian's busybox-static binary
	applets []string
	files   map[string]string // path -> content, written 0644 root-owned
}

const tinyVersion = "tiny/v1"

func newTinyRecipe(ctx context.Context, busybox string) (tinyRecipe, error) {
	out, err := runOutput(ctx, busybox, "--list-full")
	if err != nil {
		return tinyRecipe{}, fmt.Errorf("list busybox applets of %s: %w", busybox, err)
	}
	return tinyRecipe{
		busybox: busybox,
		applets: strings.Fields(out),
		files: map[string]string{
			"etc/passwd":      "root:x:0:0:root:/root:/bin/sh\nvcap:x:2000:2000:vcap:/home/vcap:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
			"etc/group":       "root:x:0:\nvcap:x:2000:\nnogroup:x:65534:\n",
			"etc/hosts":       "127.0.0.1 localhost\n::1 localhost\n",
			"etc/resolv.conf": "",
			"etc/os-release":  "ID=basin-tiny\nNAME=\"basin tiny (busybox)\"\n",
		},
	}, nil
}

func (r tinyRecipe) digest() (string, error) {
	h := sha256.New()
	fmt.Fprintf(h, "%s\n", tinyVersion)
	f, err := os.Open(r.busybox)
	if err != nil {
		return "", fmt.Errorf("hash %s: %w", r.busybox, err)
	}
	defer f.Close()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("hash %s: %w", r.busybox, err)
	}
	fmt.Fprintf(h, "\napplets %s\n", strings.Join(r.applets, " "))
	for _, name := range sortedKeys(r.files) {
		fmt.Fprintf(h, "file %s %d %s\n", name, len(r.files[name]), r.files[name])
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil)), nil
}

// TinyOptions configures BuildTiny.
type TinyOptions struct {
	// Busybox is the static busybox binary; default /bin/busybox (Debian's
	// busybox-static).
	Busybox string
}

// TinyDigest is the digest BuildTiny would give, without building anything.
func TinyDigest(ctx context.Context, opts TinyOptions) (string, error) {
	r, err := newTinyRecipe(ctx, opts.busybox())
	if err != nil {
		return "", err
	}
	return r.digest()
}

func (o TinyOptions) busybox() string {
	if o.Busybox == "" {
		return "/bin/busybox"
	}
	return o.Busybox
}

// BuildTiny writes the tiny stack into dir (created if missing, must be
// empty): busybox with its applet links (so /bin/sh exists), the vcap user
// (uid/gid 2000) with home /home/vcap, and /tmp. Ownership is set only when
// running as root.
func BuildTiny(ctx context.Context, dir string, opts ...TinyOptions) (Rootfs, error) {
	var o TinyOptions
	if len(opts) > 0 {
		o = opts[0]
	}
	r, err := newTinyRecipe(ctx, o.busybox())
	if err != nil {
		return Rootfs{}, err
	}
	digest, err := r.digest()
	if err != nil {
		return Rootfs{}, err
	}
	if err := buildTiny(r, dir); err != nil {
		return Rootfs{}, fmt.Errorf("build tiny stack in %s: %w", dir, err)
	}
	return Rootfs{Name: "tiny", Dir: dir, Digest: digest}, nil
}

func buildTiny(r tinyRecipe, dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return err
	}
	defer root.Close()
	asRoot := os.Geteuid() == 0
	dirs := []struct {
		path     string
		mode     fs.FileMode
		uid, gid int
	}{
		{"bin", 0o755, 0, 0}, {"sbin", 0o755, 0, 0}, {"usr/bin", 0o755, 0, 0}, {"usr/sbin", 0o755, 0, 0},
		{"etc", 0o755, 0, 0}, {"root", 0o700, 0, 0}, {"proc", 0o555, 0, 0}, {"sys", 0o555, 0, 0},
		{"dev", 0o755, 0, 0}, {"var", 0o755, 0, 0}, {"var/tmp", 0o777 | fs.ModeSticky, 0, 0}, {"tmp", 0o777 | fs.ModeSticky, 0, 0},
		{"home", 0o755, 0, 0}, {"home/vcap", 0o755, VcapUID, VcapGID},
	}
	for _, d := range dirs {
		if err := root.MkdirAll(d.path, 0o755); err != nil {
			return err
		}
		// Chmod after creation: the umask would drop the sticky bit.
		if err := root.Chmod(d.path, d.mode); err != nil {
			return err
		}
		if asRoot {
			if err := root.Chown(d.path, d.uid, d.gid); err != nil {
				return err
			}
		}
	}
	if err := copyFile(root, r.busybox, "bin/busybox", 0o755); err != nil {
		return err
	}
	for _, a := range r.applets {
		if a == "bin/busybox" || strings.Contains(a, "..") || strings.HasPrefix(a, "/") {
			continue
		}
		// Relative links keep the stack valid wherever it is mounted.
		target := strings.Repeat("../", strings.Count(a, "/")) + "bin/busybox"
		if err := root.Symlink(target, a); err != nil && !errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("link applet %s: %w", a, err)
		}
	}
	for _, name := range sortedKeys(r.files) {
		if err := root.WriteFile(name, []byte(r.files[name]), 0o644); err != nil {
			return err
		}
	}
	return nil
}

func copyFile(root *os.Root, src, dst string, mode fs.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := root.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return fmt.Errorf("copy %s: %w", src, err)
	}
	if err := out.Chmod(mode); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// withNamespace puts basin's namespace on ctx unless it has one already.
func withNamespace(ctx context.Context) context.Context {
	if _, ok := namespaces.Namespace(ctx); ok {
		return ctx
	}
	return namespaces.WithNamespace(ctx, Namespace)
}

// Exists reports whether a stack with this digest is already committed.
func Exists(ctx context.Context, c *client.Client, stack, digest string) (bool, error) {
	ctx = withNamespace(ctx)
	_, err := c.SnapshotService(Snapshotter).Stat(ctx, SnapshotName(stack, digest))
	if errdefs.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("stat stack %s %s: %w", stack, digest, err)
	}
	return true, nil
}

// Import commits a built root filesystem into containerd as the snapshot
// SnapshotName(rootfs.Name, rootfs.Digest), labelled as a GC root. It does
// nothing when that snapshot exists already. It returns the snapshot name.
func Import(ctx context.Context, c *client.Client, rootfs Rootfs) (string, error) {
	ctx = withNamespace(ctx)
	name := SnapshotName(rootfs.Name, rootfs.Digest)
	labels := map[string]string{LabelStack: rootfs.Name, LabelDigest: rootfs.Digest}
	err := CommitLayer(ctx, c, name, "", labels, func(dir string) error {
		return copyTree(rootfs.Dir, dir)
	})
	if err != nil {
		return "", fmt.Errorf("import stack %s: %w", rootfs.Name, err)
	}
	return name, nil
}

// Ensure makes sure the named stack is committed for the current recipe,
// building it when it is not, and returns its snapshot name. tiny is built
// under workDir and thrown away after import; bookworm, which takes minutes,
// is built once per recipe into the machine's cache (CachedBookworm).
func Ensure(ctx context.Context, c *client.Client, stack, workDir string) (string, error) {
	switch stack {
	case "tiny":
		digest, err := TinyDigest(ctx, TinyOptions{})
		if err != nil {
			return "", err
		}
		ok, err := Exists(ctx, c, stack, digest)
		if err != nil || ok {
			return SnapshotName(stack, digest), err
		}
		// workDir may not exist yet (dev up's fresh state dir).
		if err := os.MkdirAll(workDir, 0o755); err != nil {
			return "", fmt.Errorf("ensure stack %s: %w", stack, err)
		}
		dir, err := os.MkdirTemp(workDir, "stack-tiny-")
		if err != nil {
			return "", fmt.Errorf("ensure stack %s: %w", stack, err)
		}
		defer os.RemoveAll(dir)
		rootfs, err := BuildTiny(ctx, filepath.Join(dir, "rootfs"))
		if err != nil {
			return "", err
		}
		return Import(ctx, c, rootfs)
	case "bookworm":
		digest := BookwormDigest()
		ok, err := Exists(ctx, c, stack, digest)
		if err != nil || ok {
			return SnapshotName(stack, digest), err
		}
		rootfs, err := CachedBookworm(ctx, BookwormOptions{})
		if err != nil {
			return "", err
		}
		return Import(ctx, c, rootfs)
	default:
		return "", fmt.Errorf("ensure stack %q: %w (stacks: tiny, bookworm)", stack, ErrUnknownStack)
	}
}

// CommitLayer commits a snapshot called name on parent ("" for a base
// layer) whose content fill writes into the directory it is given. The
// committed snapshot is labelled a GC root. A lease is held throughout so the
// garbage collector can neither remove the parent nor the active snapshot
// while it is being filled. An existing snapshot called name is left alone
// and is not an error, so concurrent callers may race: one wins, the others
// clean up.
func CommitLayer(ctx context.Context, c *client.Client, name, parent string, labels map[string]string, fill func(dir string) error) (err error) {
	ctx = withNamespace(ctx)
	sn := c.SnapshotService(Snapshotter)
	if _, err := sn.Stat(ctx, name); err == nil {
		return nil
	}
	ctx, done, err := c.WithLease(ctx, leases.WithRandomID(), leases.WithExpiration(10*time.Minute))
	if err != nil {
		return fmt.Errorf("commit %s: lease: %w", name, err)
	}
	defer done(context.WithoutCancel(ctx))

	key := fmt.Sprintf("%s-prepare-%d", name, time.Now().UnixNano())
	mounts, err := sn.Prepare(ctx, key, parent)
	if err != nil {
		return fmt.Errorf("commit %s: prepare on %q: %w", name, parent, err)
	}
	defer func() {
		if err != nil {
			_ = sn.Remove(context.WithoutCancel(ctx), key)
		}
	}()
	if err := mount.WithTempMount(ctx, mounts, fill); err != nil {
		return fmt.Errorf("commit %s: fill: %w", name, err)
	}
	all := map[string]string{LabelGCRoot: time.Now().UTC().Format(time.RFC3339)}
	for k, v := range labels {
		all[k] = v
	}
	if err := sn.Commit(ctx, name, key, snapshots.WithLabels(all)); err != nil {
		if errdefs.IsAlreadyExists(err) {
			return nil // someone else committed the same content first
		}
		return fmt.Errorf("commit %s: %w", name, err)
	}
	return nil
}

// copyTree copies a directory tree preserving modes, ownership and symbolic
// links; it is used only on trees basin built itself.
func copyTree(src, dst string) error {
	return filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			link, err := os.Readlink(p)
			if err != nil {
				return err
			}
			if err := os.Symlink(link, target); err != nil {
				return err
			}
		case fi.IsDir():
			if rel != "." {
				if err := os.Mkdir(target, 0o700); err != nil {
					return err
				}
			}
			if err := os.Chmod(target, fi.Mode()&(fs.ModePerm|fs.ModeSticky)); err != nil {
				return err
			}
		case fi.Mode().IsRegular():
			in, err := os.Open(p)
			if err != nil {
				return err
			}
			out, err := os.OpenFile(target, os.O_WRONLY|os.O_CREATE|os.O_EXCL, fi.Mode().Perm())
			if err == nil {
				_, err = io.Copy(out, in)
				if cerr := out.Close(); err == nil {
					err = cerr
				}
			}
			in.Close()
			if err != nil {
				return fmt.Errorf("copy %s: %w", p, err)
			}
		default:
			return fmt.Errorf("copy %s: unsupported file type %v", p, fi.Mode().Type())
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && os.Geteuid() == 0 {
			if err := os.Lchown(target, int(st.Uid), int(st.Gid)); err != nil {
				return err
			}
		}
		return nil
	})
}

func sortedKeys(m map[string]string) []string {
	return slices.Sorted(maps.Keys(m))
}

func runOutput(ctx context.Context, name string, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, name, args...).Output()
	if err != nil {
		if ctx.Err() != nil {
			// Killed because ctx ended: say so, so callers that ended it
			// (cell.Purge stopping an executor mid-start) can tell.
			return "", fmt.Errorf("run %s: %w", name, ctx.Err())
		}
		return "", fmt.Errorf("run %s: %w", name, err)
	}
	return string(out), nil
}
