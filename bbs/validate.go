package bbs

import (
	"regexp"
	"strconv"
	"strings"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

// Limits bounds what a request may ask for. Zero fields take the defaults.
type Limits struct {
	MaxInstances   int32
	MaxMemoryMB    int64
	MaxDiskMB      int64
	MaxPids        int64
	MaxRoutes      int
	MaxEnvVars     int
	MaxEnvBytes    int
	MaxAnnotation  int
	MaxCommand     int
	MaxResultBytes int
}

// DefaultLimits are generous for one app yet keep one record far below etcd's
// 1.5 MiB request limit.
var DefaultLimits = Limits{
	MaxInstances:   1000,
	MaxMemoryMB:    64 * 1024,
	MaxDiskMB:      1024 * 1024,
	MaxPids:        32768,
	MaxRoutes:      100,
	MaxEnvVars:     256,
	MaxEnvBytes:    128 * 1024,
	MaxAnnotation:  10 * 1024,
	MaxCommand:     64 * 1024,
	MaxResultBytes: 10 * 1024,
}

func (l Limits) withDefaults() Limits {
	d := DefaultLimits
	if l.MaxInstances > 0 {
		d.MaxInstances = l.MaxInstances
	}
	if l.MaxMemoryMB > 0 {
		d.MaxMemoryMB = l.MaxMemoryMB
	}
	if l.MaxDiskMB > 0 {
		d.MaxDiskMB = l.MaxDiskMB
	}
	if l.MaxPids > 0 {
		d.MaxPids = l.MaxPids
	}
	if l.MaxRoutes > 0 {
		d.MaxRoutes = l.MaxRoutes
	}
	if l.MaxEnvVars > 0 {
		d.MaxEnvVars = l.MaxEnvVars
	}
	if l.MaxEnvBytes > 0 {
		d.MaxEnvBytes = l.MaxEnvBytes
	}
	if l.MaxAnnotation > 0 {
		d.MaxAnnotation = l.MaxAnnotation
	}
	if l.MaxCommand > 0 {
		d.MaxCommand = l.MaxCommand
	}
	if l.MaxResultBytes > 0 {
		d.MaxResultBytes = l.MaxResultBytes
	}
	return d
}

var (
	// guids become etcd key segments: no '/', bounded length.
	stackRE  = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)
	envRE    = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
	labelRE  = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)
	digestRE = regexp.MustCompile(`^sha256:[a-f0-9]{64}$`)
)

// isGUID matches ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$ without a regexp: every
// cell call checks three of them, and the regexp showed in profiles.
func isGUID(v string) bool {
	if len(v) == 0 || len(v) > 128 {
		return false
	}
	for i := range len(v) {
		c := v[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case i > 0 && (c == '.' || c == '_' || c == '-'):
		default:
			return false
		}
	}
	return true
}

func checkGUID(field, v string) error {
	if v == "" {
		return fieldErr(field, "is required")
	}
	if !isGUID(v) {
		return fieldErr(field, "must be 1-128 letters, digits, '.', '_' or '-' starting with a letter or digit, got %q", v)
	}
	return nil
}

func checkOptionalGUID(field, v string) error {
	if v == "" {
		return nil
	}
	return checkGUID(field, v)
}

// checkHost accepts an RFC 1123 host name, lower case, optionally starting
// with a "*." wildcard label.
func checkHost(field, h string) error {
	if h == "" {
		return fieldErr(field, "is required")
	}
	if len(h) > 253 {
		return fieldErr(field, "must be at most 253 characters, got %d", len(h))
	}
	labels := strings.Split(h, ".")
	for i, l := range labels {
		if i == 0 && l == "*" && len(labels) > 2 {
			continue
		}
		if !labelRE.MatchString(l) {
			return fieldErr(field, "must be a lower-case DNS name (optionally starting with \"*.\"), got %q", h)
		}
	}
	return nil
}

