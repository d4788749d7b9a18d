// Package lifecycle is basin's staging lifecycle: it runs Heroku-API and
// Cloud Foundry buildpacks on an app's bits and packs the result into a
// droplet, as Cloud Foundry's buildpackapplifecycle builder does.
//
// Phases and their exit codes (Cloud Foundry's): detect (222 when no
// buildpack detects the app), compile (223), release (224), supply (225),
// finalize (226). It uses the standard library only, since basin-builder is a
// static binary that runs inside staging containers on any stack.
package lifecycle

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// Exit codes of failed phases, as Cloud Foundry's builder uses them.
const (
	ExitDetect   = 222
	ExitCompile  = 223
	ExitRelease  = 224
	ExitSupply   = 225
	ExitFinalize = 226
	// ExitOther is any failure of the lifecycle itself (unreadable
	// buildpacks, droplet not writable).
	ExitOther = 1
)

// Phases, as named in result.json's failed_phase.
const (
	PhaseDetect   = "detect"
	PhaseCompile  = "compile"
	PhaseRelease  = "release"
	PhaseSupply   = "supply"
	PhaseFinalize = "finalize"
	PhaseDroplet  = "droplet"
)

// ErrNoBuildpackDetected is wrapped by the detect phase's error when no
// buildpack detected the app.
var ErrNoBuildpackDetected = errors.New("none of the buildpacks detected a compatible application")

// PhaseError is a failed phase: its exit code is the builder's.
type PhaseError struct {
	Phase     string
	Buildpack string // key of the buildpack that failed, if any
	Code      int
	Err       error
}

func (e *PhaseError) Error() string {
	if e.Buildpack == "" {
		return fmt.Sprintf("%s failed: %v", e.Phase, e.Err)
	}
	return fmt.Sprintf("%s failed in buildpack %s: %v", e.Phase, e.Buildpack, e.Err)
}

func (e *PhaseError) Unwrap() error { return e.Err }

// ExitCode is the process exit code for err: the phase's code, or ExitOther.
func ExitCode(err error) int {
	if pe, ok := errors.AsType[*PhaseError](err); ok {
		return pe.Code
	}
	return ExitOther
}

// Config is one staging run. Paths are those of the staging container.
type Config struct {
	BuildDir       string   // app bits, writable; becomes the droplet's app/
	BuildpacksDir  string   // one read-only subdirectory per buildpack key
	BuildpackOrder []string // detection order, or the buildpacks named
	SkipDetect     bool     // run every buildpack of BuildpackOrder
	CacheDir       string   // kept between stagings of an app; a subdir per buildpack
	OutputDroplet  string   // tar.gz written here
	OutputMetadata string   // result.json written here

	// Env is the buildpacks' environment; nil means os.Environ(). The
	// user's variables among it are also written to compile's ENV_DIR.
	Env []string
	// Stdout and Stderr receive the lifecycle's and buildpacks' output as it
	// happens; nil discards.
	Stdout, Stderr io.Writer
}

// Result is what staging found: result.json's content.
type Result struct {
	DetectedBuildpack string            `json:"detected_buildpack"`
	BuildpackKey      string            `json:"buildpack_key"`
	StartCommand      string            `json:"start_command"`
	ProcessTypes      map[string]string `json:"process_types"`
}

// failure is result.json's content when staging failed.
type failure struct {
	FailedPhase string `json:"failed_phase"`
	ExitCode    int    `json:"exit_code"`
	Buildpack   string `json:"buildpack,omitempty"`
	Error       string `json:"error"`
}

// buildpack is one buildpack of a run.
type buildpack struct {
	key string
	dir string // the directory holding bin/
}

func (b buildpack) has(script string) bool {
	fi, err := os.Stat(filepath.Join(b.dir, "bin", script))
	return err == nil && fi.Mode().IsRegular()
}

