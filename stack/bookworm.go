package stack

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// The bookworm stack: Debian 12 (debootstrap minbase) plus the runtimes the
// built-in buildpacks use, all from Debian's packages. It is the equivalent
// of Cloud Foundry's cflinuxfs.

// BookwormSuite is the Debian suite the bookworm stack is built from.
const BookwormSuite = "bookworm"

// bookwormVersion changes whenever the way the stack is built changes in a
// way its package list and script do not show.
const bookwormVersion = "bookworm/v2"

// BookwormPackages are installed (without recommends) on top of minbase.
var BookwormPackages = []string{
	// ruby: Sinatra on rack with puma or webrick, resolved by bundler
	"ruby", "ruby-sinatra", "ruby-rack", "puma", "ruby-webrick", "bundler",
	// php on Apache httpd with mod_php
	"php", "apache2", "libapache2-mod-php", "media-types",
	// python: Flask under gunicorn; pip for apps' vendored wheels
	"python3", "python-is-python3", "python3-flask", "gunicorn", "python3-pip",
	"nodejs", "npm",
	"openjdk-17-jre-headless",
	// what buildpacks and apps use besides
	"bash", "curl", "netcat-openbsd", "ca-certificates", "tar", "gzip", "unzip", "locales", "procps",
}

// bookwormConfigure runs in the chroot after the packages are installed.
const bookwormConfigure = `set -e
echo 'en_US.UTF-8 UTF-8' > /etc/locale.gen
localedef -i en_US -c -f UTF-8 en_US.UTF-8
groupadd -g 2000 vcap
useradd -u 2000 -g 2000 -m -d /home/vcap -s /bin/bash vcap
chmod 755 /home/vcap
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt/* /var/log/*.log \
  /usr/share/man/* /usr/share/info/* /var/cache/debconf/*-old \
  /etc/apache2/sites-enabled/* /tmp/* /var/tmp/*
# Documentation goes, but not the packages' copyright files.
find /usr/share/doc -type f ! -name copyright -delete
find /usr/share/doc -depth -type d -empty -delete
`

// BookwormDigest is the digest of the bookworm stack's recipe: the stack is
// rebuilt exactly when it changes. The mirror is not part of it: any mirror
// of the suite gives the same stack.
func BookwormDigest() string {
	h := sha256.New()
	fmt.Fprintf(h, "%s\nsuite %s\npackages %s\nconfigure %s\n", bookwormVersion, BookwormSuite,
		strings.Join(BookwormPackages, " "), bookwormConfigure)
	return "sha256:" + hex.EncodeToString(h.Sum(nil))
}

// BookwormOptions configures the bookworm build.
type BookwormOptions struct {
	// AptRoot is the apt configuration whose mirrors are used; default
	// /etc/apt.
	AptRoot string
	// CacheDir holds built stacks and downloaded packages; default
	// /var/cache/basin (stable on one machine, so tests build once).
	CacheDir string
	// Log receives the build's progress; default discard.
	Log io.Writer
}

func (o BookwormOptions) aptRoot() string {
	if o.AptRoot == "" {
		return "/etc/apt"
	}
	return o.AptRoot
}

func (o BookwormOptions) cacheDir() string {
	if o.CacheDir == "" {
		return "/var/cache/basin"
	}
	return o.CacheDir
}

func (o BookwormOptions) log() io.Writer {
	if o.Log == nil {
		return io.Discard
	}
	return o.Log
}

// BookwormDir is where CachedBookworm keeps the stack of the current recipe.
func BookwormDir(opts BookwormOptions) string {
	return filepath.Join(opts.cacheDir(), "stacks", "bookworm-"+strings.TrimPrefix(BookwormDigest(), "sha256:")[:16])
}