// CheckRoute validates a route as DesireLRP does, naming field in the error,
// for layers above the BBS (the app layer) that store routes of their own.
func CheckRoute(field string, r *basinv1.Route) error { return checkRoute(field, r) }

// CheckHealthCheck validates a health check as DesireLRP does.
func CheckHealthCheck(field string, h *basinv1.HealthCheck) error { return checkHealthCheck(field, h) }

func checkRoute(field string, r *basinv1.Route) error {
	if r == nil {
		return fieldErr(field, "is required")
	}
	if err := checkHost(field+".host", r.GetHost()); err != nil {
		return err
	}
	if p := r.GetPath(); p != "" {
		if !strings.HasPrefix(p, "/") || len(p) > 1024 || strings.ContainsAny(p, " \t\r\n?#%") {
			return fieldErr(field+".path", "must start with '/' and hold no spaces, '?', '#' or '%%' (at most 1024 characters), got %q", p)
		}
	}
	if r.GetPort() > 65535 {
		return fieldErr(field+".port", "must be at most 65535, got %d", r.GetPort())
	}
	return nil
}

func (l Limits) checkRoutes(field string, rs []*basinv1.Route) error {
	if len(rs) > l.MaxRoutes {
		return fieldErr(field, "must have at most %d routes, got %d", l.MaxRoutes, len(rs))
	}
	for i, r := range rs {
		if err := checkRoute(indexed(field, i), r); err != nil {
			return err
		}
	}
	return nil
}

func (l Limits) checkEnv(field string, env []*basinv1.EnvVar) error {
	if len(env) > l.MaxEnvVars {
		return fieldErr(field, "must have at most %d variables, got %d", l.MaxEnvVars, len(env))
	}
	size := 0
	for i, e := range env {
		if !envRE.MatchString(e.GetName()) {
			return fieldErr(indexed(field, i)+".name", "must be a letter or '_' followed by letters, digits or '_', got %q", e.GetName())
		}
		size += len(e.GetName()) + len(e.GetValue())
	}
	if size > l.MaxEnvBytes {
		return fieldErr(field, "must total at most %d bytes, got %d", l.MaxEnvBytes, size)
	}
	return nil
}

func (l Limits) checkResources(field string, r *basinv1.ResourceLimits) error {
	if r == nil {
		return fieldErr(field, "is required")
	}
	if r.GetMemoryMb() < 1 || r.GetMemoryMb() > l.MaxMemoryMB {
		return fieldErr(field+".memory_mb", "must be between 1 and %d, got %d", l.MaxMemoryMB, r.GetMemoryMb())
	}
	if r.GetDiskMb() < 1 || r.GetDiskMb() > l.MaxDiskMB {
		return fieldErr(field+".disk_mb", "must be between 1 and %d, got %d", l.MaxDiskMB, r.GetDiskMb())
	}
	if r.GetPids() < 1 || r.GetPids() > l.MaxPids {
		return fieldErr(field+".pids", "must be between 1 and %d, got %d", l.MaxPids, r.GetPids())
	}
	if r.GetCpuWeight() < 0 || r.GetCpuWeight() > 10000 {
		return fieldErr(field+".cpu_weight", "must be between 0 and 10000, got %d", r.GetCpuWeight())
	}
	return nil
}

func checkStack(field, s string) error {
	if s == "" {
		return fieldErr(field, "is required")
	}
	if !stackRE.MatchString(s) {
		return fieldErr(field, "must be a lower-case name of at most 63 characters, got %q", s)
	}
	return nil
}

func checkPlacement(field string, p *basinv1.PlacementConstraint) error {
	for i, t := range p.GetRequireTags() {
		if !isGUID(t) {
			return fieldErr(indexed(field+".require_tags", i), "must be 1-128 letters, digits, '.', '_' or '-', got %q", t)
		}
	}
	return nil
}