// Stage runs the lifecycle. On failure it returns a *PhaseError (or another
// error for the lifecycle's own failures) and writes the failure to
// OutputMetadata when it can.
func Stage(ctx context.Context, cfg Config) (Result, error) {
	r := &run{cfg: cfg, out: cfg.Stdout, errw: cfg.Stderr}
	if r.out == nil {
		r.out = io.Discard
	}
	if r.errw == nil {
		r.errw = io.Discard
	}
	if r.cfg.Env == nil {
		r.cfg.Env = os.Environ()
	}
	res, err := r.stage(ctx)
	if err != nil {
		f := failure{FailedPhase: PhaseDroplet, ExitCode: ExitCode(err), Error: err.Error()}
		if pe, ok := errors.AsType[*PhaseError](err); ok {
			f.FailedPhase, f.Buildpack = pe.Phase, pe.Buildpack
		}
		_ = writeJSON(cfg.OutputMetadata, f)
		return Result{}, err
	}
	if err := writeJSON(cfg.OutputMetadata, res); err != nil {
		return Result{}, &PhaseError{Phase: PhaseDroplet, Code: ExitOther, Err: err}
	}
	return res, nil
}

type run struct {
	cfg       Config
	out, errw io.Writer
	// Staging layout beside the build dir, as Cloud Foundry's: /tmp/deps,
	// /tmp/profile.d next to /tmp/app.
	depsDir, profileDir string
}

func (r *run) stage(ctx context.Context) (Result, error) {
	cfg := r.cfg
	if len(cfg.BuildpackOrder) == 0 {
		return Result{}, &PhaseError{Phase: PhaseDetect, Code: ExitDetect, Err: fmt.Errorf("%w: no buildpacks given", ErrNoBuildpackDetected)}
	}
	bps := make([]buildpack, 0, len(cfg.BuildpackOrder))
	for _, key := range cfg.BuildpackOrder {
		bp, err := r.resolve(key)
		if err != nil {
			return Result{}, &PhaseError{Phase: PhaseDetect, Buildpack: key, Code: ExitOther, Err: err}
		}
		bps = append(bps, bp)
	}
	base := filepath.Dir(filepath.Clean(cfg.BuildDir))
	r.depsDir = filepath.Join(base, "deps")
	r.profileDir = filepath.Join(base, "profile.d")
	for _, d := range []string{r.depsDir, r.profileDir, cfg.CacheDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return Result{}, &PhaseError{Phase: PhaseDroplet, Code: ExitOther, Err: fmt.Errorf("staging directory: %w", err)}
		}
	}

	detected := ""
	if cfg.SkipDetect {
		detected = bps[len(bps)-1].key
	} else {
		bp, name, err := r.detect(ctx, bps)
		if err != nil {
			return Result{}, err
		}
		bps, detected = []buildpack{bp}, name
	}

	last := len(bps) - 1
	for i, bp := range bps[:last] {
		if !bp.has("supply") {
			return Result{}, &PhaseError{Phase: PhaseSupply, Buildpack: bp.key, Code: ExitSupply,
				Err: errors.New("it has no bin/supply, so it can only be the last buildpack")}
		}
		if err := r.supply(ctx, i, bp); err != nil {
			return Result{}, err
		}
	}
	final := bps[last]
	if final.has("finalize") {
		if final.has("supply") {
			if err := r.supply(ctx, last, final); err != nil {
				return Result{}, err
			}
		}
		if err := r.finalize(ctx, last, final); err != nil {
			return Result{}, err
		}
	} else {
		if !final.has("compile") {
			return Result{}, &PhaseError{Phase: PhaseCompile, Buildpack: final.key, Code: ExitCompile,
				Err: errors.New("it has neither bin/compile nor bin/finalize")}
		}
		if err := r.compile(ctx, last, final); err != nil {
			return Result{}, err
		}
	}

	types, err := r.release(ctx, final)
	if err != nil {
		return Result{}, err
	}
	procfile, err := readProcfile(filepath.Join(cfg.BuildDir, "Procfile"))
	if err != nil {
		return Result{}, &PhaseError{Phase: PhaseRelease, Buildpack: final.key, Code: ExitRelease, Err: err}
	}
	for k, v := range procfile {
		types[k] = v
	}
	res := Result{DetectedBuildpack: detected, BuildpackKey: final.key, StartCommand: types["web"], ProcessTypes: types}
	if err := r.collectProfiles(len(bps)); err != nil {
		return Result{}, &PhaseError{Phase: PhaseDroplet, Code: ExitOther, Err: err}
	}
	fmt.Fprintf(r.out, "-----> Writing droplet (detected %s, start command %q)\n", res.DetectedBuildpack, res.StartCommand)
	if err := r.writeDroplet(res); err != nil {
		return Result{}, &PhaseError{Phase: PhaseDroplet, Code: ExitOther, Err: err}
	}
	return res, nil
}

