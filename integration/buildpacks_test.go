//go:build integration

package integration

import (
	"archive/zip"
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/basinpaas/basin/archive"
	"github.com/basinpaas/basin/buildpacks"
	"github.com/basinpaas/basin/stack"
)

// These tests stage every example app with basin-builder inside the bookworm
// stack (chroot as vcap, no containerd), then run the droplet with
// basin-launcher and fetch / over loopback: chroot shares the host's
// network namespace. Every root filesystem is an overlay on the stack cached
// in /var/cache/basin, which is built once per recipe.

type bookwormEnv struct {
	rootfs    string // the cached stack
	builder   string
	launcher  string
	bpDir     string // built-in buildpacks, unpacked from buildpacks.Builtin
	order     string
	goproxy   string
	npmConfig string
}

var (
	bookwormOnce sync.Once
	bookworm     *bookwormEnv
	bookwormErr  error
)

func needBookworm(t *testing.T) *bookwormEnv {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: builds the bookworm stack with debootstrap and stages apps in it with chroot and overlay mounts")
	}
	if _, err := exec.LookPath("debootstrap"); err != nil {
		t.Skip("debootstrap is not installed (sudo basin setup)")
	}
	builder, launcher := command(t, "basin-builder"), command(t, "basin-launcher")
	bookwormOnce.Do(func() {
		t0 := time.Now()
		rootfs, err := stack.CachedBookworm(context.Background(), stack.BookwormOptions{Log: testWriter{t}})
		if err != nil {
			bookwormErr = err
			return
		}
		t.Logf("bookworm stack %s ready in %s", rootfs.Dir, time.Since(t0).Round(time.Millisecond))
		env := &bookwormEnv{rootfs: rootfs.Dir, builder: builder, launcher: launcher}
		env.bpDir, err = os.MkdirTemp("", "basin-it-buildpacks-")
		if err != nil {
			bookwormErr = err
			return
		}
		archives, err := buildpacks.Builtin()
		if err != nil {
			bookwormErr = err
			return
		}
		var names []string
		for _, a := range archives {
			dir := filepath.Join(env.bpDir, a.Name)
			if err := os.Mkdir(dir, 0o755); err != nil {
				bookwormErr = err
				return
			}
			if err := archive.ExtractTarGz(context.Background(), bytes.NewReader(a.Data), dir); err != nil {
				bookwormErr = err
				return
			}
			names = append(names, a.Name)
		}
		env.order = strings.Join(names, ",")
		if out, err := exec.Command("go", "env", "GOPROXY").Output(); err == nil {
			env.goproxy = strings.TrimSpace(string(out))
		}
		if out, err := exec.Command("npm", "config", "get", "registry").Output(); err == nil {
			env.npmConfig = strings.TrimSpace(string(out))
		}
		bookworm = env
	})
	if bookwormErr != nil {
		t.Fatalf("bookworm stack: %v", bookwormErr)
	}
	return bookworm
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Logf("%s", bytes.TrimRight(p, "\n"))
	return len(p), nil
}

// chrootFS is an overlay of the stack with /proc, a few device nodes and the
// host's resolv.conf, removed with its mounts at the end of the test. Every
// process left running inside it is killed then, by PID.
type chrootFS struct {
	dir    string
	mounts []string
}