func checkDroplet(field string, d *basinv1.DropletRef) error {
	if d == nil {
		return nil
	}
	if !digestRE.MatchString(d.GetDigest()) {
		return fieldErr(field+".digest", "must be \"sha256:\" and 64 lower-case hex digits, got %q", d.GetDigest())
	}
	if len(d.GetUrl()) > 2048 {
		return fieldErr(field+".url", "must be at most 2048 characters")
	}
	return nil
}

func (l Limits) checkInstances(field string, n int32) error {
	if n < 0 || n > l.MaxInstances {
		return fieldErr(field, "must be between 0 and %d, got %d", l.MaxInstances, n)
	}
	return nil
}

func (l Limits) checkSchedule(s *basinv1.DesiredLRPSchedule) error {
	if s == nil {
		return fieldErr("schedule", "is required")
	}
	if err := checkGUID("schedule.process_guid", s.GetProcessGuid()); err != nil {
		return err
	}
	if err := checkOptionalGUID("schedule.domain", s.GetDomain()); err != nil {
		return err
	}
	if err := l.checkInstances("schedule.instances", s.GetInstances()); err != nil {
		return err
	}
	if err := checkStack("schedule.stack", s.GetStack()); err != nil {
		return err
	}
	if err := l.checkResources("schedule.resources", s.GetResources()); err != nil {
		return err
	}
	if err := checkPlacement("schedule.placement", s.GetPlacement()); err != nil {
		return err
	}
	if err := l.checkRoutes("schedule.routes", s.GetRoutes()); err != nil {
		return err
	}
	if len(s.GetAnnotation()) > l.MaxAnnotation {
		return fieldErr("schedule.annotation", "must be at most %d bytes, got %d", l.MaxAnnotation, len(s.GetAnnotation()))
	}
	return nil
}

func (l Limits) checkRun(r *basinv1.DesiredLRPRun) error {
	if r == nil {
		return fieldErr("run", "is required")
	}
	if len(r.GetStartCommand()) > l.MaxCommand {
		return fieldErr("run.start_command", "must be at most %d bytes, got %d", l.MaxCommand, len(r.GetStartCommand()))
	}
	if err := l.checkEnv("run.env", r.GetEnv()); err != nil {
		return err
	}
	if err := checkDroplet("run.droplet", r.GetDroplet()); err != nil {
		return err
	}
	if err := checkHealthCheck("run.health_check", r.GetHealthCheck()); err != nil {
		return err
	}
	if len(r.GetPorts()) > 10 {
		return fieldErr("run.ports", "must have at most 10 ports, got %d", len(r.GetPorts()))
	}
	for i, p := range r.GetPorts() {
		if p < 1 || p > 65535 {
			return fieldErr(indexed("run.ports", i), "must be between 1 and 65535, got %d", p)
		}
	}
	if len(r.GetAppName()) > 256 {
		return fieldErr("run.app_name", "must be at most 256 characters")
	}
	if err := checkOptionalGUID("run.app_guid", r.GetAppGuid()); err != nil {
		return err
	}
	if err := checkOptionalGUID("run.app_version", r.GetAppVersion()); err != nil {
		return err
	}
	return nil
}

func checkHealthCheck(field string, h *basinv1.HealthCheck) error {
	if h == nil {
		return nil
	}
	switch h.GetType() {
	case basinv1.HealthCheckType_HEALTH_CHECK_TYPE_UNSPECIFIED, basinv1.HealthCheckType_HEALTH_CHECK_TYPE_PORT,
		basinv1.HealthCheckType_HEALTH_CHECK_TYPE_PROCESS:
	case basinv1.HealthCheckType_HEALTH_CHECK_TYPE_HTTP:
		if !strings.HasPrefix(h.GetHttpEndpoint(), "/") {
			return fieldErr(field+".http_endpoint", "must start with '/' for an http health check, got %q", h.GetHttpEndpoint())
		}
	default:
		return fieldErr(field+".type", "unknown health check type %d", h.GetType())
	}
	const maxMS = 10 * 60 * 1000
	if h.GetStartTimeoutMs() < 0 || h.GetStartTimeoutMs() > maxMS {
		return fieldErr(field+".start_timeout_ms", "must be between 0 and %d, got %d", maxMS, h.GetStartTimeoutMs())
	}
	if h.GetIntervalMs() < 0 || h.GetIntervalMs() > maxMS {
		return fieldErr(field+".interval_ms", "must be between 0 and %d, got %d", maxMS, h.GetIntervalMs())
	}
	return nil
}