// resolve finds the buildpack's directory: BuildpacksDir/key, or its only
// top-level directory when the archive wrapped everything in one (zips of
// GitHub repositories do).
func (r *run) resolve(key string) (buildpack, error) {
	if key == "" || key == "." || key == ".." || strings.ContainsAny(key, `/\`) {
		return buildpack{}, fmt.Errorf("invalid buildpack key %q", key)
	}
	dir := filepath.Join(r.cfg.BuildpacksDir, key)
	if fi, err := os.Stat(filepath.Join(dir, "bin")); err == nil && fi.IsDir() {
		return buildpack{key: key, dir: dir}, nil
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return buildpack{}, fmt.Errorf("buildpack %s: %w", key, err)
	}
	var subdirs []string
	for _, e := range entries {
		if e.IsDir() {
			subdirs = append(subdirs, e.Name())
		}
	}
	if len(subdirs) == 1 {
		nested := filepath.Join(dir, subdirs[0])
		if fi, err := os.Stat(filepath.Join(nested, "bin")); err == nil && fi.IsDir() {
			return buildpack{key: key, dir: nested}, nil
		}
	}
	return buildpack{}, fmt.Errorf("buildpack %s: no bin/ directory in %s", key, dir)
}

func (r *run) detect(ctx context.Context, bps []buildpack) (buildpack, string, error) {
	for _, bp := range bps {
		if !bp.has("detect") {
			fmt.Fprintf(r.errw, "-----> Buildpack %s has no bin/detect; skipped\n", bp.key)
			continue
		}
		var out bytes.Buffer
		cmd := r.command(ctx, bp, "detect", r.cfg.BuildDir)
		cmd.Stdout = &out
		err := cmd.Run()
		if err == nil {
			name := strings.TrimSpace(firstLine(out.String()))
			if name == "" {
				name = bp.key
			}
			fmt.Fprintf(r.out, "-----> %s app detected (buildpack %s)\n", name, bp.key)
			return bp, name, nil
		}
		if _, ok := errors.AsType[*exec.ExitError](err); !ok {
			return buildpack{}, "", &PhaseError{Phase: PhaseDetect, Buildpack: bp.key, Code: ExitDetect, Err: err}
		}
		if ctx.Err() != nil {
			return buildpack{}, "", &PhaseError{Phase: PhaseDetect, Buildpack: bp.key, Code: ExitDetect, Err: ctx.Err()}
		}
	}
	keys := make([]string, len(bps))
	for i, bp := range bps {
		keys[i] = bp.key
	}
	err := fmt.Errorf("%w (tried %s)", ErrNoBuildpackDetected, strings.Join(keys, ", "))
	return buildpack{}, "", &PhaseError{Phase: PhaseDetect, Code: ExitDetect, Err: err}
}

// cacheDir is the buildpack's own cache directory under CacheDir.
func (r *run) cacheDir(bp buildpack) (string, error) {
	d := filepath.Join(r.cfg.CacheDir, bp.key)
	return d, os.MkdirAll(d, 0o755)
}

func (r *run) depsIdx(i int) (string, error) {
	idx := strconv.Itoa(i)
	return idx, os.MkdirAll(filepath.Join(r.depsDir, idx), 0o755)
}

func (r *run) supply(ctx context.Context, i int, bp buildpack) error {
	return r.phase(ctx, PhaseSupply, ExitSupply, i, bp, func(cache, idx string) []string {
		return []string{r.cfg.BuildDir, cache, r.depsDir, idx}
	})
}

func (r *run) finalize(ctx context.Context, i int, bp buildpack) error {
	return r.phase(ctx, PhaseFinalize, ExitFinalize, i, bp, func(cache, idx string) []string {
		return []string{r.cfg.BuildDir, cache, r.depsDir, idx, r.profileDir}
	})
}

func (r *run) compile(ctx context.Context, i int, bp buildpack) error {
	envDir, err := os.MkdirTemp("", "basin-env-")
	if err != nil {
		return &PhaseError{Phase: PhaseCompile, Buildpack: bp.key, Code: ExitOther, Err: err}
	}
	defer os.RemoveAll(envDir)
	if err := writeEnvDir(envDir, r.cfg.Env); err != nil {
		return &PhaseError{Phase: PhaseCompile, Buildpack: bp.key, Code: ExitOther, Err: err}
	}
	return r.phase(ctx, PhaseCompile, ExitCompile, i, bp, func(cache, _ string) []string {
		return []string{r.cfg.BuildDir, cache, envDir}
	})
}

func (r *run) phase(ctx context.Context, phase string, code, i int, bp buildpack, args func(cache, idx string) []string) error {
	cache, err := r.cacheDir(bp)
	if err != nil {
		return &PhaseError{Phase: phase, Buildpack: bp.key, Code: ExitOther, Err: err}
	}
	idx, err := r.depsIdx(i)
	if err != nil {
		return &PhaseError{Phase: phase, Buildpack: bp.key, Code: ExitOther, Err: err}
	}
	fmt.Fprintf(r.out, "-----> Running %s of buildpack %s\n", phase, bp.key)
	cmd := r.command(ctx, bp, phase, args(cache, idx)...)
	if err := cmd.Run(); err != nil {
		return &PhaseError{Phase: phase, Buildpack: bp.key, Code: code, Err: fmt.Errorf("bin/%s: %w", phase, err)}
	}
	return nil
}

// release runs bin/release when the buildpack has one and returns its
// default_process_types (empty, never nil, otherwise).
func (r *run) release(ctx context.Context, bp buildpack) (map[string]string, error) {
	types := map[string]string{}
	if !bp.has("release") {
		return types, nil
	}
	var out bytes.Buffer
	cmd := r.command(ctx, bp, "release", r.cfg.BuildDir)
	cmd.Stdout = &out
	if err := cmd.Run(); err != nil {
		return nil, &PhaseError{Phase: PhaseRelease, Buildpack: bp.key, Code: ExitRelease, Err: fmt.Errorf("bin/release: %w", err)}
	}
	got, err := ParseRelease(out.Bytes())
	if err != nil {
		return nil, &PhaseError{Phase: PhaseRelease, Buildpack: bp.key, Code: ExitRelease, Err: err}
	}
	for k, v := range got {
		types[k] = v
	}
	return types, nil
}

// command runs one of a buildpack's scripts with the lifecycle's
// environment, in the build dir, its output streamed.
func (r *run) command(ctx context.Context, bp buildpack, script string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, filepath.Join(bp.dir, "bin", script), args...)
	cmd.Dir = r.cfg.BuildDir
	cmd.Env = r.cfg.Env
	cmd.Stdout, cmd.Stderr = r.out, r.errw
	return cmd
}

// collectProfiles copies what supplying buildpacks left in
// deps/<idx>/profile.d into the droplet's profile.d, prefixed by index so
// they are sourced in buildpack order.
func (r *run) collectProfiles(n int) error {
	for i := range n {
		dir := filepath.Join(r.depsDir, strconv.Itoa(i), "profile.d")
		entries, err := os.ReadDir(dir)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return err
		}
		for _, e := range entries {
			if !e.Type().IsRegular() {
				continue
			}
			b, err := os.ReadFile(filepath.Join(dir, e.Name()))
			if err != nil {
				return err
			}
			dst := filepath.Join(r.profileDir, fmt.Sprintf("%03d_%s", i, e.Name()))
			if err := os.WriteFile(dst, b, 0o755); err != nil {
				return err
			}
		}
	}
	return nil
}

// ParseRelease reads default_process_types from bin/release's YAML output.
// It understands the block mapping buildpacks print (keys with scalar
// values, plain or quoted) and an inline empty mapping; other keys are
// ignored.
func ParseRelease(b []byte) (map[string]string, error) {
	types := map[string]string{}
	in := false
	sc := bufio.NewScanner(bytes.NewReader(b))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimRight(sc.Text(), " \t\r")
		trimmed := strings.TrimSpace(line)
		if trimmed == "" || strings.HasPrefix(trimmed, "#") || trimmed == "---" {
			continue
		}
		indented := line[0] == ' ' || line[0] == '\t'
		if !indented {
			key, rest, _ := strings.Cut(line, ":")
			in = strings.TrimSpace(key) == "default_process_types"
			rest = strings.TrimSpace(rest)
			if in && rest != "" && rest != "{}" && rest != "~" && rest != "null" {
				return nil, fmt.Errorf("bin/release line %d: default_process_types must be a block mapping, got %q", n, rest)
			}
			continue
		}
		if !in {
			continue
		}
		key, val, ok := strings.Cut(trimmed, ":")
		if !ok {
			return nil, fmt.Errorf("bin/release line %d: want \"type: command\", got %q", n, trimmed)
		}
		v, err := yamlScalar(strings.TrimSpace(val))
		if err != nil {
			return nil, fmt.Errorf("bin/release line %d: %w", n, err)
		}
		types[strings.Trim(strings.TrimSpace(key), `"'`)] = v
	}
	return types, sc.Err()
}