func newChroot(t *testing.T, env *bookwormEnv) *chrootFS {
	t.Helper()
	base, err := os.MkdirTemp("", "basin-it-chroot-")
	if err != nil {
		t.Fatal(err)
	}
	c := &chrootFS{dir: filepath.Join(base, "merged")}
	for _, d := range []string{"upper", "work", "merged"} {
		if err := os.Mkdir(filepath.Join(base, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		c.killAll(t)
		for i := len(c.mounts) - 1; i >= 0; i-- {
			if err := syscall.Unmount(c.mounts[i], 0); err != nil {
				t.Errorf("unmount %s: %v", c.mounts[i], err)
				_ = syscall.Unmount(c.mounts[i], syscall.MNT_DETACH)
			}
		}
		os.RemoveAll(base)
	})
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", env.rootfs, filepath.Join(base, "upper"), filepath.Join(base, "work"))
	c.mount(t, "overlay", c.dir, "overlay", 0, opts)
	c.mount(t, "proc", filepath.Join(c.dir, "proc"), "proc", syscall.MS_NOSUID|syscall.MS_NODEV|syscall.MS_NOEXEC, "")
	devs := []struct {
		name         string
		major, minor uint32
	}{{"null", 1, 3}, {"zero", 1, 5}, {"full", 1, 7}, {"random", 1, 8}, {"urandom", 1, 9}, {"tty", 5, 0}}
	for _, d := range devs {
		_ = os.Remove(filepath.Join(c.dir, "dev", d.name))
		if err := syscall.Mknod(filepath.Join(c.dir, "dev", d.name), syscall.S_IFCHR|0o666, int(d.major<<8|d.minor)); err != nil {
			t.Fatalf("mknod %s: %v", d.name, err)
		}
		if err := os.Chmod(filepath.Join(c.dir, "dev", d.name), 0o666); err != nil {
			t.Fatal(err)
		}
	}
	for name, target := range map[string]string{"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1", "stderr": "/proc/self/fd/2"} {
		if err := os.Symlink(target, filepath.Join(c.dir, "dev", name)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(filepath.Join(c.dir, "dev", "shm"), 0o1777); err != nil {
		t.Fatal(err)
	}
	resolv, err := os.ReadFile("/etc/resolv.conf")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(c.dir, "etc", "resolv.conf"), resolv, 0o644); err != nil {
		t.Fatal(err)
	}
	// The host's trusted certificates, as a cell gives its containers the
	// platform's: registries reached through a TLS-inspecting proxy need
	// its CA.
	if ca, err := os.ReadFile("/etc/ssl/certs/ca-certificates.crt"); err == nil {
		if err := os.WriteFile(filepath.Join(c.dir, "etc/ssl/certs/ca-certificates.crt"), ca, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	c.install(t, env.builder, "tmp/lifecycle/basin-builder")
	c.install(t, env.launcher, "tmp/lifecycle/basin-launcher")
	return c
}

func (c *chrootFS) mount(t *testing.T, source, target, fstype string, flags uintptr, data string) {
	t.Helper()
	if err := syscall.Mount(source, target, fstype, flags, data); err != nil {
		t.Fatalf("mount %s on %s: %v", fstype, target, err)
	}
	c.mounts = append(c.mounts, target)
}

func (c *chrootFS) install(t *testing.T, src, rel string) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(c.dir, rel)
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, 0o755); err != nil {
		t.Fatal(err)
	}
}

// killAll kills, by PID, every process whose root is this chroot.
func (c *chrootFS) killAll(t *testing.T) {
	for range 50 {
		pids := c.pids()
		if len(pids) == 0 {
			return
		}
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Errorf("processes still running in %s: %v", c.dir, c.pids())
}

func (c *chrootFS) pids() []int {
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if root, err := os.Readlink(fmt.Sprintf("/proc/%d/root", pid)); err == nil && root == c.dir {
			pids = append(pids, pid)
		}
	}
	return pids
}

// mkdirVcap makes dirs inside the chroot owned by vcap.
func (c *chrootFS) mkdirVcap(t *testing.T, rels ...string) {
	t.Helper()
	for _, rel := range rels {
		p := filepath.Join(c.dir, rel)
		if err := os.MkdirAll(p, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(p, stack.VcapUID, stack.VcapGID); err != nil {
			t.Fatal(err)
		}
	}
}

// command runs argv inside the chroot as vcap with env.
func (c *chrootFS) command(ctx context.Context, env []string, argv ...string) *exec.Cmd {
	args := append([]string{"--userspec=2000:2000", "--groups=2000", c.dir}, argv...)
	cmd := exec.CommandContext(ctx, "chroot", args...)
	cmd.Env = env
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	return cmd
}

func copyDir(t *testing.T, src, dst string) {
	t.Helper()
	err := filepath.WalkDir(src, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		target := filepath.Join(dst, rel)
		fi, err := d.Info()
		if err != nil {
			return err
		}
		if d.IsDir() {
			if err := os.MkdirAll(target, 0o755); err != nil {
				return err
			}
		} else {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			if err := os.WriteFile(target, b, fi.Mode().Perm()); err != nil {
				return err
			}
		}
		return os.Lchown(target, stack.VcapUID, stack.VcapGID)
	})
	if err != nil {
		t.Fatalf("copy %s: %v", src, err)
	}
}

type stagingResult struct {
	code     int
	output   string
	result   map[string]any
	droplet  string // host path of the droplet
	duration time.Duration
}

// stage copies app into a fresh chroot and runs basin-builder on it with
// the built-in buildpacks. cache, when not empty, is a host directory
// mounted as the build cache (kept between test runs).
func stage(t *testing.T, env *bookwormEnv, app, cache string, prepare func(buildDir string), named ...string) stagingResult {
	t.Helper()
	c := newChroot(t, env)
	c.mkdirVcap(t, "tmp/app", "tmp/cache", "tmp/droplet")
	copyDir(t, app, filepath.Join(c.dir, "tmp/app"))
	if prepare != nil {
		prepare(filepath.Join(c.dir, "tmp/app"))
	}
	copyDir(t, env.bpDir, filepath.Join(c.dir, "tmp/buildpacks"))
	if cache != "" {
		if err := os.MkdirAll(cache, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(cache, stack.VcapUID, stack.VcapGID); err != nil {
			t.Fatal(err)
		}
		c.mount(t, cache, filepath.Join(c.dir, "tmp/cache"), "", syscall.MS_BIND, "")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	vars := []string{"PATH=/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin", "HOME=/home/vcap",
		"LANG=en_US.UTF-8", "CF_STACK=bookworm", "MEMORY_LIMIT=512m"}
	if env.goproxy != "" {
		vars = append(vars, "GOPROXY="+env.goproxy)
	}
	if env.npmConfig != "" {
		vars = append(vars, "npm_config_registry="+env.npmConfig)
	}
	args := []string{"/tmp/lifecycle/basin-builder", "-buildpackOrder", env.order}
	if len(named) > 0 { // the user named the buildpacks
		args = []string{"/tmp/lifecycle/basin-builder", "-skipDetect", "-buildpackOrder", strings.Join(named, ",")}
	}
	cmd := c.command(ctx, vars, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	t0 := time.Now()
	err := cmd.Run()
	res := stagingResult{output: out.String(), duration: time.Since(t0), droplet: filepath.Join(c.dir, "tmp/droplet/droplet.tgz")}
	if ee, ok := err.(*exec.ExitError); ok {
		res.code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("basin-builder: %v\n%s", err, res.output)
	}
	b, err := os.ReadFile(filepath.Join(c.dir, "tmp/droplet/result.json"))
	if err != nil {
		t.Fatalf("result.json: %v (exit %d)\n%s", err, res.code, res.output)
	}
	if err := json.Unmarshal(b, &res.result); err != nil {
		t.Fatalf("result.json %s: %v", b, err)
	}
	return res
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// listener finds the process listening on port (IPv4 or IPv6).
func listener(launcher, port int) (pid int, ok bool) {
	inodes := map[string]bool{}
	// The app's sockets, seen from its own network namespace: /proc/net is
	// the test process's main thread's, which an earlier test's CNI work
	// may have left elsewhere than the thread that started the app.
	for _, f := range []string{fmt.Sprintf("/proc/%d/net/tcp", launcher), fmt.Sprintf("/proc/%d/net/tcp6", launcher)} {
		file, err := os.Open(f)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(file)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) < 10 || fields[3] != "0A" { // LISTEN
				continue
			}
			_, hexPort, _ := strings.Cut(fields[1], ":")
			if p, err := strconv.ParseInt(hexPort, 16, 32); err == nil && int(p) == port {
				inodes[fields[9]] = true
			}
		}
		file.Close()
	}
	entries, _ := os.ReadDir("/proc")
	best := 0
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		for _, fd := range fds {
			link, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
			if strings.HasPrefix(link, "socket:[") && inodes[strings.TrimSuffix(strings.TrimPrefix(link, "socket:["), "]")] {
				if best == 0 || pid < best {
					best = pid // the parent (lowest pid) of servers that fork
				}
			}
		}
	}
	return best, best != 0
}

type example struct {
	name     string
	detected string
	body     string
	app      func(t *testing.T) string                // the app's dir, when not examples/<name>
	named    []string                                 // buildpacks named by the user (-skipDetect)
	cache    string                                   // keep the build cache between test runs under this name
	prepare  func(t *testing.T, buildDir string)      // before staging
	check    func(t *testing.T, c *chrootFS, pid int) // the serving process
}

func TestBuildpackExamples(t *testing.T) {
	env := needBookworm(t)
	examples := []example{
		{name: "sinatra", detected: "ruby", body: "hello from sinatra", check: func(t *testing.T, c *chrootFS, pid int) {
			exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
			cwd, _ := os.Readlink(fmt.Sprintf("/proc/%d/cwd", pid))
			if !strings.HasPrefix(filepath.Base(exe), "ruby") || cwd != filepath.Join(c.dir, "home/vcap/app") {
				t.Errorf("serving process %d is %s in %s: want ruby running from /home/vcap/app", pid, exe, cwd)
			}
		}},
		{name: "php", detected: "php", body: "hello from php on Apache httpd", check: func(t *testing.T, c *chrootFS, pid int) {
			exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
			if filepath.Base(exe) != "apache2" {
				t.Errorf("serving process %d is %s: want Apache httpd (apache2)", pid, exe)
			}
		}},
		{name: "static", detected: "staticfile", body: "hello from static"},
		{name: "java", detected: "java", body: "hello from java", prepare: compileJava},
		{name: "node", detected: "nodejs", body: "hello from node", cache: "node"},
		{name: "go", detected: "go", body: "hello from go (go1.22.5)", cache: "go"},
		{name: "python", detected: "python", body: "hello from python (flask)"},
		{name: "binary", detected: "binary", body: "hello from binary"},
		{name: "go-vendored-module", detected: "go", body: "hello from a vendored module", cache: "go", app: func(t *testing.T) string {
			// The module exists nowhere but in vendor/: the build must
			// not look for it on the module proxy.
			return writeApp(t, map[string]string{
				"go.mod":                            "module example.com/vendored\n\ngo 1.22.5\n\nrequire example.com/greet v1.0.0\n",
				"main.go":                           "package main\n\nimport (\n\t\"net/http\"\n\t\"os\"\n\n\t\"example.com/greet\"\n)\n\nfunc main() {\n\thttp.HandleFunc(\"/\", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte(greet.Hello)) })\n\thttp.ListenAndServe(\":\"+os.Getenv(\"PORT\"), nil)\n}\n",
				"vendor/modules.txt":                "# example.com/greet v1.0.0\n## explicit\nexample.com/greet\n",
				"vendor/example.com/greet/greet.go": "package greet\n\nconst Hello = \"hello from a vendored module\\n\"\n",
			})
		}},
		{name: "node-then-binary", detected: "binary", body: "hello from node", named: []string{"nodejs", "binary"}, app: func(t *testing.T) string {
			// Two named buildpacks: nodejs supplies node_modules (server.js
			// needs ms), binary, the last, starts what the Procfile says.
			dir := t.TempDir()
			copyDir(t, "../examples/node", dir)
			if err := os.WriteFile(filepath.Join(dir, "Procfile"), []byte("web: node server.js\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			return dir
		}},
		{name: "python-vendored-wheel", detected: "python", body: "hello from a vendored wheel", app: vendoredPythonApp},
		{name: "sinatra-vendored-gem", detected: "ruby", body: "hello from vendor/cache", app: func(t *testing.T) string {
			return writeApp(t, map[string]string{
				"Gemfile":   "source \"https://rubygems.org\"\ngem \"sinatra\"\ngem \"puma\"\ngem \"basingem\"\n",
				"config.ru": "require \"sinatra/base\"\nrequire \"basingem\"\nclass App < Sinatra::Base\n  get(\"/\") { Basingem::GREETING }\nend\nrun App\n",
			})
		}, prepare: vendorGem},
	}
	for _, ex := range examples {
		t.Run(ex.name, func(t *testing.T) {
			var cache string
			if ex.cache != "" {
				// Kept on the machine so a test run downloads a toolchain or
				// packages once, as a cell keeps an app's cache.
				cache = "/var/cache/basin/test-build-cache/" + ex.cache
			}
			var prepare func(string)
			if ex.prepare != nil {
				prepare = func(dir string) { ex.prepare(t, dir) }
			}
			app := filepath.Join("..", "examples", ex.name)
			if ex.app != nil {
				app = ex.app(t)
			}
			res := stage(t, env, app, cache, prepare, ex.named...)
			if res.code != 0 {
				t.Fatalf("staging exited %d:\n%s", res.code, res.output)
			}
			t.Logf("staged %s in %s", ex.name, res.duration.Round(time.Millisecond))
			if res.result["detected_buildpack"] != ex.detected || res.result["buildpack_key"] != ex.detected {
				t.Errorf("result.json %v: want %s detected", res.result, ex.detected)
			}
			run(t, env, ex, res)
		})
	}
}

// run extracts the droplet at /home/vcap of a fresh chroot, starts it with
// basin-launcher on a free port and checks GET /.
func run(t *testing.T, env *bookwormEnv, ex example, res stagingResult) {
	t.Helper()
	c := newChroot(t, env)
	f, err := os.Open(res.droplet)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := archive.ExtractTarGz(context.Background(), f, filepath.Join(c.dir, "home/vcap"), archive.WithOwner(stack.VcapUID, stack.VcapGID)); err != nil {
		t.Fatalf("extract droplet: %v", err)
	}
	port := freePort(t)
	vars := []string{"PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/home/vcap/app", "LANG=en_US.UTF-8",
		"PORT=" + strconv.Itoa(port), "VCAP_APP_PORT=" + strconv.Itoa(port), "VCAP_APP_HOST=0.0.0.0",
		"MEMORY_LIMIT=256m", "TMPDIR=/home/vcap/tmp", "DEPS_DIR=/home/vcap/deps", "CF_INSTANCE_INDEX=0"}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cmd := c.command(ctx, vars, "/tmp/lifecycle/basin-launcher")
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		_ = cmd.Wait()
	}()
	url := fmt.Sprintf("http://127.0.0.1:%d/", port)
	client := &http.Client{Timeout: 5 * time.Second}
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := client.Get(url)
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), ex.body) {
				t.Fatalf("GET / = %d %q, want 200 with %q\n%s", resp.StatusCode, body, ex.body, out.String())
			}
			t.Logf("%s answered %q after %s", ex.name, strings.TrimSpace(string(body)), time.Since(t0).Round(time.Millisecond))
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET %s: %v after 60s; app output:\n%s", url, err, out.String())
		}
		time.Sleep(200 * time.Millisecond)
	}
	if ex.check != nil {
		pid, ok := listener(cmd.Process.Pid, port)
		if !ok {
			t.Fatalf("no process listens on port %d", port)
		}
		ex.check(t, c, pid)
	}
}

