//go:build integration

package integration

import (
	"context"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/basinpaas/basin/buildpacks"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

// These tests push source through the real CLI to `basin dev up` with the
// bookworm stack: the bits are uploaded, staged by buildpacks in a
// container on a cell, and the droplet runs behind the router, as issue 6
// and issue 7 ask. Each test's platform has its own --net-id.

// startPushPlatform runs dev up with two cells on the tiny and bookworm
// stacks on network netID, and removes what it leaves when the test ends.
func startPushPlatform(t *testing.T, netID int) *devUp {
	t.Helper()
	command(t, "basin-builder") // dev up finds it beside basin
	return startNetPlatform(t, netID, "--stacks", "tiny,bookworm")
}

// appView is what `basin app NAME --json` prints.
type appView struct {
	App struct {
		Name              string   `json:"name"`
		DetectedBuildpack string   `json:"detected_buildpack"`
		DropletDigest     string   `json:"droplet_digest"`
		ProcessGuids      []string `json:"process_guids"`
	} `json:"app"`
	Instances []struct {
		State    string `json:"state"`
		Current  bool   `json:"current"`
		Routable bool   `json:"routable"`
	} `json:"instances"`
}

func (d *devUp) appView(t *testing.T, name string) appView {
	t.Helper()
	out := d.mustBasin(t, "", "app", name, "--json")
	var v appView
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		t.Fatalf("basin app %s --json printed no JSON: %v\n%s", name, err, out)
	}
	return v
}

// running counts the current instances that are RUNNING and those that
// are also routable.
func (v appView) running() (running, routable int) {
	for _, in := range v.Instances {
		if in.Current && in.State == "ACTUAL_LRP_STATE_RUNNING" {
			running++
			if in.Routable {
				routable++
			}
		}
	}
	return running, routable
}

// serving is a shell loop run with `basin ssh -c`: one line per process of
// the instance with its executable, working directory and command line.
const listProcesses = `for p in /proc/[0-9]*; do echo "proc exe=$(readlink $p/exe) cwd=$(readlink $p/cwd) cmd=$(tr '\0' ' ' < $p/cmdline)"; done`

// sshProcesses lists the processes of the app's instance 0.
func (d *devUp) sshProcesses(t *testing.T, name string) []string {
	t.Helper()
	out := d.mustBasin(t, "", "ssh", name, "-c", listProcesses)
	var procs []string
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "proc ") && !strings.Contains(l, "readlink") && !strings.Contains(l, "/proc/[0-9]") {
			procs = append(procs, l)
		}
	}
	return procs
}

// TestPushExamples pushes every app in examples/ through the CLI with two
// instances and checks what staging detected, the instances, the body
// through the router and, for the talk's two apps, the serving process.
func TestPushExamples(t *testing.T) {
	d := startPushPlatform(t, 9)
	examples := []struct {
		name, detected, body string
		prepare              func(t *testing.T, dir string)
		check                func(t *testing.T, procs []string)
	}{
		{name: "sinatra", detected: "ruby", body: "hello from sinatra", check: func(t *testing.T, procs []string) {
			for _, p := range procs {
				if strings.Contains(p, "exe=/usr/bin/ruby") && strings.Contains(p, "cwd=/home/vcap/app ") {
					return
				}
			}
			t.Errorf("no ruby process running from /home/vcap/app in the container:\n%s", strings.Join(procs, "\n"))
		}},
		{name: "php", detected: "php", body: "hello from php on Apache httpd", check: func(t *testing.T, procs []string) {
			for _, p := range procs {
				if strings.Contains(p, "exe=/usr/sbin/apache2 ") {
					return
				}
			}
			t.Errorf("no Apache httpd (apache2) in the container:\n%s", strings.Join(procs, "\n"))
		}},
		{name: "static", detected: "staticfile", body: "hello from static"},
		{name: "java", detected: "java", body: "hello from java", prepare: compileJava},
		{name: "node", detected: "nodejs", body: "hello from node"},
		{name: "go", detected: "go", body: "hello from go (go1.22.5)"},
		{name: "python", detected: "python", body: "hello from python (flask)"},
		{name: "binary", detected: "binary", body: "hello from binary"},
	}
	for _, ex := range examples {
		t.Run(ex.name, func(t *testing.T) {
			dir := filepath.Join("..", "examples", ex.name)
			if ex.prepare != nil {
				dir = t.TempDir()
				copyDir(t, filepath.Join("..", "examples", ex.name), dir)
				ex.prepare(t, dir)
			}
			t0 := time.Now()
			out := d.mustBasin(t, "", "push", ex.name, "-p", dir, "-i", "2", "--no-manifest")
			pushed := time.Since(t0)
			if want := "(buildpack " + ex.detected + ")"; !strings.Contains(out, want) {
				t.Errorf("push did not stream staging output naming the buildpack (%q)", want)
			}
			v := d.appView(t, ex.name)
			if v.App.DetectedBuildpack != ex.detected {
				t.Errorf("detected buildpack %q, want %q", v.App.DetectedBuildpack, ex.detected)
			}
			if r, _ := v.running(); r != 2 {
				t.Errorf("%d instances running after push, want 2: %+v", r, v.Instances)
			}
			waitRouted(t, d, ex.name+".apps.localhost", ex.body, 30*time.Second)
			t.Logf("%s: push %s, answering through the router %s after push began", ex.name, pushed.Round(time.Millisecond), time.Since(t0).Round(time.Millisecond))
			if ex.check != nil {
				ex.check(t, d.sshProcesses(t, ex.name))
			}
		})
	}
}