func yamlScalar(s string) (string, error) {
	if s == "" || (s[0] != '"' && s[0] != '\'') {
		if i := strings.Index(s, " #"); i >= 0 {
			s = strings.TrimSpace(s[:i])
		}
		return s, nil
	}
	// Find the closing quote; only a comment may follow it.
	end := -1
	for i := 1; i < len(s); i++ {
		if s[0] == '"' && s[i] == '\\' {
			i++
			continue
		}
		if s[i] == s[0] {
			if s[0] == '\'' && i+1 < len(s) && s[i+1] == '\'' {
				i++ // '' is a quote inside a single-quoted string
				continue
			}
			end = i
			break
		}
	}
	if end < 0 {
		return "", fmt.Errorf("unterminated string %s", s)
	}
	if rest := strings.TrimSpace(s[end+1:]); rest != "" && !strings.HasPrefix(rest, "#") {
		return "", fmt.Errorf("unexpected %q after string %s", rest, s[:end+1])
	}
	if s[0] == '\'' {
		return strings.ReplaceAll(s[1:end], "''", "'"), nil
	}
	v, err := strconv.Unquote(s[:end+1])
	if err != nil {
		return "", fmt.Errorf("bad double-quoted string %s: %w", s[:end+1], err)
	}
	return v, nil
}