// CachedBookworm returns the bookworm stack of the current recipe, building
// it first when this machine has none (under a file lock, so concurrent
// callers build it once). It needs root.
func CachedBookworm(ctx context.Context, opts BookwormOptions) (Rootfs, error) {
	dir := BookwormDir(opts)
	rootfs := Rootfs{Name: "bookworm", Dir: dir, Digest: BookwormDigest()}
	if _, err := os.Stat(filepath.Join(dir, "etc", "os-release")); err == nil {
		return rootfs, nil
	}
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return Rootfs{}, fmt.Errorf("bookworm stack cache: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(filepath.Dir(dir), ".bookworm.lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return Rootfs{}, fmt.Errorf("bookworm stack cache: %w", err)
	}
	defer lock.Close()
	if err := lockFile(ctx, lock); err != nil {
		return Rootfs{}, fmt.Errorf("lock bookworm stack cache: %w", err)
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN)
	if _, err := os.Stat(filepath.Join(dir, "etc", "os-release")); err == nil {
		return rootfs, nil // built by whoever held the lock
	}
	tmp := dir + ".building"
	if err := os.RemoveAll(tmp); err != nil {
		return Rootfs{}, err
	}
	if _, err := BuildBookworm(ctx, tmp, opts); err != nil {
		os.RemoveAll(tmp)
		return Rootfs{}, err
	}
	if err := os.Rename(tmp, dir); err != nil {
		return Rootfs{}, fmt.Errorf("bookworm stack cache: %w", err)
	}
	// Stacks of older recipes are not used again: reclaim their space.
	old, _ := filepath.Glob(filepath.Join(filepath.Dir(dir), "bookworm-*"))
	for _, o := range old {
		if o != dir && !strings.HasSuffix(o, ".building") {
			_ = os.RemoveAll(o)
		}
	}
	return rootfs, nil
}

