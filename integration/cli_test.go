//go:build integration

package integration

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The CLI tests run the real basin binary against `basin dev up`, as a
// user would. Each test's platform has cells on bridges of its own
// (--net-id), so it never shares network names with another test's.

// startCLIPlatform runs dev up with two cells on network netID, and removes
// what it leaves when the test ends.
func startCLIPlatform(t *testing.T, netID int) *devUp {
	t.Helper()
	return startNetPlatform(t, netID)
}

// startNetPlatform runs dev up with two cells on network netID (plus
// extra flags) and removes what it leaves when the test ends.
func startNetPlatform(t *testing.T, netID int, extra ...string) *devUp {
	t.Helper()
	needCell(t)
	t.Cleanup(func() { removeNetBridges(netID) })
	d := startDevUp(t, 2, append([]string{"--net-id", strconvItoa(netID)}, extra...)...)
	d.downOnCleanup(t, basinBinary(t))
	return d
}

// removeNetBridges deletes the bridges of dev up's two cells on netID.
func removeNetBridges(netID int) {
	for i := range 2 {
		exec.Command("ip", "link", "del", fmt.Sprintf("basin-d%d-%d", netID, i)).Run()
	}
}

// downOnCleanup, registered after dev up's home so it runs before the home
// is removed, stops dev up, then removes what it left with dev down (port
// mappings and NAT rules included), and whatever that missed.
func (d *devUp) downOnCleanup(t *testing.T, basin string) {
	t.Cleanup(func() {
		d.stop()
		cmd := exec.Command(basin, "dev", "down")
		cmd.Env = append(os.Environ(), "BASIN_HOME="+d.home)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("basin dev down: %v\n%s", err, out)
		}
		cleanupCellState(t, filepath.Join(d.home, "dev"))
	})
}

// basin runs the CLI against d and returns its combined output and whether
// it exited 0.
func (d *devUp) basin(t *testing.T, dir string, args ...string) (string, bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, basinBinary(t), args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "BASIN_HOME="+d.home)
	out, err := cmd.CombinedOutput()
	if err != nil {
		if _, ok := err.(*exec.ExitError); !ok {
			t.Fatalf("basin %s: %v", strings.Join(args, " "), err)
		}
	}
	t.Logf("$ basin %s\n%s", strings.Join(args, " "), out)
	return string(out), err == nil
}

func (d *devUp) mustBasin(t *testing.T, dir string, args ...string) string {
	t.Helper()
	out, ok := d.basin(t, dir, args...)
	if !ok {
		t.Fatalf("basin %s failed:\n%s", strings.Join(args, " "), out)
	}
	return out
}

// scriptDroplet is a droplet whose start command is cmd (run by
// basin-launcher with the tiny stack's busybox).
func scriptDroplet(t *testing.T, path, cmd string, files map[string]string) {
	t.Helper()
	var buf bytes.Buffer
	gz := gzip.NewWriter(&buf)
	tw := tar.NewWriter(gz)
	for _, dir := range []string{"app/", "deps/", "profile.d/", "tmp/", "logs/"} {
		tw.WriteHeader(&tar.Header{Name: dir, Typeflag: tar.TypeDir, Mode: 0o777})
	}
	info, _ := json.Marshal(map[string]string{"detected_buildpack": "binary", "start_command": cmd})
	all := map[string]string{"staging_info.yml": string(info)}
	for k, v := range files {
		all[k] = v
	}
	for name, content := range all {
		tw.WriteHeader(&tar.Header{Name: name, Mode: 0o755, Size: int64(len(content)), Typeflag: tar.TypeReg})
		tw.Write([]byte(content))
	}
	tw.Close()
	gz.Close()
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}

// serveGreeting answers GET / with "greeting=$GREETING" from busybox httpd.
const serveGreeting = `mkdir -p /home/vcap/tmp/www && echo "greeting=$GREETING" > /home/vcap/tmp/www/index.html && echo "$VCAP_APPLICATION" > /home/vcap/tmp/www/vcap.json && echo "app started with $GREETING" && exec httpd -f -p $PORT -h /home/vcap/tmp/www`