// readProcfile parses a Procfile ("type: command" per line); a missing file
// is no process types.
func readProcfile(path string) (map[string]string, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read Procfile: %w", err)
	}
	types := map[string]string{}
	for line := range strings.Lines(string(b)) {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, ":")
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		if !ok || k == "" || strings.ContainsAny(k, " \t") {
			return nil, fmt.Errorf("Procfile: want \"type: command\", got %q", line)
		}
		types[k] = v
	}
	return types, nil
}

// platformEnv are the variables the platform, not the user, sets: they are
// not written to compile's ENV_DIR.
var platformEnv = []string{"PATH", "HOME", "PWD", "OLDPWD", "SHLVL", "_", "TERM", "HOSTNAME", "USER", "LOGNAME",
	"SHELL", "TMPDIR", "LANG", "PORT", "MEMORY_LIMIT", "DEPS_DIR"}

func isPlatformVar(name string) bool {
	return slices.Contains(platformEnv, name) || strings.HasPrefix(name, "LC_") ||
		strings.HasPrefix(name, "CF_") || strings.HasPrefix(name, "VCAP_") || strings.HasPrefix(name, "INSTANCE_")
}

// writeEnvDir writes one file per user variable of env, named for it and
// holding its value, as Heroku's ENV_DIR.
func writeEnvDir(dir string, env []string) error {
	for _, kv := range env {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" || strings.ContainsAny(k, "/\x00") || isPlatformVar(k) {
			continue
		}
		if err := os.WriteFile(filepath.Join(dir, k), []byte(v), 0o644); err != nil {
			return fmt.Errorf("write ENV_DIR: %w", err)
		}
	}
	return nil
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}

func writeJSON(path string, v any) error {
	if path == "" {
		return nil
	}
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