// compileJava builds the Java example's Main.class with a JDK on the host
// (Debian's openjdk-17-jdk-headless, which basin setup --for-tests
// installs): the stack has only a JRE, and git keeps no class files.
func compileJava(t *testing.T, buildDir string) {
	javac, err := exec.LookPath("javac")
	if err != nil {
		t.Skip("javac is not installed (sudo basin setup --for-tests installs openjdk-17-jdk-headless)")
	}
	out, err := exec.Command(javac, "--release", "17", "-d", buildDir, filepath.Join(buildDir, "Main.java")).CombinedOutput()
	if err != nil {
		t.Fatalf("javac: %v\n%s", err, out)
	}
	if err := os.Chown(filepath.Join(buildDir, "Main.class"), stack.VcapUID, stack.VcapGID); err != nil {
		t.Fatal(err)
	}
}

func writeApp(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, body := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// vendorGem builds a gem no Debian package provides with the stack's gem
// (as root, in the staging chroot) into the app's vendor/cache: bundle
// install --local must install it into the app beside Debian's gems.
func vendorGem(t *testing.T, buildDir string) {
	root := filepath.Dir(filepath.Dir(buildDir)) // buildDir is <root>/tmp/app
	src := filepath.Join(root, "tmp/gemsrc")
	if err := os.MkdirAll(filepath.Join(src, "lib"), 0o755); err != nil {
		t.Fatal(err)
	}
	files := map[string]string{
		"basingem.gemspec": "Gem::Specification.new do |s|\n  s.name = \"basingem\"\n  s.version = \"1.0\"\n  s.summary = \"a vendored gem\"\n" +
			"  s.authors = [\"basin\"]\n  s.files = [\"lib/basingem.rb\"]\nend\n",
		"lib/basingem.rb": "module Basingem\n  GREETING = \"hello from vendor/cache\\n\"\nend\n",
	}
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(src, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := exec.Command("chroot", root, "bash", "-c", "cd /tmp/gemsrc && gem build basingem.gemspec").CombinedOutput(); err != nil {
		t.Fatalf("gem build: %v\n%s", err, out)
	}
	cache := filepath.Join(buildDir, "vendor/cache")
	if err := os.MkdirAll(cache, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(src, "basingem-1.0.gem"), filepath.Join(cache, "basingem-1.0.gem")); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{filepath.Join(buildDir, "vendor"), cache, filepath.Join(cache, "basingem-1.0.gem")} {
		if err := os.Chown(p, stack.VcapUID, stack.VcapGID); err != nil {
			t.Fatal(err)
		}
	}
}

// vendoredPythonApp is a Flask app that also needs a module no Debian
// package provides, pushed as a wheel in vendor/: staging installs it into
// the app, and the app finds it at run time in /home/vcap/app.
func vendoredPythonApp(t *testing.T) string {
	dir := t.TempDir()
	files := map[string]string{
		"requirements.txt": "flask\nbasinhello==1.0\n",
		"app.py": "from flask import Flask\nimport basinhello\n\napp = Flask(__name__)\n\n\n" +
			"@app.route(\"/\")\ndef hello():\n    return basinhello.GREETING\n",
	}
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, "vendor"), 0o755); err != nil {
		t.Fatal(err)
	}
	wheel := map[string]string{
		"basinhello/__init__.py":            "GREETING = 'hello from a vendored wheel\\n'\n",
		"basinhello-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: basinhello\nVersion: 1.0\n",
		"basinhello-1.0.dist-info/WHEEL":    "Wheel-Version: 1.0\nGenerator: basin-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
		"basinhello-1.0.dist-info/RECORD":   "basinhello/__init__.py,,\nbasinhello-1.0.dist-info/METADATA,,\nbasinhello-1.0.dist-info/WHEEL,,\nbasinhello-1.0.dist-info/RECORD,,\n",
	}
	f, err := os.Create(filepath.Join(dir, "vendor", "basinhello-1.0-py3-none-any.whl"))
	if err != nil {
		t.Fatal(err)
	}
	zw := zip.NewWriter(f)
	for _, name := range []string{"basinhello/__init__.py", "basinhello-1.0.dist-info/METADATA", "basinhello-1.0.dist-info/WHEEL", "basinhello-1.0.dist-info/RECORD"} {
		w, err := zw.Create(name)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.WriteString(w, wheel[name]); err != nil {
			t.Fatal(err)
		}
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestBuildpackStagingFailures(t *testing.T) {
	env := needBookworm(t)
	tests := []struct {
		name   string
		files  map[string]string
		code   int
		phase  string
		output []string
	}{
		{"syntax error fails compile", map[string]string{"requirements.txt": "flask\n", "app.py": "def broken(:\n    pass\n"},
			223, "compile", []string{"SyntaxError", "app.py", "compile failed in buildpack python"}},
		{"unsatisfiable requirement", map[string]string{"requirements.txt": "no-such-module-basin==1.0\n", "app.py": "print(1)\n"},
			223, "compile", []string{"no-such-module-basin", "Vendor it"}},
		{"no buildpack detects", map[string]string{"README.txt": "nothing to run\n"},
			222, "detect", []string{"none of the buildpacks detected a compatible application", "staticfile", "binary"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			app := t.TempDir()
			for name, body := range tc.files {
				if err := os.WriteFile(filepath.Join(app, name), []byte(body), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			res := stage(t, env, app, "", nil)
			if res.code != tc.code {
				t.Fatalf("exit code %d, want %d:\n%s", res.code, tc.code, res.output)
			}
			if res.result["failed_phase"] != tc.phase || res.result["exit_code"] != float64(tc.code) {
				t.Errorf("result.json %v: want failed_phase %s, exit_code %d", res.result, tc.phase, tc.code)
			}
			for _, want := range tc.output {
				if !strings.Contains(res.output, want) {
					t.Errorf("output has no %q:\n%s", want, res.output)
				}
			}
		})
	}
}