// checkActualKey and checkInstanceKey run on every cell call: they build a
// field's name only when reporting it, since the concatenation showed in
// profiles.
func (l Limits) checkActualKey(field string, k *basinv1.ActualLRPKey) error {
	if k == nil {
		return fieldErr(field, "is required")
	}
	if !isGUID(k.GetProcessGuid()) {
		return checkGUID(field+".process_guid", k.GetProcessGuid())
	}
	if k.GetIndex() < 0 || k.GetIndex() >= l.MaxInstances {
		return fieldErr(field+".index", "must be between 0 and %d, got %d", l.MaxInstances-1, k.GetIndex())
	}
	return nil
}

func checkInstanceKey(field string, k *basinv1.ActualLRPInstanceKey) error {
	if k == nil {
		return fieldErr(field, "is required")
	}
	if !isGUID(k.GetInstanceGuid()) {
		return checkGUID(field+".instance_guid", k.GetInstanceGuid())
	}
	if !isGUID(k.GetCellId()) {
		return checkGUID(field+".cell_id", k.GetCellId())
	}
	return nil
}

// checkFence checks a fence's form; required says whether one must be given.
func checkFence(field string, f *basinv1.Fence, required bool) error {
	if f == nil {
		if required {
			return fieldErr(field, "is required: cells send their presence key (cells/<cell_id>) and its create revision")
		}
		return nil
	}
	if f.GetKey() == "" {
		return fieldErr(field+".key", "is required")
	}
	if f.GetCreateRevision() <= 0 {
		return fieldErr(field+".create_revision", "must be positive, got %d", f.GetCreateRevision())
	}
	return nil
}

func (l Limits) checkTaskDefinition(field string, d *basinv1.TaskDefinition) error {
	if d == nil {
		return fieldErr(field, "is required")
	}
	if err := checkStack(field+".stack", d.GetStack()); err != nil {
		return err
	}
	if d.GetCommand() == "" && d.GetStaging() == nil {
		return fieldErr(field+".command", "is required unless the task stages an app")
	}
	if len(d.GetCommand()) > l.MaxCommand {
		return fieldErr(field+".command", "must be at most %d bytes, got %d", l.MaxCommand, len(d.GetCommand()))
	}
	if err := l.checkEnv(field+".env", d.GetEnv()); err != nil {
		return err
	}
	if err := l.checkResources(field+".resources", d.GetResources()); err != nil {
		return err
	}
	if err := checkPlacement(field+".placement", d.GetPlacement()); err != nil {
		return err
	}
	if err := checkDroplet(field+".droplet", d.GetDroplet()); err != nil {
		return err
	}
	if len(d.GetResultFile()) > 1024 {
		return fieldErr(field+".result_file", "must be at most 1024 characters")
	}
	if d.GetTimeoutMs() < 0 {
		return fieldErr(field+".timeout_ms", "must not be negative, got %d", d.GetTimeoutMs())
	}
	if s := d.GetStaging(); s != nil {
		if err := checkGUID(field+".staging.app_guid", s.GetAppGuid()); err != nil {
			return err
		}
		if !digestRE.MatchString(s.GetBitsDigest()) {
			return fieldErr(field+".staging.bits_digest", "must be \"sha256:\" and 64 lower-case hex digits, got %q", s.GetBitsDigest())
		}
		if len(s.GetBuildpacks()) > 16 {
			return fieldErr(field+".staging.buildpacks", "must name at most 16 buildpacks")
		}
	}
	return nil
}

func indexed(field string, i int) string {
	return field + "[" + strconv.Itoa(i) + "]"
}
