package manifest

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func ptr[T any](v T) *T { return &v }

func TestParse(t *testing.T) {
	tests := []struct {
		name    string
		text    string
		vars    map[string]string
		want    []App
		wantErr string
	}{
		{
			name: "every field",
			text: `---
applications:
- name: web
  path: ./site
  instances: 3
  memory: 256M
  disk_quota: 1G
  buildpacks: [ruby, binary]
  command: ./run
  env: {GREETING: hi, N: 3, ON: true}
  routes:
  - route: web.apps.example.com
  - route: www.example.com/api
  health-check-type: http
  health-check-http-endpoint: /healthz
  timeout: 90
  stack: tiny
`,
			want: []App{{Name: "web", Path: "./site", Instances: ptr[int32](3), MemoryMB: ptr[int64](256), DiskMB: ptr[int64](1024),
				Buildpacks: []string{"ruby", "binary"}, Command: ptr("./run"), Env: map[string]string{"GREETING": "hi", "N": "3", "ON": "true"},
				Routes: []string{"web.apps.example.com", "www.example.com/api"}, HealthCheckType: "http", HealthCheckHTTP: "/healthz",
				Timeout: ptr(90), Stack: "tiny"}},
		},
		{
			name: "legacy buildpack, no-route, several apps",
			text: "applications:\n- name: a\n  buildpack: go\n  no-route: true\n- name: b\n  random-route: true\n  memory: 1GB\n",
			want: []App{{Name: "a", Buildpacks: []string{"go"}, NoRoute: true}, {Name: "b", RandomRoute: true, MemoryMB: ptr[int64](1024)}},
		},
		{
			name: "vars, whole and inside a string",
			text: "applications:\n- name: ((app))\n  instances: ((n))\n  routes:\n  - route: ((app)).((domain))\n  env:\n    KEY: \"((secret))\"\n",
			vars: map[string]string{"app": "shop", "n": "2", "domain": "apps.localhost", "secret": "s3cr3t"},
			want: []App{{Name: "shop", Instances: ptr[int32](2), Routes: []string{"shop.apps.localhost"}, Env: map[string]string{"KEY": "s3cr3t"}}},
		},
		{name: "missing vars named", text: "applications:\n- name: ((a))\n  command: ((b)) ((a))\n", wantErr: "no value for the variables a, b"},
		{name: "no applications", text: "applications: []\n", wantErr: "no applications"},
		{name: "not yaml", text: "applications: [\n", wantErr: "not valid YAML"},
		{name: "nameless app", text: "applications:\n- path: .\n", wantErr: "applications[0].name: is required"},
		{name: "duplicate app", text: "applications:\n- name: a\n- name: a\n", wantErr: "appears twice"},
		{name: "bad memory", text: "applications:\n- name: a\n  memory: lots\n", wantErr: "applications[0].memory: \"lots\" is not a size"},
		{name: "bad health check", text: "applications:\n- name: a\n  health-check-type: tcp\n", wantErr: "health-check-type: must be port, http or process"},
		{name: "none is process", text: "applications:\n- name: a\n  health-check-type: none\n", want: []App{{Name: "a", HealthCheckType: "process"}}},
		{name: "both buildpack forms", text: "applications:\n- name: a\n  buildpack: x\n  buildpacks: [y]\n", wantErr: "not both"},
		{name: "no-route with routes", text: "applications:\n- name: a\n  no-route: true\n  routes:\n  - route: a.b.c\n", wantErr: "contradict"},
		{name: "route without route key", text: "applications:\n- name: a\n  routes:\n  - host: a\n", wantErr: "routes[0]"},
		{name: "negative instances", text: "applications:\n- name: a\n  instances: -1\n", wantErr: "instances: must not be negative"},
		{name: "timeout range", text: "applications:\n- name: a\n  timeout: 0\n", wantErr: "timeout: must be between 1 and 600"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := Parse([]byte(tt.text), tt.vars)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(m.Apps, tt.want) {
				t.Errorf("got  %+v\nwant %+v", m.Apps, tt.want)
			}
		})
	}
}

func TestParseMB(t *testing.T) {
	tests := []struct {
		in   string
		want int64
		bad  bool
	}{
		{"256M", 256, false}, {"256MB", 256, false}, {"1G", 1024, false}, {"2gb", 2048, false},
		{"512", 512, false}, {"2048K", 2, false}, {"1T", 1024 * 1024, false},
		{"", 0, true}, {"M", 0, true}, {"-1M", 0, true}, {"10K", 0, true}, {"1.5G", 0, true},
	}
	for _, tt := range tests {
		got, err := ParseMB(tt.in)
		if (err != nil) != tt.bad || got != tt.want {
			t.Errorf("ParseMB(%q) = %d, %v; want %d, bad=%v", tt.in, got, err, tt.want, tt.bad)
		}
	}
}

func TestLoadResolvesPathsAndVarsFile(t *testing.T) {
	dir := t.TempDir()
	mf := filepath.Join(dir, "manifest.yml")
	os.WriteFile(mf, []byte("applications:\n- name: a\n  path: app\n  memory: ((mem))\n"), 0o644)
	vf := filepath.Join(dir, "vars.yml")
	os.WriteFile(vf, []byte("mem: 128M\n"), 0o644)
	vars := map[string]string{}
	if err := ReadVarsFile(vf, vars); err != nil {
		t.Fatal(err)
	}
	m, err := Load(mf, vars)
	if err != nil {
		t.Fatal(err)
	}
	if m.Apps[0].Path != filepath.Join(dir, "app") || *m.Apps[0].MemoryMB != 128 {
		t.Errorf("got %+v", m.Apps[0])
	}
	if _, _, err := ParseVar("novalue"); err == nil {
		t.Error("ParseVar accepted a var without =")
	}
}
