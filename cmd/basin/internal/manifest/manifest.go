// Package manifest reads Cloud Foundry's manifest.yml: applications with
// their settings, ((vars)) filled from --var and --vars-file.
package manifest

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// App is one application of a manifest, in basin's units. Pointers and nil
// slices mean "not given", so flags and the app's current settings apply.
type App struct {
	Name      string
	Path      string
	Instances *int32
	MemoryMB  *int64
	DiskMB    *int64
	// Buildpacks from buildpacks:, or from the legacy buildpack:.
	Buildpacks []string
	Command    *string
	Env        map[string]string
	// Routes as host[/path].
	Routes          []string
	NoRoute         bool
	RandomRoute     bool
	HealthCheckType string
	HealthCheckHTTP string
	// Timeout is the health check's start timeout in seconds.
	Timeout *int
	Stack   string
}

// Manifest is a parsed manifest.yml.
type Manifest struct {
	Apps []App
}

type rawApp struct {
	Name            string              `yaml:"name"`
	Path            string              `yaml:"path"`
	Instances       *int32              `yaml:"instances"`
	Memory          string              `yaml:"memory"`
	DiskQuota       string              `yaml:"disk_quota"`
	Buildpacks      []string            `yaml:"buildpacks"`
	Buildpack       string              `yaml:"buildpack"`
	Command         *string             `yaml:"command"`
	Env             map[string]any      `yaml:"env"`
	Routes          []map[string]string `yaml:"routes"`
	NoRoute         bool                `yaml:"no-route"`
	RandomRoute     bool                `yaml:"random-route"`
	HealthCheckType string              `yaml:"health-check-type"`
	HealthCheckHTTP string              `yaml:"health-check-http-endpoint"`
	Timeout         *int                `yaml:"timeout"`
	Stack           string              `yaml:"stack"`
}

type rawManifest struct {
	Applications []rawApp `yaml:"applications"`
}

// Load reads the manifest at path; relative app paths are taken from the
// manifest's directory, as cf does.
func Load(path string, vars map[string]string) (*Manifest, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read manifest: %w", err)
	}
	m, err := Parse(b, vars)
	if err != nil {
		return nil, fmt.Errorf("manifest %s: %w", path, err)
	}
	dir := filepath.Dir(path)
	for i := range m.Apps {
		if p := m.Apps[i].Path; p != "" && !filepath.IsAbs(p) {
			m.Apps[i].Path = filepath.Join(dir, p)
		}
	}
	return m, nil
}

// Parse parses manifest text, filling ((vars)) first.
func Parse(b []byte, vars map[string]string) (*Manifest, error) {
	var root yaml.Node
	if err := yaml.Unmarshal(b, &root); err != nil {
		return nil, fmt.Errorf("not valid YAML: %w", err)
	}
	var missing []string
	interpolate(&root, vars, &missing)
	if len(missing) > 0 {
		slices.Sort(missing)
		missing = slices.Compact(missing)
		return nil, fmt.Errorf("no value for the variables %s: give them with --var NAME=VALUE or --vars-file", strings.Join(missing, ", "))
	}
	var raw rawManifest
	if err := root.Decode(&raw); err != nil {
		return nil, fmt.Errorf("unexpected content: %w", err)
	}
	if len(raw.Applications) == 0 {
		return nil, fmt.Errorf("no applications: the manifest needs an applications: list")
	}
	m := &Manifest{}
	seen := map[string]bool{}
	for i, r := range raw.Applications {
		field := func(f string) string { return fmt.Sprintf("applications[%d].%s", i, f) }
		if r.Name == "" {
			return nil, fmt.Errorf("%s: is required", field("name"))
		}
		if seen[r.Name] {
			return nil, fmt.Errorf("%s: app %q appears twice", field("name"), r.Name)
		}
		seen[r.Name] = true
		a := App{Name: r.Name, Path: r.Path, Instances: r.Instances, Command: r.Command, NoRoute: r.NoRoute,
			RandomRoute: r.RandomRoute, HealthCheckType: r.HealthCheckType, HealthCheckHTTP: r.HealthCheckHTTP,
			Timeout: r.Timeout, Stack: r.Stack}
		if a.Instances != nil && *a.Instances < 0 {
			return nil, fmt.Errorf("%s: must not be negative, got %d", field("instances"), *a.Instances)
		}
		if r.Memory != "" {
			mb, err := ParseMB(r.Memory)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", field("memory"), err)
			}
			a.MemoryMB = &mb
		}
		if r.DiskQuota != "" {
			mb, err := ParseMB(r.DiskQuota)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", field("disk_quota"), err)
			}
			a.DiskMB = &mb
		}
		switch {
		case len(r.Buildpacks) > 0 && r.Buildpack != "":
			return nil, fmt.Errorf("%s: give buildpacks or the legacy buildpack, not both", field("buildpack"))
		case len(r.Buildpacks) > 0:
			a.Buildpacks = r.Buildpacks
		case r.Buildpack != "":
			a.Buildpacks = []string{r.Buildpack}
		}
		if len(r.Env) > 0 {
			a.Env = map[string]string{}
			for k, v := range r.Env {
				a.Env[k] = scalarString(v)
			}
		}
		for j, rt := range r.Routes {
			s := strings.TrimSpace(rt["route"])
			if s == "" {
				return nil, fmt.Errorf("%s: each route needs route: host.domain[/path]", fmt.Sprintf("applications[%d].routes[%d]", i, j))
			}
			a.Routes = append(a.Routes, s)
		}
		if a.NoRoute && len(a.Routes) > 0 {
			return nil, fmt.Errorf("%s: no-route and routes contradict each other", field("no-route"))
		}
		switch a.HealthCheckType {
		case "", "port", "http", "process":
		case "none":
			a.HealthCheckType = "process"
		default:
			return nil, fmt.Errorf("%s: must be port, http or process, got %q", field("health-check-type"), a.HealthCheckType)
		}
		if a.Timeout != nil && (*a.Timeout < 1 || *a.Timeout > 600) {
			return nil, fmt.Errorf("%s: must be between 1 and 600 seconds, got %d", field("timeout"), *a.Timeout)
		}
		m.Apps = append(m.Apps, a)
	}
	return m, nil
}