// BuildBookworm builds the bookworm stack into dir (which must not exist or
// be empty): debootstrap --variant=minbase from the first mirror of the
// machine's apt configuration that serves bookworm, then apt-get install of
// BookwormPackages with dpkg's unsafe-io (nothing here must survive a
// crash: a failed build is thrown away), the vcap user (uid/gid 2000, home
// /home/vcap), and apt's caches removed. Downloaded packages are kept under
// the cache dir for the next build. It needs root and debootstrap.
func BuildBookworm(ctx context.Context, dir string, opts BookwormOptions) (Rootfs, error) {
	if os.Geteuid() != 0 {
		return Rootfs{}, errors.New("build bookworm stack: needs root (debootstrap and chroot)")
	}
	if _, err := exec.LookPath("debootstrap"); err != nil {
		return Rootfs{}, errors.New("build bookworm stack: debootstrap is not installed (sudo basin setup)")
	}
	all, err := AptSources(opts.aptRoot())
	if err != nil {
		return Rootfs{}, err
	}
	sources := suiteSources(all, BookwormSuite)
	if len(sources) == 0 || sources[0].Suite != BookwormSuite {
		return Rootfs{}, fmt.Errorf("build bookworm stack: %w for suite %s in %s", ErrNoMirror, BookwormSuite, opts.aptRoot())
	}
	log := opts.log()
	debs := filepath.Join(opts.cacheDir(), "debs")
	if err := os.MkdirAll(filepath.Join(debs, "partial"), 0o755); err != nil {
		return Rootfs{}, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return Rootfs{}, err
	}
	t0 := time.Now()
	run := func(name string, args ...string) error {
		cmd := exec.CommandContext(ctx, name, args...)
		cmd.Stdout, cmd.Stderr = log, log
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive", "LC_ALL=C", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("build bookworm stack: %s %s: %w", name, strings.Join(args, " "), err)
		}
		return nil
	}
	fmt.Fprintf(log, "== debootstrap --variant=minbase %s from %s\n", BookwormSuite, sources[0].URI)
	if err := run("debootstrap", "--variant=minbase", "--components=main", "--cache-dir="+debs,
		BookwormSuite, dir, sources[0].URI); err != nil {
		return Rootfs{}, err
	}
	fmt.Fprintf(log, "== minbase done in %s\n", time.Since(t0).Round(time.Second))

	var list strings.Builder
	for _, s := range sources {
		comps := s.Components
		if len(comps) == 0 {
			comps = []string{"main"}
		}
		fmt.Fprintf(&list, "deb %s %s %s\n", s.URI, s.Suite, strings.Join(comps, " "))
	}
	files := map[string]string{
		"etc/apt/sources.list": list.String(),
		// Snapshot mirrors serve Release files past their Valid-Until.
		"etc/apt/apt.conf.d/99basin-build": "Acquire::Check-Valid-Until \"false\";\nAcquire::Languages \"none\";\n",
		// Fewer files written: no documentation but copyright files.
		"etc/dpkg/dpkg.cfg.d/99basin-build": "force-unsafe-io\npath-exclude=/usr/share/doc/*\npath-include=/usr/share/doc/*/copyright\npath-exclude=/usr/share/man/*\npath-exclude=/usr/share/info/*\n",
		// No service may start inside the chroot while packages install.
		"usr/sbin/policy-rc.d": "#!/bin/sh\nexit 101\n",
		"etc/resolv.conf":      readOr("/etc/resolv.conf", ""),
	}
	for name, body := range files {
		mode := os.FileMode(0o644)
		if strings.HasPrefix(name, "usr/sbin/") {
			mode = 0o755
		}
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), mode); err != nil {
			return Rootfs{}, fmt.Errorf("build bookworm stack: %w", err)
		}
	}
	archives := filepath.Join(dir, "var/cache/apt/archives")
	if err := os.MkdirAll(archives, 0o755); err != nil {
		return Rootfs{}, err
	}
	var mounted []string
	defer func() {
		for i := len(mounted) - 1; i >= 0; i-- {
			_ = syscall.Unmount(mounted[i], syscall.MNT_DETACH)
		}
	}()
	if err := syscall.Mount("proc", filepath.Join(dir, "proc"), "proc", 0, ""); err != nil {
		return Rootfs{}, fmt.Errorf("build bookworm stack: mount proc: %w", err)
	}
	mounted = append(mounted, filepath.Join(dir, "proc"))
	if err := syscall.Mount(debs, archives, "", syscall.MS_BIND, ""); err != nil {
		return Rootfs{}, fmt.Errorf("build bookworm stack: bind %s: %w", debs, err)
	}
	mounted = append(mounted, archives)

	t1 := time.Now()
	fmt.Fprintf(log, "== apt-get install %s\n", strings.Join(BookwormPackages, " "))
	if err := run("chroot", dir, "apt-get", "update", "-qq"); err != nil {
		return Rootfs{}, err
	}
	if err := run("chroot", append([]string{dir, "apt-get", "install", "-y", "-qq", "--no-install-recommends"}, BookwormPackages...)...); err != nil {
		return Rootfs{}, err
	}
	fmt.Fprintf(log, "== packages done in %s\n", time.Since(t1).Round(time.Second))
	// Unmount the shared package cache before cleaning: apt-get clean
	// would empty it.
	if err := syscall.Unmount(archives, 0); err != nil {
		return Rootfs{}, fmt.Errorf("build bookworm stack: unmount %s: %w", archives, err)
	}
	mounted = mounted[:len(mounted)-1]
	if err := run("chroot", dir, "bash", "-c", bookwormConfigure); err != nil {
		return Rootfs{}, err
	}
	if err := syscall.Unmount(filepath.Join(dir, "proc"), 0); err != nil {
		return Rootfs{}, fmt.Errorf("build bookworm stack: unmount proc: %w", err)
	}
	mounted = nil
	for _, name := range []string{"etc/apt/apt.conf.d/99basin-build", "etc/dpkg/dpkg.cfg.d/99basin-build", "usr/sbin/policy-rc.d"} {
		if err := os.Remove(filepath.Join(dir, name)); err != nil {
			return Rootfs{}, err
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "etc/resolv.conf"), nil, 0o644); err != nil {
		return Rootfs{}, err
	}
	// Containers get /dev from their runtime: device nodes in the layer
	// would only stop it from being imported.
	if err := emptyDir(filepath.Join(dir, "dev")); err != nil {
		return Rootfs{}, err
	}
	fmt.Fprintf(log, "== bookworm stack built in %s\n", time.Since(t0).Round(time.Second))
	return Rootfs{Name: "bookworm", Dir: dir, Digest: BookwormDigest()}, nil
}

func readOr(path, def string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return def
	}
	return string(b)
}

func emptyDir(dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			return err
		}
	}
	return nil
}

// lockFile takes an exclusive lock on f, waiting until another process
// (a second dev up, a test run building the same stack) releases it or ctx
// ends: a build takes minutes, and a waiting caller must stay
// interruptible.
func lockFile(ctx context.Context, f *os.File) error {
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("another process holds %s: %w", f.Name(), ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}
