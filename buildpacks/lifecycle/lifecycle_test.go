package lifecycle

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// fixtures are the shell-script buildpacks in testdata/buildpacks.
const fixtures = "testdata/buildpacks"

type entry struct {
	hdr  *tar.Header
	body string
}

type staging struct {
	cfg            Config
	stdout, stderr bytes.Buffer
}

// newStaging lays out a staging run under a fresh directory: the app's
// files in base/app, the cache in cache (shared between stagings when
// given).
func newStaging(t *testing.T, app map[string]string, cache string, order ...string) *staging {
	t.Helper()
	base := t.TempDir()
	build := filepath.Join(base, "app")
	for name, body := range app {
		p := filepath.Join(build, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(build, 0o755); err != nil {
		t.Fatal(err)
	}
	if cache == "" {
		cache = filepath.Join(base, "cache")
	}
	bpDir, err := filepath.Abs(fixtures)
	if err != nil {
		t.Fatal(err)
	}
	s := &staging{}
	s.cfg = Config{
		BuildDir:       build,
		BuildpacksDir:  bpDir,
		BuildpackOrder: order,
		CacheDir:       cache,
		OutputDroplet:  filepath.Join(base, "droplet", "droplet.tgz"),
		OutputMetadata: filepath.Join(base, "droplet", "result.json"),
		Env:            []string{"PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello from env", "CF_STACK=bookworm"},
		Stdout:         &s.stdout,
		Stderr:         &s.stderr,
	}
	return s
}

func (s *staging) droplet(t *testing.T) map[string]entry {
	t.Helper()
	f, err := os.Open(s.cfg.OutputDroplet)
	if err != nil {
		t.Fatalf("droplet: %v", err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(zr)
	out := map[string]entry{}
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		out[hdr.Name] = entry{hdr, string(b)}
	}
}

func (s *staging) metadata(t *testing.T) map[string]any {
	t.Helper()
	b, err := os.ReadFile(s.cfg.OutputMetadata)
	if err != nil {
		t.Fatalf("result.json: %v", err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("result.json %s: %v", b, err)
	}
	return m
}

func TestStage(t *testing.T) {
	tests := []struct {
		name       string
		app        map[string]string
		order      []string
		skipDetect bool
		want       Result
		files      map[string]string // droplet entry -> content ("" = only exists)
		output     []string          // in stdout+stderr
	}{
		{
			name:  "detection order picks the first that detects",
			app:   map[string]string{"marker.txt": "", "norelease.txt": ""},
			order: []string{"nope", "marker", "norelease"},
			want: Result{DetectedBuildpack: "Marker", BuildpackKey: "marker", StartCommand: "cat compiled.txt",
				ProcessTypes: map[string]string{"web": "cat compiled.txt", "worker": "echo it's working"}},
			files: map[string]string{
				"app/compiled.txt":         "hello from env\n", // compile read ENV_DIR
				"app/.profile.d/marker.sh": "export MARKER_PROFILE=yes\n",
				"app/marker.txt":           "",
				"deps/":                    "",
				"profile.d/":               "",
				"tmp/":                     "",
				"logs/":                    "",
				"staging_info.yml":         `{"detected_buildpack":"Marker","start_command":"cat compiled.txt"}`,
				"app/norelease.txt":        "",
				"deps/0/":                  "",
				"app/.profile.d/":          "",
				"app/":                     "",
			},
			output: []string{"Marker app detected", "compiling in", "staging number 1"},
		},
		{
			name:  "missing bin/release gives no process types",
			app:   map[string]string{"norelease.txt": ""},
			order: []string{"marker", "norelease"},
			want:  Result{DetectedBuildpack: "norelease", BuildpackKey: "norelease", ProcessTypes: map[string]string{}},
			files: map[string]string{"app/compiled-without-release": "", "staging_info.yml": `{"detected_buildpack":"norelease","start_command":""}`},
		},
		{
			name:  "Procfile overrides the release's web",
			app:   map[string]string{"marker.txt": "", "Procfile": "# processes\nweb: ./serve --port $PORT\nclock: ./tick\n"},
			order: []string{"marker"},
			want: Result{DetectedBuildpack: "Marker", BuildpackKey: "marker", StartCommand: "./serve --port $PORT",
				ProcessTypes: map[string]string{"web": "./serve --port $PORT", "worker": "echo it's working", "clock": "./tick"}},
		},
		{
			name:       "skipDetect supplies all but the last, which supplies and finalizes",
			app:        map[string]string{"anything": ""},
			order:      []string{"supplier", "finalizer"},
			skipDetect: true,
			want: Result{DetectedBuildpack: "finalizer", BuildpackKey: "finalizer", StartCommand: "../deps/0/bin/tool",
				ProcessTypes: map[string]string{"web": "../deps/0/bin/tool"}},
			files: map[string]string{
				"deps/0/bin/tool":              "#!/bin/sh\necho supplied tool\n",
				"deps/1/supplied-by-finalizer": "final\n",
				"profile.d/finalizer.sh":       "export FINALIZED=yes\n",
				"profile.d/000_supplier.sh":    "export SUPPLIED=\"$DEPS_DIR/0\"\n",
				"deps/0/profile.d/supplier.sh": "export SUPPLIED=\"$DEPS_DIR/0\"\n",
				"app/anything":                 "",
				"staging_info.yml":             `{"detected_buildpack":"finalizer","start_command":"../deps/0/bin/tool"}`,
			},
			output: []string{"supplied into index 0", "finalized index 1"},
		},
		{
			name:       "skipDetect with one compile buildpack",
			app:        map[string]string{},
			order:      []string{"marker"},
			skipDetect: true,
			want: Result{DetectedBuildpack: "marker", BuildpackKey: "marker", StartCommand: "cat compiled.txt",
				ProcessTypes: map[string]string{"web": "cat compiled.txt", "worker": "echo it's working"}},
		},
		{
			name:  "a buildpack nested in one top-level directory",
			app:   map[string]string{"nested.txt": ""},
			order: []string{"nope", "nested"},
			want: Result{DetectedBuildpack: "Nested", BuildpackKey: "nested", StartCommand: "echo nested",
				ProcessTypes: map[string]string{"web": "echo nested"}},
			files: map[string]string{"app/nested-compiled": "nested\n"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := newStaging(t, tc.app, "", tc.order...)
			s.cfg.SkipDetect = tc.skipDetect
			res, err := Stage(context.Background(), s.cfg)
			if err != nil {
				t.Fatalf("Stage: %v\nstdout:\n%s\nstderr:\n%s", err, &s.stdout, &s.stderr)
			}
			if res.DetectedBuildpack != tc.want.DetectedBuildpack || res.BuildpackKey != tc.want.BuildpackKey ||
				res.StartCommand != tc.want.StartCommand || !maps.Equal(res.ProcessTypes, tc.want.ProcessTypes) {
				t.Errorf("result %+v, want %+v", res, tc.want)
			}
			meta := s.metadata(t)
			keys := slices.Sorted(maps.Keys(meta))
			if !slices.Equal(keys, []string{"buildpack_key", "detected_buildpack", "process_types", "start_command"}) {
				t.Errorf("result.json keys %v", keys)
			}
			if meta["start_command"] != tc.want.StartCommand || meta["detected_buildpack"] != tc.want.DetectedBuildpack {
				t.Errorf("result.json %v", meta)
			}
			d := s.droplet(t)
			for _, top := range []string{"app/", "deps/", "profile.d/", "tmp/", "logs/", "staging_info.yml"} {
				if _, ok := d[top]; !ok {
					t.Errorf("droplet has no %s", top)
				}
			}
			for name, e := range d {
				if e.hdr.Uid != 2000 || e.hdr.Gid != 2000 {
					t.Errorf("%s owned by %d:%d, want 2000:2000", name, e.hdr.Uid, e.hdr.Gid)
				}
			}
			for name, want := range tc.files {
				if want == "skip" {
					continue
				}
				e, ok := d[name]
				if !ok {
					t.Errorf("droplet has no %s; has %v", name, slices.Sorted(maps.Keys(d)))
					continue
				}
				if want != "" && e.body != want {
					t.Errorf("%s = %q, want %q", name, e.body, want)
				}
			}
			all := s.stdout.String() + s.stderr.String()
			for _, want := range tc.output {
				if !strings.Contains(all, want) {
					t.Errorf("output has no %q:\n%s", want, all)
				}
			}
		})
	}
}

func TestStageFailures(t *testing.T) {
	tests := []struct {
		name       string
		app        map[string]string
		order      []string
		skipDetect bool
		phase      string
		code       int
		output     []string // in stdout+stderr and the error
	}{
		{"no buildpack detects", map[string]string{"x": ""}, []string{"nope", "marker", "norelease"}, false, PhaseDetect, ExitDetect,
			[]string{"none of the buildpacks detected a compatible application", "tried nope, marker, norelease"}},
		{"compile fails", map[string]string{"app.rb": "end"}, []string{"nope", "failing"}, false, PhaseCompile, ExitCompile,
			[]string{"syntax error, unexpected end-of-input", "checking app.rb", "compile failed in buildpack failing"}},
		{"release fails", nil, []string{"badrelease"}, false, PhaseRelease, ExitRelease,
			[]string{"release broke", "release failed in buildpack badrelease"}},
		{"a non-final buildpack without supply", nil, []string{"marker", "finalizer"}, true, PhaseSupply, ExitSupply,
			[]string{"has no bin/supply"}},
		{"finalize fails without its supplier", nil, []string{"finalizer"}, true, PhaseFinalize, ExitFinalize,
			[]string{"no tool from the first buildpack", "finalize failed in buildpack finalizer"}},
		{"unknown buildpack", nil, []string{"nonexistent"}, false, PhaseDetect, ExitOther, []string{"buildpack nonexistent"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := newStaging(t, tc.app, "", tc.order...)
			s.cfg.SkipDetect = tc.skipDetect
			_, err := Stage(context.Background(), s.cfg)
			if err == nil {
				t.Fatal("Stage succeeded")
			}
			if got := ExitCode(err); got != tc.code {
				t.Errorf("exit code %d, want %d (%v)", got, tc.code, err)
			}
			pe, ok := errors.AsType[*PhaseError](err)
			if !ok || pe.Phase != tc.phase {
				t.Errorf("error %v: want phase %s", err, tc.phase)
			}
			if tc.code == ExitDetect && !errors.Is(err, ErrNoBuildpackDetected) {
				t.Errorf("error %v does not wrap ErrNoBuildpackDetected", err)
			}
			all := s.stdout.String() + s.stderr.String() + err.Error()
			for _, want := range tc.output {
				if !strings.Contains(all, want) {
					t.Errorf("output has no %q:\n%s", want, all)
				}
			}
			meta := s.metadata(t)
			if meta["failed_phase"] != tc.phase || meta["exit_code"] != float64(tc.code) {
				t.Errorf("result.json %v: want failed_phase %s, exit_code %d", meta, tc.phase, tc.code)
			}
			if _, err := os.Stat(s.cfg.OutputDroplet); err == nil {
				t.Error("a droplet was written for a failed staging")
			}
		})
	}
}

func TestCacheSurvivesRestage(t *testing.T) {
	cache := filepath.Join(t.TempDir(), "cache")
	for i, want := range []string{"staging number 1", "staging number 2"} {
		s := newStaging(t, map[string]string{"marker.txt": ""}, cache, "marker")
		if _, err := Stage(context.Background(), s.cfg); err != nil {
			t.Fatalf("staging %d: %v\n%s%s", i+1, err, &s.stdout, &s.stderr)
		}
		if !strings.Contains(s.stdout.String(), want) {
			t.Errorf("staging %d output has no %q:\n%s", i+1, want, &s.stdout)
		}
	}
	if _, err := os.Stat(filepath.Join(cache, "marker", "count")); err != nil {
		t.Errorf("the buildpack's cache is not in its own subdirectory: %v", err)
	}
}

// TestProfilesSourcedAtLaunch sources the droplet's profile.d the way
// basin-launcher does and checks what the buildpacks exported.
func TestProfilesSourcedAtLaunch(t *testing.T) {
	s := newStaging(t, map[string]string{"x": ""}, "", "supplier", "finalizer")
	s.cfg.SkipDetect = true
	if _, err := Stage(context.Background(), s.cfg); err != nil {
		t.Fatalf("Stage: %v\n%s%s", err, &s.stdout, &s.stderr)
	}
	home := t.TempDir()
	for name, e := range s.droplet(t) {
		p := filepath.Join(home, name)
		if e.hdr.Typeflag == tar.TypeDir {
			if err := os.MkdirAll(p, 0o755); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(e.body), os.FileMode(e.hdr.Mode)); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command("sh", "-c", `cd app && for f in ../profile.d/*; do . "$f"; done && echo "$SUPPLIED $FINALIZED" && ../deps/0/bin/tool`)
	cmd.Env = []string{"PATH=/usr/bin:/bin", "DEPS_DIR=/home/vcap/deps"}
	cmd.Dir = home
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("sourcing profile.d: %v\n%s", err, out)
	}
	if got, want := string(out), "/home/vcap/deps/0 yes\nsupplied tool\n"; got != want {
		t.Errorf("launch output %q, want %q", got, want)
	}
}

func TestParseRelease(t *testing.T) {
	tests := []struct {
		in   string
		want map[string]string
		err  bool
	}{
		{"---\ndefault_process_types:\n  web: bundle exec rackup -p $PORT\n", map[string]string{"web": "bundle exec rackup -p $PORT"}, false},
		{"addons: []\ndefault_process_types: {}\n", map[string]string{}, false},
		{"config_vars:\n  A: b\ndefault_process_types:\n  web: \"a \\\"q\\\"\"\n  worker: 'x''y' \nother:\n  web: no\n", map[string]string{"web": `a "q"`, "worker": "x'y"}, false},
		{"default_process_types: {web: x}\n", nil, true},
		{"", map[string]string{}, false},
	}
	for _, tc := range tests {
		got, err := ParseRelease([]byte(tc.in))
		if (err != nil) != tc.err || (!tc.err && !maps.Equal(got, tc.want)) {
			t.Errorf("ParseRelease(%q) = %v, %v; want %v (error %v)", tc.in, got, err, tc.want, tc.err)
		}
	}
}
