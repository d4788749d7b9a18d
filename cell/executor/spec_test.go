package executor

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

func validSpec() Spec {
	return Spec{
		InstanceGUID: "abc-123", ProcessGUID: "p", Index: 2, Stack: "tiny", MemoryMB: 64,
		Droplet: Droplet{Digest: "sha256:" + strings.Repeat("a", 64), Path: "/tmp/d.tgz"},
	}
}

func TestSpecValidate(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(*Spec)
		field  string // "" when valid
	}{
		{"valid", func(*Spec) {}, ""},
		{"bad guid", func(s *Spec) { s.InstanceGUID = "../x" }, "instance_guid"},
		{"negative index", func(s *Spec) { s.Index = -1 }, "index"},
		{"no stack", func(s *Spec) { s.Stack = "" }, "stack"},
		{"bad digest", func(s *Spec) { s.Droplet.Digest = "md5:1" }, "droplet.digest"},
		{"no droplet path", func(s *Spec) { s.Droplet.Path = "" }, "droplet.path"},
		{"no memory", func(s *Spec) { s.MemoryMB = 0 }, "memory_mb"},
		{"bad health", func(s *Spec) { s.HealthCheck.Type = "tcp" }, "health_check.type"},
		{"bad env", func(s *Spec) { s.Env = []string{"NOEQUALS"} }, "env"},
		{"zero port", func(s *Spec) { s.Ports = []uint16{8080, 0} }, "ports[1]"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := validSpec()
			tc.mutate(&s)
			s.withDefaults()
			err := s.validate()
			if tc.field == "" {
				if err != nil {
					t.Fatalf("validate = %v, want nil", err)
				}
				return
			}
			if !errors.Is(err, ErrInvalidSpec) || !strings.Contains(err.Error(), tc.field+":") {
				t.Fatalf("validate = %v, want ErrInvalidSpec naming %s", err, tc.field)
			}
		})
	}
}

func TestSpecDefaults(t *testing.T) {
	s := validSpec()
	s.withDefaults()
	if len(s.Ports) != 1 || s.Ports[0] != 8080 || s.HealthCheck.Type != HealthPort || s.HealthCheck.Port != 8080 || s.PidsLimit != 1024 || s.CPUShares != 64 {
		t.Errorf("defaults %+v", s)
	}
}

func TestSpecEnv(t *testing.T) {
	s := validSpec()
	s.Env = []string{"PORT=9999", "MINE=1"}
	s.App = AppInfo{Name: "web", GUID: "app-guid"}
	s.withDefaults()
	env := s.env("127.0.0.1", []PortMapping{{ContainerPort: 8080, HostPort: 61001}})
	got := map[string]string{}
	var order []string
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		got[k] = v
		order = append(order, k)
	}
	want := map[string]string{
		"VCAP_APP_HOST": "0.0.0.0", "VCAP_APP_PORT": "8080", "CF_INSTANCE_GUID": "abc-123", "CF_INSTANCE_INDEX": "2",
		"CF_INSTANCE_IP": "127.0.0.1", "CF_INSTANCE_PORT": "61001", "CF_INSTANCE_ADDR": "127.0.0.1:61001",
		"CF_INSTANCE_PORTS": `[{"external":61001,"internal":8080}]`, "INSTANCE_INDEX": "2", "INSTANCE_GUID": "abc-123",
		"MEMORY_LIMIT": "64m", "HOME": "/home/vcap/app", "TMPDIR": "/home/vcap/tmp", "DEPS_DIR": "/home/vcap/deps",
		"LANG": "en_US.UTF-8", "MINE": "1",
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %q, want %q", k, got[k], v)
		}
	}
	// The user's PORT comes after basin's, so it wins in the process.
	if order[len(order)-2] != "PORT" {
		t.Errorf("user env is not last: %v", order)
	}
	var vcap map[string]any
	if err := json.Unmarshal([]byte(got["VCAP_APPLICATION"]), &vcap); err != nil {
		t.Fatalf("VCAP_APPLICATION: %v", err)
	}
	if vcap["application_name"] != "web" || vcap["instance_index"] != float64(2) || vcap["port"] != float64(8080) {
		t.Errorf("VCAP_APPLICATION = %v", vcap)
	}
}
