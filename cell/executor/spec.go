package executor

import (
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Spec is everything the executor needs to run one instance.
type Spec struct {
	// InstanceGUID names the container, its snapshot and its network.
	InstanceGUID string
	ProcessGUID  string
	Index        int
	// Stack is the stack's name ("tiny"); the executor must have it.
	Stack string
	// Droplet is the app's droplet, already on local disk.
	Droplet Droplet
	// StartCommand is run by basin-launcher; empty uses the droplet's
	// staging_info.yml start_command.
	StartCommand string
	// Env is the user's environment ("K=V"), added after the CF variables
	// so it can override them.
	Env []string
	// MemoryMB, DiskMB: limits in MiB (DiskMB is reported in
	// VCAP_APPLICATION only; the overlay snapshotter has no quota).
	MemoryMB int64
	DiskMB   int64
	// CPUShares is the cgroup cpu weight; 0 derives it from MemoryMB as
	// Cloud Foundry does.
	CPUShares uint64
	// PidsLimit bounds processes and threads; 0 means 1024.
	PidsLimit int64
	// Ports the app listens on; the first is PORT. Empty means [8080].
	Ports []uint16
	// HealthCheck decides when the instance is running and alive.
	HealthCheck HealthCheck
	// App feeds VCAP_APPLICATION.
	App AppInfo
	// Labels are extra container labels (e.g. the owning cell's id) so a
	// restarted cell can tell its containers apart.
	Labels map[string]string
	// Args, when set, is the process run instead of basin-launcher (a
	// staging task runs basin-builder), still as vcap with the same limits.
	Args []string
	// Cwd of the process; default /home/vcap/app.
	Cwd string
	// Mounts are extra bind mounts (a staging task's bits, buildpacks,
	// cache, output directory and builder).
	Mounts []Mount
	// LogSource tags the process's output lines; default SourceApp.
	LogSource string
}

// Mount binds a host path into the container, never with devices or setuid.
type Mount struct {
	Source      string // absolute host path
	Destination string // absolute path in the container
	ReadOnly    bool
}

// Droplet names a droplet by digest and says where its tarball is.
type Droplet struct {
	// Digest is "sha256:<hex>" of the tarball; it is verified before the
	// droplet is unpacked, and names its layer, so it is unpacked once.
	Digest string
	// Path is the local tar.gz.
	Path string
}

// AppInfo is the part of VCAP_APPLICATION that does not come from the
// instance itself.
type AppInfo struct {
	GUID      string
	Name      string
	Version   string
	URIs      []string
	SpaceGUID string
	SpaceName string
	OrgName   string
}

// Health check types (Cloud Foundry's names).
const (
	HealthPort    = "port"
	HealthHTTP    = "http"
	HealthProcess = "process"
)

// HealthCheck says how the executor knows the app is up and stays up.
type HealthCheck struct {
	Type string // HealthPort (default), HealthHTTP or HealthProcess
	// Port to check; 0 means the first of Spec.Ports.
	Port uint16
	// Path for HealthHTTP, default "/".
	Path string
	// StartTimeout bounds the wait for the first success; default 60 s.
	StartTimeout time.Duration
	// Interval between liveness checks once running; default 5 s.
	Interval time.Duration
	// Timeout of one check; default 1 s.
	Timeout time.Duration
}

var guidRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,75}$`)

// ErrInvalidSpec wraps every validation failure.
var ErrInvalidSpec = errors.New("invalid instance spec")

func (s *Spec) withDefaults() {
	if len(s.Ports) == 0 {
		s.Ports = []uint16{8080}
	}
	if s.Cwd == "" {
		s.Cwd = "/home/vcap/app"
	}
	if s.LogSource == "" {
		s.LogSource = SourceApp
	}
	if s.PidsLimit == 0 {
		s.PidsLimit = 1024
	}
	if s.CPUShares == 0 {
		// Diego: weight proportional to memory, clamped to cgroup bounds.
		s.CPUShares = uint64(max(min(s.MemoryMB, 8192), 2))
	}
	h := &s.HealthCheck
	if h.Type == "" {
		h.Type = HealthPort
	}
	if h.Port == 0 {
		h.Port = s.Ports[0]
	}
	if h.Type == HealthHTTP && h.Path == "" {
		h.Path = "/"
	}
	if h.StartTimeout == 0 {
		h.StartTimeout = 60 * time.Second
	}
	if h.Interval == 0 {
		h.Interval = 5 * time.Second
	}
	if h.Timeout == 0 {
		h.Timeout = time.Second
	}
}

func (s *Spec) validate() error {
	bad := func(field, format string, args ...any) error {
		return fmt.Errorf("%w: %s: %s", ErrInvalidSpec, field, fmt.Sprintf(format, args...))
	}
	switch {
	case !guidRE.MatchString(s.InstanceGUID):
		return bad("instance_guid", "must be 1-76 letters, digits, '.', '_' or '-', got %q", s.InstanceGUID)
	case s.Index < 0:
		return bad("index", "must be >= 0, got %d", s.Index)
	case s.Stack == "":
		return bad("stack", "must be set")
	case !strings.HasPrefix(s.Droplet.Digest, "sha256:") || len(s.Droplet.Digest) != 71:
		return bad("droplet.digest", "must be sha256:<64 hex>, got %q", s.Droplet.Digest)
	case s.Droplet.Path == "":
		return bad("droplet.path", "must be set")
	case s.MemoryMB <= 0:
		return bad("memory_mb", "must be > 0, got %d", s.MemoryMB)
	case s.PidsLimit < 0:
		return bad("pids_limit", "must be >= 0, got %d", s.PidsLimit)
	}
	for i, p := range s.Ports {
		if p == 0 {
			return bad(fmt.Sprintf("ports[%d]", i), "must be 1-65535")
		}
	}
	switch s.HealthCheck.Type {
	case HealthPort, HealthHTTP, HealthProcess:
	default:
		return bad("health_check.type", "must be port, http or process, got %q", s.HealthCheck.Type)
	}
	for i, m := range s.Mounts {
		if !strings.HasPrefix(m.Source, "/") || !strings.HasPrefix(m.Destination, "/") || strings.Contains(m.Destination, "..") {
			return bad(fmt.Sprintf("mounts[%d]", i), "source and destination must be absolute, got %q → %q", m.Source, m.Destination)
		}
	}
	for _, e := range s.Env {
		if k, _, ok := strings.Cut(e, "="); !ok || k == "" {
			return bad("env", "entries must be KEY=VALUE, got %q", e)
		}
	}
	return nil
}

// env builds the Cloud Foundry environment (ARCHITECTURE.md) followed by
// the user's variables.
func (s *Spec) env(hostIP string, ports []PortMapping) []string {
	port := strconv.Itoa(int(s.Ports[0]))
	hostPort := ""
	if len(ports) > 0 {
		hostPort = strconv.Itoa(int(ports[0].HostPort))
	}
	type cfPort struct {
		External uint16 `json:"external"`
		Internal uint16 `json:"internal"`
	}
	cfPorts := make([]cfPort, 0, len(ports))
	for _, p := range ports {
		cfPorts = append(cfPorts, cfPort{External: p.HostPort, Internal: p.ContainerPort})
	}
	portsJSON, _ := json.Marshal(cfPorts)
	uris := s.App.URIs
	if uris == nil {
		uris = []string{}
	}
	vcap, _ := json.Marshal(map[string]any{
		"application_id":      s.App.GUID,
		"application_name":    s.App.Name,
		"application_uris":    uris,
		"application_version": s.App.Version,
		"name":                s.App.Name,
		"uris":                uris,
		"version":             s.App.Version,
		"space_id":            s.App.SpaceGUID,
		"space_name":          s.App.SpaceName,
		"organization_name":   s.App.OrgName,
		"process_id":          s.ProcessGUID,
		"instance_id":         s.InstanceGUID,
		"instance_index":      s.Index,
		"host":                "0.0.0.0",
		"port":                int(s.Ports[0]),
		"limits":              map[string]int64{"mem": s.MemoryMB, "disk": s.DiskMB, "fds": fdLimit},
	})
	idx := strconv.Itoa(s.Index)
	env := []string{
		"PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
		"HOME=/home/vcap/app",
		"USER=vcap",
		"LANG=en_US.UTF-8",
		"TMPDIR=/home/vcap/tmp",
		"DEPS_DIR=/home/vcap/deps",
		"PORT=" + port,
		"VCAP_APP_HOST=0.0.0.0",
		"VCAP_APP_PORT=" + port,
		"VCAP_APPLICATION=" + string(vcap),
		"MEMORY_LIMIT=" + strconv.FormatInt(s.MemoryMB, 10) + "m",
		"CF_INSTANCE_GUID=" + s.InstanceGUID,
		"CF_INSTANCE_INDEX=" + idx,
		"CF_INSTANCE_IP=" + hostIP,
		"CF_INSTANCE_PORT=" + hostPort,
		"CF_INSTANCE_ADDR=" + hostIP + ":" + hostPort,
		"CF_INSTANCE_PORTS=" + string(portsJSON),
		"INSTANCE_INDEX=" + idx,
		"INSTANCE_GUID=" + s.InstanceGUID,
	}
	return append(env, s.Env...)
}