func (d *devUp) waitBody(t *testing.T, host, want string, timeout time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	for {
		code, body, err := d.routerGet(ctx, host)
		if err == nil && code == http.StatusOK && strings.Contains(body, want) {
			return
		}
		if ctx.Err() != nil {
			t.Fatalf("%s never answered %q through the router: %d %q %v", host, want, code, body, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (d *devUp) appJSON(t *testing.T, dir, name string) (running int, current int) {
	t.Helper()
	out := d.mustBasin(t, dir, "app", name, "--json")
	var r struct {
		Instances []struct {
			State   string `json:"state"`
			Current bool   `json:"current"`
		} `json:"instances"`
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("basin app --json printed no JSON: %v\n%s", err, out)
	}
	for _, in := range r.Instances {
		if in.Current {
			current++
			if in.State == "ACTUAL_LRP_STATE_RUNNING" {
				running++
			}
		}
	}
	return running, current
}

// TestCLIEndToEnd is issue 7's walk through the CLI: push with a manifest,
// scale, logs, events of a crash, set-env + restart, run-task, delete -r.
func TestCLIEndToEnd(t *testing.T) {
	d := startCLIPlatform(t, 7)
	dir := t.TempDir()
	scriptDroplet(t, filepath.Join(dir, "greet.tgz"), serveGreeting, nil)
	os.WriteFile(filepath.Join(dir, "manifest.yml"), []byte(`---
applications:
- name: ((name))
  instances: 1
  memory: 64M
  disk_quota: 128M
  stack: tiny
  env:
    GREETING: hello
  routes:
  - route: ((name)).apps.localhost
`), 0o644)

	out := d.mustBasin(t, dir, "push", "--var", "name=e2e", "--droplet", "greet.tgz")
	for _, want := range []string{"1 of 1 instances running", "requested state:   started", "e2e.apps.localhost", "#0"} {
		if !strings.Contains(out, want) {
			t.Errorf("push output lacks %q", want)
		}
	}
	d.waitBody(t, "e2e.apps.localhost", "greeting=hello", time.Minute)

	t.Run("VCAP_APPLICATION", func(t *testing.T) {
		out := d.mustBasin(t, dir, "app", "e2e", "--json")
		var a struct {
			App struct {
				GUID string `json:"guid"`
			} `json:"app"`
		}
		json.Unmarshal([]byte(out), &a)
		req, _ := http.NewRequest("GET", "http://"+d.router+"/vcap.json", nil)
		req.Host = "e2e.apps.localhost"
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var v struct {
			ID   string   `json:"application_id"`
			Name string   `json:"application_name"`
			URIs []string `json:"application_uris"`
			Ver  string   `json:"application_version"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
			t.Fatal(err)
		}
		if v.ID == "" || v.ID != a.App.GUID || v.Name != "e2e" || len(v.URIs) != 1 || v.URIs[0] != "e2e.apps.localhost" || !strings.HasPrefix(v.Ver, a.App.GUID+"-v") {
			t.Errorf("VCAP_APPLICATION %+v, app guid %s", v, a.App.GUID)
		}
	})

	t.Run("scale", func(t *testing.T) {
		d.mustBasin(t, dir, "scale", "e2e", "-i", "3")
		if r, c := d.appJSON(t, dir, "e2e"); r != 3 || c != 3 {
			t.Errorf("after scale -i 3: %d of %d running", r, c)
		}
		d.mustBasin(t, dir, "scale", "e2e", "-i", "1")
		deadline := time.Now().Add(30 * time.Second)
		for {
			if r, c := d.appJSON(t, dir, "e2e"); r == 1 && c == 1 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("scale -i 1 never got down to one instance")
			}
			time.Sleep(200 * time.Millisecond)
		}
		out := d.mustBasin(t, dir, "apps")
		if !strings.Contains(out, "web:1/1") {
			t.Errorf("basin apps does not show 1/1:\n%s", out)
		}
	})

	t.Run("logs", func(t *testing.T) {
		out, ok := d.basin(t, dir, "logs", "e2e", "--recent")
		if !ok || !strings.Contains(out, "app started with hello") {
			t.Errorf("logs --recent lacks the app's line:\n%s", out)
		}
	})

	t.Run("ssh -c", func(t *testing.T) {
		out, ok := d.basin(t, dir, "ssh", "e2e", "-c", "id -un; pwd; echo port=$PORT; exit 4")
		if ok || !strings.Contains(out, "vcap\n/home/vcap/app\nport=8080") {
			t.Errorf("ssh -c: want vcap in /home/vcap/app with PORT and exit status 4:\n%s", out)
		}
		if out, ok := d.basin(t, dir, "ssh", "nope", "-c", "true"); ok || !strings.Contains(out, "nope") {
			t.Errorf("ssh to a missing app:\n%s", out)
		}
	})

	t.Run("set-env and restart", func(t *testing.T) {
		d.mustBasin(t, dir, "set-env", "e2e", "GREETING", "bye")
		if out := d.mustBasin(t, dir, "env", "e2e"); !strings.Contains(out, "GREETING: bye") {
			t.Errorf("env does not show the new value:\n%s", out)
		}
		d.mustBasin(t, dir, "restart", "e2e")
		d.waitBody(t, "e2e.apps.localhost", "greeting=bye", time.Minute)
	})

	t.Run("run-task", func(t *testing.T) {
		if out, ok := d.basin(t, dir, "run-task", "e2e", "--command", "echo from a task; exit 3", "--name", "fails", "--wait"); ok || !strings.Contains(out, "task fails failed") {
			t.Errorf("a task exiting 3 was not reported as failed (exit ok=%v)", ok)
		}
		d.mustBasin(t, dir, "run-task", "e2e", "--command", "test \"$GREETING\" = bye", "--name", "checks-env", "--wait")
		out := d.mustBasin(t, dir, "tasks", "e2e")
		if !strings.Contains(out, "fails") || !strings.Contains(out, "FAILED") || !strings.Contains(out, "SUCCEEDED") {
			t.Errorf("tasks does not show both outcomes:\n%s", out)
		}
	})

	t.Run("events show a crash", func(t *testing.T) {
		scriptDroplet(t, filepath.Join(dir, "crash.tgz"), `echo about to crash; sleep 2; exit 7`, nil)
		d.mustBasin(t, dir, "push", "crasher", "--droplet", "crash.tgz", "-s", "tiny", "-m", "32M", "-u", "process", "--no-route", "--no-start", "--no-manifest")
		d.basin(t, dir, "start", "crasher") // may see the crash, or the instance running
		deadline := time.Now().Add(time.Minute)
		for {
			out := d.mustBasin(t, dir, "events", "crasher")
			if strings.Contains(out, "app.crash") {
				if !strings.Contains(out, "index: 0") {
					t.Errorf("crash event does not name the instance:\n%s", out)
				}
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("no crash event within a minute")
			}
			time.Sleep(500 * time.Millisecond)
		}
		d.mustBasin(t, dir, "delete", "crasher", "-f")
	})

	t.Run("errors and exit codes", func(t *testing.T) {
		out, ok := d.basin(t, dir, "app", "nope")
		if ok || !strings.Contains(out, "not found") || !strings.Contains(out, "basin apps") {
			t.Errorf("basin app nope: ok=%v\n%s", ok, out)
		}
		out, ok = d.basin(t, dir, "scale", "e2e", "-i", "-5")
		if ok || !strings.Contains(out, "instances") {
			t.Errorf("scale -i -5: ok=%v\n%s", ok, out)
		}
	})

	t.Run("delete-route", func(t *testing.T) {
		d.mustBasin(t, dir, "map-route", "e2e", "apps.localhost", "--hostname", "extra")
		waitStatus(t, d, "extra.apps.localhost", http.StatusOK)
		if out := d.mustBasin(t, dir, "delete-route", "apps.localhost", "--hostname", "extra", "-f"); !strings.Contains(out, "e2e") {
			t.Errorf("delete-route does not say which apps it unmapped:\n%s", out)
		}
		waitStatus(t, d, "extra.apps.localhost", http.StatusNotFound)
		if out := d.mustBasin(t, dir, "routes"); strings.Contains(out, "extra") {
			t.Errorf("routes still lists the deleted route:\n%s", out)
		}
		if out := d.mustBasin(t, dir, "delete-route", "apps.localhost", "--hostname", "extra", "-f"); !strings.Contains(out, "does not exist") {
			t.Errorf("deleting it again:\n%s", out)
		}
		waitStatus(t, d, "e2e.apps.localhost", http.StatusOK) // the app's own route stays
	})

	t.Run("delete -r", func(t *testing.T) {
		d.mustBasin(t, dir, "delete", "e2e", "-f", "-r")
		waitStatus(t, d, "e2e.apps.localhost", http.StatusNotFound)
		if out := d.mustBasin(t, dir, "routes"); strings.Contains(out, "e2e") {
			t.Errorf("routes still lists e2e:\n%s", out)
		}
		if out := d.mustBasin(t, dir, "apps"); strings.Contains(out, "e2e") {
			t.Errorf("apps still lists e2e:\n%s", out)
		}
	})
}

// TestRollingDeploy pushes a new droplet with --strategy rolling while
// workers send requests through the router: none may fail.
func TestRollingDeploy(t *testing.T) {
	d := startCLIPlatform(t, 8)
	dir := t.TempDir()
	scriptDroplet(t, filepath.Join(dir, "v1.tgz"), serveGreeting, nil)
	d.mustBasin(t, dir, "push", "roll", "--droplet", "v1.tgz", "-s", "tiny", "-i", "3", "-m", "32M", "--no-manifest")
	d.mustBasin(t, dir, "set-env", "roll", "GREETING", "v2")
	d.waitBody(t, "roll.apps.localhost", "greeting=", time.Minute)

	var requests, failed atomic.Int64
	var sawV2 atomic.Bool
	var mu sync.Mutex
	var failures []string
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	client := &http.Client{Timeout: 5 * time.Second}
	t0 := time.Now()
	for range 4 {
		wg.Go(func() {
			for ctx.Err() == nil && requests.Load() < 20000 {
				req, _ := http.NewRequest("GET", "http://"+d.router+"/", nil)
				req.Host = "roll.apps.localhost"
				resp, err := client.Do(req)
				requests.Add(1)
				if err != nil {
					failed.Add(1)
					mu.Lock()
					failures = append(failures, fmt.Sprintf("+%s %v", time.Since(t0).Round(time.Millisecond), err))
					mu.Unlock()
					continue
				}
				var body bytes.Buffer
				body.ReadFrom(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					failed.Add(1)
					mu.Lock()
					failures = append(failures, fmt.Sprintf("+%s %d %s", time.Since(t0).Round(time.Millisecond), resp.StatusCode, body.String()))
					mu.Unlock()
				} else if strings.Contains(body.String(), "greeting=v2") {
					sawV2.Store(true)
				}
				time.Sleep(5 * time.Millisecond)
			}
		})
	}
	start := time.Now()
	// The new version differs by its env: restart --strategy rolling, then
	// a push of another droplet the same way.
	d.mustBasin(t, dir, "restart", "roll", "--strategy", "rolling")
	t.Logf("first deploy done at +%s", time.Since(t0).Round(time.Millisecond))
	scriptDroplet(t, filepath.Join(dir, "v3.tgz"), strings.Replace(serveGreeting, "greeting=", "v3-greeting=", 1), nil)
	d.mustBasin(t, dir, "push", "roll", "--droplet", "v3.tgz", "--strategy", "rolling", "--no-manifest")
	t.Logf("second deploy done at +%s", time.Since(t0).Round(time.Millisecond))
	// Load for about ten seconds in all, at least two after the last deploy.
	time.Sleep(max(2*time.Second, 10*time.Second-time.Since(t0)))
	cancel()
	wg.Wait()
	fmt.Printf("RESULT rolling_failed_requests %d\n", failed.Load())
	fmt.Printf("RESULT rolling_requests %d\n", requests.Load())
	t.Logf("two rolling deploys in %s under load", time.Since(start).Round(time.Millisecond))
	if failed.Load() != 0 {
		t.Errorf("%d of %d requests failed during the rolling deploys; first: %v", failed.Load(), requests.Load(), failures)
	}
	if !sawV2.Load() {
		t.Error("no request ever reached the restarted version")
	}
	d.waitBody(t, "roll.apps.localhost", "v3-greeting=v2", 10*time.Second)
	out := d.mustBasin(t, dir, "events", "roll")
	if !strings.Contains(out, "audit.app.deployment.finish") {
		t.Errorf("events lack the deployments:\n%s", out)
	}
}

// waitStatus waits up to 30 s for the router to answer host with code.
func waitStatus(t *testing.T, d *devUp, host string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		got, _, err := d.routerGet(ctx, host)
		if err == nil && got == code {
			return
		}
		if ctx.Err() != nil {
			t.Fatalf("%s: router answered %d (%v), want %d", host, got, err, code)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