func scalarString(v any) string {
	switch x := v.(type) {
	case nil:
		return ""
	case string:
		return x
	default:
		return fmt.Sprint(x)
	}
}

var varRE = regexp.MustCompile(`\(\(([A-Za-z0-9_.\-]+)\)\)`)

// interpolate fills ((name)) in every scalar. A scalar that is exactly one
// variable takes the value's own type (so instances: ((n)) is a number).
func interpolate(n *yaml.Node, vars map[string]string, missing *[]string) {
	if n.Kind != yaml.ScalarNode {
		for _, c := range n.Content {
			interpolate(c, vars, missing)
		}
		return
	}
	if !strings.Contains(n.Value, "((") {
		return
	}
	whole := varRE.FindString(n.Value) == n.Value
	n.Value = varRE.ReplaceAllStringFunc(n.Value, func(m string) string {
		name := varRE.FindStringSubmatch(m)[1]
		v, ok := vars[name]
		if !ok {
			*missing = append(*missing, name)
			return m
		}
		return v
	})
	if whole && n.Style == 0 {
		// Let YAML type the value anew, as if it had been written there.
		n.Tag = ""
	}
}

// ParseMB reads a size as cf does: 256M, 256MB, 1G, 1GB, 512 (megabytes),
// 2048K.
func ParseMB(s string) (int64, error) {
	t := strings.ToUpper(strings.TrimSpace(s))
	mult, div := int64(1), int64(1)
	switch {
	case strings.HasSuffix(t, "GB"), strings.HasSuffix(t, "G"):
		mult = 1024
	case strings.HasSuffix(t, "MB"), strings.HasSuffix(t, "M"):
	case strings.HasSuffix(t, "KB"), strings.HasSuffix(t, "K"):
		div = 1024
	case strings.HasSuffix(t, "TB"), strings.HasSuffix(t, "T"):
		mult = 1024 * 1024
	}
	num := strings.TrimRight(t, "BKMGT")
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil || n <= 0 || num == "" {
		return 0, fmt.Errorf("%q is not a size: use a number with a unit, like 256M or 1G", s)
	}
	mb := n * mult / div
	if mb < 1 {
		return 0, fmt.Errorf("%q is less than one megabyte", s)
	}
	return mb, nil
}

// ReadVarsFile reads a YAML map of variables.
func ReadVarsFile(path string, into map[string]string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("read vars file: %w", err)
	}
	var m map[string]any
	if err := yaml.Unmarshal(b, &m); err != nil {
		return fmt.Errorf("vars file %s: not a YAML map: %w", path, err)
	}
	for k, v := range m {
		into[k] = scalarString(v)
	}
	return nil
}

// ParseVar reads NAME=VALUE.
func ParseVar(s string) (string, string, error) {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return "", "", fmt.Errorf("--var %q: want NAME=VALUE", s)
	}
	return k, v, nil
}