// TestPushStaging: failed stagings desire nothing, external buildpacks are
// used unchanged, admin buildpacks are managed through the CLI, and
// scaling out never stages again.
func TestPushStaging(t *testing.T) {
	d := startPushPlatform(t, 10)
	fixtures := t.TempDir()
	copyDir(t, filepath.Join("testdata", "buildpacks"), fixtures)
	bp := func(name string) string { return filepath.Join(fixtures, name) }
	tgz := func(t *testing.T, name string) string {
		p := filepath.Join(t.TempDir(), name+".tgz")
		if out, err := exec.Command("tar", "czf", p, "-C", bp(name), ".").CombinedOutput(); err != nil {
			t.Fatalf("tar %s: %v\n%s", name, err, out)
		}
		return p
	}

	t.Run("a compile error fails with 223 and desires nothing", func(t *testing.T) {
		app := writeApp(t, map[string]string{"requirements.txt": "flask\n", "app.py": "def broken(:\n    pass\n"})
		out, ok := d.basin(t, "", "push", "broken", "-p", app, "-s", "bookworm", "--no-manifest")
		if ok {
			t.Fatal("push of an app with a syntax error exited 0")
		}
		for _, want := range []string{"SyntaxError", "exit code 223", "compile"} {
			if !strings.Contains(out, want) {
				t.Errorf("push output lacks %q", want)
			}
		}
		assertNothingDesired(t, d, "broken")
	})

	t.Run("an app no buildpack detects fails with 222", func(t *testing.T) {
		app := writeApp(t, map[string]string{"README.txt": "nothing to run\n"})
		out, ok := d.basin(t, "", "push", "undetected", "-p", app, "-s", "bookworm", "--no-manifest")
		if ok {
			t.Fatal("push of an app no buildpack detects exited 0")
		}
		for _, want := range []string{"exit code 222", "none of the buildpacks detected a compatible application", "No buildpack recognised the app"} {
			if !strings.Contains(out, want) {
				t.Errorf("push output lacks %q", want)
			}
		}
		assertNothingDesired(t, d, "undetected")
	})

	t.Run("external buildpack by directory: ENV_DIR, no release, profile.d, cache across restage", func(t *testing.T) {
		app := writeApp(t, map[string]string{
			"Procfile": "web: bash serve.sh\n",
			"serve.sh": `mkdir -p "$TMPDIR/www"
echo "greeting=$(cat www/greeting) count=$(cat www/count) profile=${FROM_PROFILE:-unset}" > "$TMPDIR/www/index.html"
exec python3 -m http.server "$PORT" -d "$TMPDIR/www"
`,
			"manifest.yml": "applications:\n- name: envapp\n  env:\n    GREETING: ((greeting))\n",
		})
		out := d.mustBasin(t, app, "push", "envapp", "--var", "greeting=hola", "-p", ".", "-b", bp("env-and-cache"), "-s", "bookworm")
		if !strings.Contains(out, "GREETING in ENV_DIR is 'hola'") {
			t.Error("compile did not see the manifest's env in ENV_DIR")
		}
		d.waitBody(t, "envapp.apps.localhost", "greeting=hola count=1 profile=sourced-at-launch", 30*time.Second)
		out = d.mustBasin(t, app, "restage", "envapp")
		if !strings.Contains(out, "compiled 2 time(s)") {
			t.Error("restage output does not show the cache's counter at 2")
		}
		d.waitBody(t, "envapp.apps.localhost", "greeting=hola count=2 profile=sourced-at-launch", 30*time.Second)
	})

	t.Run("external buildpacks by tarball and directory: supply then finalize", func(t *testing.T) {
		app := writeApp(t, map[string]string{"README": "the page is the final buildpack's\n"})
		out := d.mustBasin(t, "", "push", "supplied", "-p", app, "-b", tgz(t, "supply-tool"), "-b", bp("finalize-web"), "-s", "bookworm", "--no-manifest")
		for _, want := range []string{"supply-tool: supplied", "finalize-web: page written by"} {
			if !strings.Contains(out, want) {
				t.Errorf("push output lacks %q", want)
			}
		}
		d.waitBody(t, "supplied.apps.localhost", "made by the tool supply-tool supplied", 30*time.Second)
	})

	t.Run("admin buildpacks", func(t *testing.T) {
		list := func() []string {
			out := d.mustBasin(t, "", "buildpacks", "--json")
			var bps []struct {
				Name     string `json:"name"`
				Position int    `json:"position"`
			}
			if err := json.Unmarshal([]byte(out), &bps); err != nil {
				t.Fatalf("buildpacks --json: %v\n%s", err, out)
			}
			slices.SortFunc(bps, func(a, b struct {
				Name     string `json:"name"`
				Position int    `json:"position"`
			}) int {
				return a.Position - b.Position
			})
			var names []string
			for _, b := range bps {
				names = append(names, b.Name)
			}
			return names
		}
		if got := list(); !slices.Equal(got, buildpacks.Order) {
			t.Fatalf("buildpacks lists %v, want the built-ins %v", got, buildpacks.Order)
		}
		d.mustBasin(t, "", "create-buildpack", "fixture", tgz(t, "env-and-cache"), "2")
		want := slices.Insert(slices.Clone(buildpacks.Order), 1, "fixture")
		if got := list(); !slices.Equal(got, want) {
			t.Errorf("after create-buildpack at 2: %v, want %v", got, want)
		}
		d.mustBasin(t, "", "update-buildpack", "fixture", "-i", "5")
		want = slices.Insert(slices.Clone(buildpacks.Order), 4, "fixture")
		if got := list(); !slices.Equal(got, want) {
			t.Errorf("after update-buildpack -i 5: %v, want %v", got, want)
		}
		d.mustBasin(t, "", "delete-buildpack", "fixture", "-f")
		if got := list(); !slices.Equal(got, buildpacks.Order) {
			t.Errorf("after delete-buildpack: %v, want %v", got, buildpacks.Order)
		}
	})

	t.Run("scale-out from 1 to 10 creates no staging task", func(t *testing.T) {
		d.mustBasin(t, "", "push", "scaled", "-p", filepath.Join("..", "examples", "binary"), "-i", "1", "-m", "64M", "-s", "bookworm", "--no-manifest")
		d.waitBody(t, "scaled.apps.localhost", "hello from binary", 30*time.Second)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		stream, err := d.client(t).SubscribeToEvents(ctx, &basinv1.SubscribeToEventsRequest{})
		if err != nil {
			t.Fatal(err)
		}
		var mu sync.Mutex
		var tasks []string
		created := 0
		done := make(chan struct{})
		go func() {
			defer close(done)
			for {
				resp, err := stream.Recv()
				if err != nil {
					return
				}
				mu.Lock()
				switch e := resp.GetEvent(); {
				case e.GetTaskCreated() != nil:
					tasks = append(tasks, e.GetTaskCreated().GetTask().GetTaskGuid())
				case e.GetActualLrpCreated() != nil:
					created++
				}
				mu.Unlock()
			}
		}()
		time.Sleep(300 * time.Millisecond) // the subscription is in place
		t0 := time.Now()
		d.mustBasin(t, "", "scale", "scaled", "-i", "10")
		deadline := time.Now().Add(time.Minute)
		for {
			if _, routable := d.appView(t, "scaled").running(); routable == 10 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("never 10 routable instances: %+v", d.appView(t, "scaled").Instances)
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Logf("scale -i 10 to 10 routable instances: %s", time.Since(t0).Round(time.Millisecond))
		d.waitBody(t, "scaled.apps.localhost", "hello from binary", 10*time.Second)
		time.Sleep(200 * time.Millisecond) // the last events arrive
		cancel()
		<-done
		mu.Lock()
		defer mu.Unlock()
		if created < 9 {
			t.Errorf("the events stream saw %d instances created, want 9: it did not cover the scale", created)
		}
		if len(tasks) != 0 {
			t.Errorf("scaling out created tasks %v: it must reuse the droplet", tasks)
		}
	})
}

// waitRouted is waitBody with a deadline per request, so one request that
// hangs is reported, and the next one can still succeed.
func waitRouted(t *testing.T, d *devUp, host, want string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		t0 := time.Now()
		code, body, err := d.routerGet(ctx, host)
		cancel()
		if err == nil && code == 200 && strings.Contains(body, want) {
			return
		}
		if err != nil || time.Since(t0) > time.Second {
			t.Logf("GET %s through the router after %s: %d %q %v", host, time.Since(t0).Round(time.Millisecond), code, body, err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never answered %q through the router: %d %q %v", host, want, code, body, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// assertNothingDesired: the app has no droplet, no process and no instance.
func assertNothingDesired(t *testing.T, d *devUp, name string) {
	t.Helper()
	v := d.appView(t, name)
	if v.App.DropletDigest != "" || len(v.App.ProcessGuids) != 0 || len(v.Instances) != 0 {
		t.Errorf("a failed staging left something desired: droplet %q, processes %v, instances %+v", v.App.DropletDigest, v.App.ProcessGuids, v.Instances)
	}
}
