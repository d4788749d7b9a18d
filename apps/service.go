package apps

import (
	"cmp"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/basinpaas/basin/bbs"
	"github.com/basinpaas/basin/bbs/blobstore"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"
)

// LRPs is what the app layer asks of the BBS. *bbs.API (in the same
// process, validation included) satisfies it.
type LRPs interface {
	DesireLRP(context.Context, *basinv1.DesireLRPRequest) (*basinv1.DesireLRPResponse, error)
	UpdateDesiredLRP(context.Context, *basinv1.UpdateDesiredLRPRequest) (*basinv1.UpdateDesiredLRPResponse, error)
	RemoveDesiredLRP(context.Context, *basinv1.RemoveDesiredLRPRequest) (*basinv1.RemoveDesiredLRPResponse, error)
	GetDesiredLRP(context.Context, *basinv1.GetDesiredLRPRequest) (*basinv1.GetDesiredLRPResponse, error)
	ListDesiredLRPSchedules(context.Context, *basinv1.ListDesiredLRPSchedulesRequest) (*basinv1.ListDesiredLRPSchedulesResponse, error)
	ListActualLRPs(context.Context, *basinv1.ListActualLRPsRequest) (*basinv1.ListActualLRPsResponse, error)
	RetireActualLRP(context.Context, *basinv1.RetireActualLRPRequest) (*basinv1.RetireActualLRPResponse, error)
	CreateMissingActualLRPs(context.Context, *basinv1.CreateMissingActualLRPsRequest) (*basinv1.CreateMissingActualLRPsResponse, error)
	DesireTask(context.Context, *basinv1.DesireTaskRequest) (*basinv1.DesireTaskResponse, error)
	ListTasks(context.Context, *basinv1.ListTasksRequest) (*basinv1.ListTasksResponse, error)
	ResolveTask(context.Context, *basinv1.ResolveTaskRequest) (*basinv1.ResolveTaskResponse, error)
}

var _ LRPs = (*bbs.API)(nil)

// Subscriber gives the BBS's event stream (*bbs.Store).
type Subscriber interface {
	Subscribe(guid string) *bbs.Subscription
}

// Config holds the app layer's settings; zero values take the defaults.
type Config struct {
	// Prefix is the BBS's etcd prefix.
	Prefix string
	// Domain is where apps get their default route: NAME.<Domain>.
	Domain string
	// Defaults for new apps.
	DefaultMemoryMB, DefaultDiskMB int64
	DefaultStack                   string
	// MaxEvents is how many events each app keeps (100).
	MaxEvents int
	// PollInterval of a rolling deploy (250 ms); RouteSettle is how long a
	// new instance must have been routed before an old one goes (500 ms).
	PollInterval, RouteSettle time.Duration
	// ReconcileInterval is how often apps and their LRPs are brought back
	// in step (30 s); OrphanGrace is how old an LRP no app names must be
	// before it is removed (1 min).
	ReconcileInterval, OrphanGrace time.Duration
	Now                            func() time.Time
	Logger                         *slog.Logger
}

// Service serves the AppService.
type Service struct {
	basinv1.UnimplementedAppServiceServer
	cfg     Config
	etcd    *clientv3.Client
	lrps    LRPs
	sub     Subscriber
	keys    keys
	bbsKeys bbs.Keys
	now     func() time.Time
	log     *slog.Logger
}

var _ basinv1.AppServiceServer = (*Service)(nil)

// New returns the app layer over etcd and the BBS.
func New(cli *clientv3.Client, lrps LRPs, sub Subscriber, cfg Config) *Service {
	if cfg.Domain == "" {
		cfg.Domain = "apps.localhost"
	}
	if cfg.DefaultMemoryMB == 0 {
		cfg.DefaultMemoryMB = 256
	}
	if cfg.DefaultDiskMB == 0 {
		cfg.DefaultDiskMB = 1024
	}
	if cfg.DefaultStack == "" {
		cfg.DefaultStack = "bookworm"
	}
	if cfg.MaxEvents <= 0 {
		cfg.MaxEvents = 100
	}
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = 250 * time.Millisecond
	}
	if cfg.RouteSettle <= 0 {
		cfg.RouteSettle = 500 * time.Millisecond
	}
	if cfg.ReconcileInterval <= 0 {
		cfg.ReconcileInterval = 30 * time.Second
	}
	if cfg.OrphanGrace <= 0 {
		cfg.OrphanGrace = time.Minute
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	bk := bbs.NewKeys(cfg.Prefix)
	return &Service{cfg: cfg, etcd: cli, lrps: lrps, sub: sub, keys: keys{prefix: bk.Prefix}, bbsKeys: bk, now: cfg.Now, log: cfg.Logger}
}

// Run records instance crashes of apps as app events, and every
// ReconcileInterval brings apps and their LRPs back in step, until ctx ends.
// Every BBS replica may run it: a crash is keyed by the etcd revision of the
// change that reported it, so replicas write it once, and repairs are
// idempotent.
func (s *Service) Run(ctx context.Context) error {
	done := make(chan struct{})
	defer func() { <-done }()
	go func() {
		defer close(done)
		t := time.NewTicker(s.cfg.ReconcileInterval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			if err := s.reconcile(ctx); err != nil && ctx.Err() == nil {
				s.log.Warn("reconcile apps and LRPs", "err", err)
			}
		}
	}()
	for ctx.Err() == nil {
		sub := s.sub.Subscribe("")
		err := s.follow(ctx, sub)
		sub.Close()
		if ctx.Err() == nil {
			s.log.Warn("app event recorder resubscribes", "err", err)
		}
	}
	return nil
}

// follow records what the BBS reports of apps: crashes in their events, and
// completed tasks in their task history, which it then resolves.
func (s *Service) follow(ctx context.Context, sub *bbs.Subscription) error {
	for {
		ev, err := sub.Next(ctx)
		if err != nil {
			return err
		}
		if c := ev.GetActualLrpCrashed(); c != nil {
			s.recordCrash(ctx, c, ev.GetRevision())
		}
		if t := ev.GetTaskChanged().GetAfter(); t.GetState() == basinv1.TaskState_TASK_STATE_COMPLETED {
			s.keepCompleted(ctx, t)
		}
	}
}

func (s *Service) recordCrash(ctx context.Context, c *basinv1.ActualLRPCrashedEvent, rev int64) {
	if c.GetKey().GetDomain() != Domain {
		return
	}
	guid, ok := appGUIDOf(c.GetKey().GetProcessGuid())
	if !ok {
		return
	}
	reason := c.GetCrashReason()
	short, _, _ := strings.Cut(reason, "; last output:")
	aev := &basinv1.AppEvent{
		Type: "app.crash", TimeUnixNano: c.GetSinceUnixNano(), Index: c.GetKey().GetIndex(),
		ExitReason: reason, CrashCount: c.GetCrashCount(), ProcessGuid: c.GetKey().GetProcessGuid(),
		Description: fmt.Sprintf("index: %d, reason: CRASHED, exit_description: %s", c.GetKey().GetIndex(), short),
	}
	key := s.keys.event(guid, c.GetSinceUnixNano(), fmt.Sprintf("crash-r%d", rev))
	if err := s.record(ctx, guid, key, aev); err != nil && ctx.Err() == nil {
		s.log.Warn("record crash", "process_guid", c.GetKey().GetProcessGuid(), "err", err)
	}
}

// keepCompleted moves an app's completed task into the app's history and
// resolves it in the BBS, where it would otherwise wait for the converger's
// timeout and then vanish from tasks. A task already resolved (by another
// replica) is fine.
func (s *Service) keepCompleted(ctx context.Context, t *basinv1.Task) {
	if t.GetDomain() != TaskDomain {
		return
	}
	guid, _, ok := strings.Cut(t.GetTaskGuid(), "-task-")
	if !ok {
		return
	}
	if err := s.keepTask(ctx, guid, t); err != nil {
		if ctx.Err() == nil {
			s.log.Warn("keep completed task", "task", t.GetTaskGuid(), "err", err)
		}
		return // left for the next replica, or the converger
	}
	if _, err := s.lrps.ResolveTask(ctx, &basinv1.ResolveTaskRequest{TaskGuid: t.GetTaskGuid()}); err != nil &&
		!errors.Is(err, bbs.ErrNotFound) && ctx.Err() == nil {
		s.log.Warn("resolve completed task", "task", t.GetTaskGuid(), "err", err)
	}
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

func checkName(field, n string) error {
	if n == "" {
		return &bbs.FieldError{Field: field, Msg: "is required"}
	}
	if !nameRE.MatchString(n) {
		return &bbs.FieldError{Field: field, Msg: fmt.Sprintf("must be 1-63 letters, digits, '.', '_' or '-' starting with a letter or digit, got %q", n)}
	}
	return nil
}

func fieldErr(field, format string, args ...any) error {
	return &bbs.FieldError{Field: field, Msg: fmt.Sprintf(format, args...)}
}

var envNameRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// checkSettings validates what users may set on an app.
func checkSettings(field string, a *basinv1.App) error {
	if a.GetInstances() < 0 || a.GetInstances() > 1000 {
		return fieldErr(field+".instances", "must be between 0 and 1000, got %d", a.GetInstances())
	}
	if a.GetMemoryMb() < 1 || a.GetMemoryMb() > 64*1024 {
		return fieldErr(field+".memory_mb", "must be between 1 and 65536, got %d", a.GetMemoryMb())
	}
	if a.GetDiskMb() < 1 || a.GetDiskMb() > 1024*1024 {
		return fieldErr(field+".disk_mb", "must be between 1 and 1048576, got %d", a.GetDiskMb())
	}
	if len(a.GetCommand()) > 64*1024 {
		return fieldErr(field+".command", "must be at most 65536 bytes, got %d", len(a.GetCommand()))
	}
	for i, b := range a.GetBuildpacks() {
		if b == "" || len(b) > 256 {
			return fieldErr(fmt.Sprintf("%s.buildpacks[%d]", field, i), "must be 1-256 characters, got %q", b)
		}
	}
	for k := range a.GetEnv() {
		if !envNameRE.MatchString(k) {
			return fieldErr(field+".env", "variable names must be a letter or '_' followed by letters, digits or '_', got %q", k)
		}
	}
	if len(a.GetRoutes()) > 100 {
		return fieldErr(field+".routes", "must have at most 100 routes, got %d", len(a.GetRoutes()))
	}
	for i, r := range a.GetRoutes() {
		if err := bbs.CheckRoute(fmt.Sprintf("%s.routes[%d]", field, i), r); err != nil {
			return err
		}
	}
	return bbs.CheckHealthCheck(field+".health_check", a.GetHealthCheck())
}

func newGUID() string {
	t := strings.ToLower(rand.Text())
	return t[:8] + "-" + t[8:20]
}

// DefaultHost is the host of an app's default route: its name, lower case,
// with what DNS does not allow turned into '-'.
func DefaultHost(name string) string {
	b := []byte(strings.ToLower(name))
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			b[i] = '-'
		}
	}
	return strings.Trim(string(b), "-")
}

func (s *Service) CreateApp(ctx context.Context, req *basinv1.CreateAppRequest) (*basinv1.CreateAppResponse, error) {
	in := req.GetApp()
	if in == nil {
		return nil, fieldErr("app", "is required")
	}
	if err := checkName("app.name", in.GetName()); err != nil {
		return nil, err
	}
	a := proto.Clone(in).(*basinv1.App)
	if a.MemoryMb == 0 {
		a.MemoryMb = s.cfg.DefaultMemoryMB
	}
	if a.DiskMb == 0 {
		a.DiskMb = s.cfg.DefaultDiskMB
	}
	if a.Stack == "" {
		a.Stack = s.cfg.DefaultStack
	}
	if err := checkSettings("app", a); err != nil {
		return nil, err
	}
	now := s.now().UnixNano()
	a.Guid = newGUID()
	a.State = basinv1.AppState_APP_STATE_STOPPED
	a.ProcessGuids, a.Version, a.Revision = nil, 0, 0
	a.DropletDigest, a.PackageDigest, a.DetectedBuildpack, a.StagedCommand = "", "", "", ""
	a.CreatedAtUnixNano, a.UpdatedAtUnixNano, a.LastUploadedUnixNano = now, now, 0
	a, err := s.create(ctx, a)
	if err != nil {
		return nil, err
	}
	for _, r := range a.GetRoutes() {
		if err := s.bindRoute(ctx, r, a.GetName(), true); err != nil {
			return nil, err
		}
	}
	s.audit(ctx, a, "audit.app.create", fmt.Sprintf("instances: %d, memory: %d, disk: %d", a.GetInstances(), a.GetMemoryMb(), a.GetDiskMb()))
	return &basinv1.CreateAppResponse{App: a}, nil
}

func (s *Service) UpdateApp(ctx context.Context, req *basinv1.UpdateAppRequest) (*basinv1.UpdateAppResponse, error) {
	if err := checkName("name", req.GetName()); err != nil {
		return nil, err
	}
	var before []*basinv1.Route
	var changes []string
	a, err := s.mutate(ctx, req.GetName(), req.GetIfRevision(), func(a *basinv1.App) error {
		before = a.GetRoutes()
		changes = changes[:0]
		if req.Instances != nil {
			a.Instances = req.GetInstances()
			changes = append(changes, fmt.Sprintf("instances: %d", a.Instances))
		}
		if req.MemoryMb != nil {
			a.MemoryMb = req.GetMemoryMb()
			changes = append(changes, fmt.Sprintf("memory: %d", a.MemoryMb))
		}
		if req.DiskMb != nil {
			a.DiskMb = req.GetDiskMb()
			changes = append(changes, fmt.Sprintf("disk: %d", a.DiskMb))
		}
		if req.Stack != nil {
			a.Stack = req.GetStack()
			changes = append(changes, "stack: "+a.Stack)
		}
		if req.GetBuildpacks() != nil {
			a.Buildpacks = req.GetBuildpacks().GetValues()
			changes = append(changes, "buildpacks: "+strings.Join(a.Buildpacks, ", "))
		}
		if req.Command != nil {
			a.Command = req.GetCommand()
			changes = append(changes, "command")
		}
		if req.GetEnv() != nil {
			a.Env = req.GetEnv().GetValues()
			changes = append(changes, "env")
		}
		if req.GetHealthCheck() != nil {
			a.HealthCheck = req.GetHealthCheck()
			changes = append(changes, "health check")
		}
		if req.GetRoutes() != nil {
			a.Routes = req.GetRoutes().GetRoutes()
			changes = append(changes, "routes")
		}
		return checkSettings("", a)
	})
	if err != nil {
		return nil, err
	}
	if req.GetRoutes() != nil {
		if err := s.syncRoutes(ctx, a, before); err != nil {
			return nil, err
		}
	}
	if req.Instances != nil {
		if err := s.scaleLRP(ctx, a); err != nil {
			return nil, err
		}
	}
	s.audit(ctx, a, "audit.app.update", strings.Join(changes, ", "))
	return &basinv1.UpdateAppResponse{App: a}, nil
}

// syncRoutes sets the app's routes on its running LRPs and its bindings.
func (s *Service) syncRoutes(ctx context.Context, a *basinv1.App, before []*basinv1.Route) error {
	for _, pg := range a.GetProcessGuids() {
		_, err := s.lrps.UpdateDesiredLRP(ctx, &basinv1.UpdateDesiredLRPRequest{ProcessGuid: pg, Routes: &basinv1.RouteList{Routes: a.GetRoutes()}})
		if err != nil && !errors.Is(err, bbs.ErrNotFound) {
			return fmt.Errorf("route app %s: %w", a.GetName(), err)
		}
	}
	has := map[string]bool{}
	for _, r := range a.GetRoutes() {
		has[routeID(r)] = true
		if err := s.bindRoute(ctx, r, a.GetName(), true); err != nil {
			return err
		}
	}
	for _, r := range before {
		if !has[routeID(r)] {
			if err := s.bindRoute(ctx, r, a.GetName(), false); err != nil {
				return err
			}
		}
	}
	return nil
}

// scaleLRP sets the current LRP's instance count to the app's.
func (s *Service) scaleLRP(ctx context.Context, a *basinv1.App) error {
	if a.GetState() != basinv1.AppState_APP_STATE_STARTED || current(a) == "" {
		return nil
	}
	n := a.GetInstances()
	_, err := s.lrps.UpdateDesiredLRP(ctx, &basinv1.UpdateDesiredLRPRequest{ProcessGuid: current(a), Instances: &n})
	if errors.Is(err, bbs.ErrNotFound) {
		return s.desire(ctx, a, n)
	}
	return err
}

func (s *Service) GetApp(ctx context.Context, req *basinv1.GetAppRequest) (*basinv1.GetAppResponse, error) {
	if err := checkName("name", req.GetName()); err != nil {
		return nil, err
	}
	a, err := s.get(ctx, req.GetName())
	if err != nil {
		return nil, err
	}
	insts, err := s.instances(ctx, a)
	if err != nil {
		return nil, err
	}
	return &basinv1.GetAppResponse{App: a, Instances: insts}, nil
}

func (s *Service) ListApps(ctx context.Context, _ *basinv1.ListAppsRequest) (*basinv1.ListAppsResponse, error) {
	as, err := s.list(ctx)
	if err != nil {
		return nil, err
	}
	all, err := s.lrps.ListActualLRPs(ctx, &basinv1.ListActualLRPsRequest{Domain: Domain})
	if err != nil {
		return nil, err
	}
	running := map[string]int32{}
	for _, al := range all.GetActualLrps() {
		if al.GetState() == basinv1.ActualLRPState_ACTUAL_LRP_STATE_RUNNING {
			running[al.GetKey().GetProcessGuid()]++
		}
	}
	out := &basinv1.ListAppsResponse{}
	for _, a := range as {
		sum := &basinv1.AppSummary{App: a}
		for _, pg := range a.GetProcessGuids() {
			sum.Running += running[pg]
		}
		out.Apps = append(out.Apps, sum)
	}
	return out, nil
}

func (s *Service) DeleteApp(ctx context.Context, req *basinv1.DeleteAppRequest) (*basinv1.DeleteAppResponse, error) {
	if err := checkName("name", req.GetName()); err != nil {
		return nil, err
	}
	for range maxAttempts {
		a, err := s.get(ctx, req.GetName())
		if err != nil {
			return nil, err
		}
		if err := s.removeLRPs(ctx, a.GetProcessGuids()); err != nil {
			return nil, err
		}
		err = s.remove(ctx, a)
		if errors.Is(err, bbs.ErrConflict) {
			continue
		}
		if err != nil {
			return nil, err
		}
		for _, r := range a.GetRoutes() {
			if req.GetDeleteRoutes() {
				err = s.deleteRoute(ctx, r, a.GetName())
			} else {
				err = s.bindRoute(ctx, r, a.GetName(), false)
			}
			if err != nil {
				return nil, err
			}
		}
		return &basinv1.DeleteAppResponse{}, nil
	}
	return nil, fmt.Errorf("delete app %s: %w", req.GetName(), bbs.ErrConflict)
}

func (s *Service) SetPackage(ctx context.Context, req *basinv1.SetPackageRequest) (*basinv1.SetPackageResponse, error) {
	if err := checkName("name", req.GetName()); err != nil {
		return nil, err
	}
	if blobstore.CheckDigest(req.GetPackageDigest()) != nil {
		return nil, fieldErr("package_digest", "must be sha256:<64 hex digits>, got %q", req.GetPackageDigest())
	}
	a, err := s.mutate(ctx, req.GetName(), 0, func(a *basinv1.App) error {
		a.PackageDigest = req.GetPackageDigest()
		a.LastUploadedUnixNano = s.now().UnixNano()
		return nil
	})
	if err != nil {
		return nil, err
	}
	s.audit(ctx, a, "audit.app.upload-bits", req.GetPackageDigest())
	return &basinv1.SetPackageResponse{App: a}, nil
}

func (s *Service) SetDroplet(ctx context.Context, req *basinv1.SetDropletRequest) (*basinv1.SetDropletResponse, error) {
	if err := checkName("name", req.GetName()); err != nil {
		return nil, err
	}
	if blobstore.CheckDigest(req.GetDropletDigest()) != nil {
		return nil, fieldErr("droplet_digest", "must be sha256:<64 hex digits>, got %q", req.GetDropletDigest())
	}
	a, err := s.mutate(ctx, req.GetName(), 0, func(a *basinv1.App) error {
		a.DropletDigest = req.GetDropletDigest()
		a.DetectedBuildpack = req.GetDetectedBuildpack()
		a.StagedCommand = req.GetStagedCommand()
		if a.LastUploadedUnixNano == 0 {
			a.LastUploadedUnixNano = s.now().UnixNano()
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	s.audit(ctx, a, "audit.app.droplet.create", req.GetDropletDigest())
	return &basinv1.SetDropletResponse{App: a}, nil
}

func (s *Service) StartApp(ctx context.Context, req *basinv1.StartAppRequest) (*basinv1.StartAppResponse, error) {
	if err := checkName("name", req.GetName()); err != nil {
		return nil, err
	}
	a, err := s.get(ctx, req.GetName())
	if err != nil {
		return nil, err
	}
	if a.GetState() == basinv1.AppState_APP_STATE_STARTED && current(a) != "" {
		// Already started: make sure its LRP exists (an earlier start may
		// have stopped between the record and the LRP).
		if err := s.desire(ctx, a, a.GetInstances()); err != nil {
			return nil, err
		}
		return &basinv1.StartAppResponse{App: a}, nil
	}
	a, err = s.restart(ctx, req.GetName(), nil)
	if err != nil {
		return nil, err
	}
	s.audit(ctx, a, "audit.app.start", fmt.Sprintf("version %d", a.GetVersion()))
	return &basinv1.StartAppResponse{App: a}, nil
}

func (s *Service) StopApp(ctx context.Context, req *basinv1.StopAppRequest) (*basinv1.StopAppResponse, error) {
	if err := checkName("name", req.GetName()); err != nil {
		return nil, err
	}
	var old []string
	a, err := s.mutate(ctx, req.GetName(), 0, func(a *basinv1.App) error {
		old = a.GetProcessGuids()
		a.State = basinv1.AppState_APP_STATE_STOPPED
		a.ProcessGuids = nil
		return nil
	})
	if err != nil {
		return nil, err
	}
	if err := s.removeLRPs(ctx, old); err != nil {
		return nil, err
	}
	s.audit(ctx, a, "audit.app.stop", "")
	return &basinv1.StopAppResponse{App: a}, nil
}

func (s *Service) RestartApp(ctx context.Context, req *basinv1.RestartAppRequest) (*basinv1.RestartAppResponse, error) {
	if err := checkName("name", req.GetName()); err != nil {
		return nil, err
	}
	a, err := s.restart(ctx, req.GetName(), nil)
	if err != nil {
		return nil, err
	}
	s.audit(ctx, a, "audit.app.restart", fmt.Sprintf("version %d", a.GetVersion()))
	return &basinv1.RestartAppResponse{App: a}, nil
}

func (s *Service) RollApp(req *basinv1.RollAppRequest, stream basinv1.AppService_RollAppServer) error {
	if err := checkName("name", req.GetName()); err != nil {
		return err
	}
	timeout := time.Duration(req.GetTimeoutMs()) * time.Millisecond
	if req.GetTimeoutMs() < 0 || timeout > time.Hour {
		return fieldErr("timeout_ms", "must be between 0 and 3600000, got %d", req.GetTimeoutMs())
	}
	if timeout == 0 {
		timeout = 5 * time.Minute
	}
	ctx := stream.Context()
	a, err := s.roll(ctx, req.GetName(), timeout, stream.Send)
	if err != nil {
		return err
	}
	s.audit(ctx, a, "audit.app.deployment.finish", fmt.Sprintf("version %d", a.GetVersion()))
	return nil
}

func (s *Service) ScaleApp(ctx context.Context, req *basinv1.ScaleAppRequest) (*basinv1.ScaleAppResponse, error) {
	if err := checkName("name", req.GetName()); err != nil {
		return nil, err
	}
	var restart bool
	var desc []string
	a, err := s.mutate(ctx, req.GetName(), 0, func(a *basinv1.App) error {
		restart, desc = false, desc[:0]
		if req.Instances != nil {
			a.Instances = req.GetInstances()
			desc = append(desc, fmt.Sprintf("instances: %d", a.Instances))
		}
		if req.MemoryMb != nil && req.GetMemoryMb() != a.MemoryMb {
			a.MemoryMb, restart = req.GetMemoryMb(), true
			desc = append(desc, fmt.Sprintf("memory: %d", a.MemoryMb))
		}
		if req.DiskMb != nil && req.GetDiskMb() != a.DiskMb {
			a.DiskMb, restart = req.GetDiskMb(), true
			desc = append(desc, fmt.Sprintf("disk: %d", a.DiskMb))
		}
		return checkSettings("", a)
	})
	if err != nil {
		return nil, err
	}
	started := a.GetState() == basinv1.AppState_APP_STATE_STARTED
	switch {
	case restart && started:
		if a, err = s.restart(ctx, req.GetName(), nil); err != nil {
			return nil, err
		}
	default:
		if err := s.scaleLRP(ctx, a); err != nil {
			return nil, err
		}
	}
	s.audit(ctx, a, "audit.app.scale", strings.Join(desc, ", "))
	return &basinv1.ScaleAppResponse{App: a, Restarted: restart && started}, nil
}

func (s *Service) RestartAppInstance(ctx context.Context, req *basinv1.RestartAppInstanceRequest) (*basinv1.RestartAppInstanceResponse, error) {
	if err := checkName("name", req.GetName()); err != nil {
		return nil, err
	}
	a, err := s.get(ctx, req.GetName())
	if err != nil {
		return nil, err
	}
	if req.GetIndex() < 0 || req.GetIndex() >= a.GetInstances() || current(a) == "" {
		return nil, fieldErr("index", "app %s has no instance %d (it has %d running as version %d)", a.GetName(), req.GetIndex(), a.GetInstances(), a.GetVersion())
	}
	pg := current(a)
	key := &basinv1.ActualLRPKey{ProcessGuid: pg, Index: req.GetIndex(), Domain: Domain}
	if _, err := s.lrps.RetireActualLRP(ctx, &basinv1.RetireActualLRPRequest{Key: key}); err != nil && !errors.Is(err, bbs.ErrNotFound) {
		return nil, err
	}
	// The slot comes back at once as UNCLAIMED, rather than at the
	// converger's next pass.
	if _, err := s.lrps.CreateMissingActualLRPs(ctx, &basinv1.CreateMissingActualLRPsRequest{ProcessGuid: pg}); err != nil {
		return nil, err
	}
	s.audit(ctx, a, "audit.app.restart-instance", fmt.Sprintf("index: %d", req.GetIndex()))
	return &basinv1.RestartAppInstanceResponse{}, nil
}

func (s *Service) UpdateEnv(ctx context.Context, req *basinv1.UpdateEnvRequest) (*basinv1.UpdateEnvResponse, error) {
	if err := checkName("name", req.GetName()); err != nil {
		return nil, err
	}
	for k := range req.GetSet() {
		if !envNameRE.MatchString(k) {
			return nil, fieldErr("set", "variable names must be a letter or '_' followed by letters, digits or '_', got %q", k)
		}
	}
	a, err := s.mutate(ctx, req.GetName(), 0, func(a *basinv1.App) error {
		if a.Env == nil {
			a.Env = map[string]string{}
		}
		for k, v := range req.GetSet() {
			a.Env[k] = v
		}
		for _, k := range req.GetUnset() {
			delete(a.Env, k)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	var names []string
	for k := range req.GetSet() {
		names = append(names, "set "+k)
	}
	for _, k := range req.GetUnset() {
		names = append(names, "unset "+k)
	}
	slices.Sort(names)
	s.audit(ctx, a, "audit.app.update", "env: "+strings.Join(names, ", "))
	return &basinv1.UpdateEnvResponse{App: a}, nil
}

func (s *Service) changeRoute(ctx context.Context, name string, r *basinv1.Route, add bool) (*basinv1.App, error) {
	if err := checkName("name", name); err != nil {
		return nil, err
	}
	if err := bbs.CheckRoute("route", r); err != nil {
		return nil, err
	}
	r = &basinv1.Route{Host: r.GetHost(), Path: r.GetPath()}
	var before []*basinv1.Route
	a, err := s.mutate(ctx, name, 0, func(a *basinv1.App) error {
		before = a.GetRoutes()
		a.Routes = slices.DeleteFunc(slices.Clone(a.Routes), func(x *basinv1.Route) bool { return routeID(x) == routeID(r) })
		if add {
			a.Routes = append(a.Routes, r)
		} else if len(a.Routes) == len(before) {
			return fmt.Errorf("route %s is not mapped to app %s: %w", RouteString(r), name, bbs.ErrNotFound)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if err := s.syncRoutes(ctx, a, before); err != nil {
		return nil, err
	}
	verb := "map-route"
	if !add {
		verb = "unmap-route"
	}
	s.audit(ctx, a, "audit.app."+verb, RouteString(r))
	return a, nil
}

func (s *Service) MapRoute(ctx context.Context, req *basinv1.MapRouteRequest) (*basinv1.MapRouteResponse, error) {
	a, err := s.changeRoute(ctx, req.GetName(), req.GetRoute(), true)
	if err != nil {
		return nil, err
	}
	return &basinv1.MapRouteResponse{App: a}, nil
}

func (s *Service) UnmapRoute(ctx context.Context, req *basinv1.UnmapRouteRequest) (*basinv1.UnmapRouteResponse, error) {
	a, err := s.changeRoute(ctx, req.GetName(), req.GetRoute(), false)
	if err != nil {
		return nil, err
	}
	return &basinv1.UnmapRouteResponse{App: a}, nil
}

func (s *Service) DeleteRoute(ctx context.Context, req *basinv1.DeleteRouteRequest) (*basinv1.DeleteRouteResponse, error) {
	r := req.GetRoute()
	if err := bbs.CheckRoute("route", r); err != nil {
		return nil, err
	}
	resp, err := s.etcd.Get(ctx, s.keys.route(r))
	if err != nil {
		return nil, fmt.Errorf("read route %s: %w", RouteString(r), err)
	}
	if len(resp.Kvs) == 0 {
		return nil, fmt.Errorf("route %s: %w", RouteString(r), bbs.ErrNotFound)
	}
	b := &basinv1.RouteBinding{}
	if err := proto.Unmarshal(resp.Kvs[0].Value, b); err != nil {
		return nil, fmt.Errorf("decode route %s: %w", RouteString(r), err)
	}
	for _, app := range b.GetApps() {
		// An app deleted or unmapped meanwhile has nothing left to unmap.
		if _, err := s.changeRoute(ctx, app, r, false); err != nil && !errors.Is(err, bbs.ErrNotFound) {
			return nil, err
		}
	}
	// Removed unless an app mapped it again meanwhile.
	if err := s.deleteRoute(ctx, r, ""); err != nil {
		return nil, fmt.Errorf("delete route %s: %w", RouteString(r), err)
	}
	return &basinv1.DeleteRouteResponse{Apps: b.GetApps()}, nil
}

func (s *Service) ListRoutes(ctx context.Context, _ *basinv1.ListRoutesRequest) (*basinv1.ListRoutesResponse, error) {
	rs, err := s.routes(ctx)
	if err != nil {
		return nil, err
	}
	return &basinv1.ListRoutesResponse{Routes: rs}, nil
}

func (s *Service) ListAppEvents(ctx context.Context, req *basinv1.ListAppEventsRequest) (*basinv1.ListAppEventsResponse, error) {
	if err := checkName("name", req.GetName()); err != nil {
		return nil, err
	}
	a, err := s.get(ctx, req.GetName())
	if err != nil {
		return nil, err
	}
	evs, err := s.events(ctx, a.GetGuid())
	if err != nil {
		return nil, err
	}
	return &basinv1.ListAppEventsResponse{Events: evs}, nil
}

var taskNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$`)

// taskPrefix starts the guid of every task of an app.
func taskPrefix(appGUID string) string { return appGUID + "-task-" }

func (s *Service) RunTask(ctx context.Context, req *basinv1.RunTaskRequest) (*basinv1.RunTaskResponse, error) {
	if err := checkName("name", req.GetName()); err != nil {
		return nil, err
	}
	if req.GetCommand() == "" {
		return nil, fieldErr("command", "is required")
	}
	if req.GetTaskName() != "" && !taskNameRE.MatchString(req.GetTaskName()) {
		return nil, fieldErr("task_name", "must be 1-40 letters, digits, '.', '_' or '-', got %q", req.GetTaskName())
	}
	a, err := s.get(ctx, req.GetName())
	if err != nil {
		return nil, err
	}
	if a.GetDropletDigest() == "" {
		return nil, fmt.Errorf("app %s has no droplet to run a task in: push it first: %w", a.GetName(), bbs.ErrTransition)
	}
	name := req.GetTaskName()
	if name == "" {
		name = strings.ToLower(rand.Text()[:8])
	}
	guid := taskPrefix(a.GetGuid()) + name + "-" + strings.ToLower(rand.Text()[:6])
	mem, disk := req.GetMemoryMb(), req.GetDiskMb()
	if mem == 0 {
		mem = a.GetMemoryMb()
	}
	if disk == 0 {
		disk = a.GetDiskMb()
	}
	env := desireRequest(a, "", 0).GetRun().GetEnv()
	t, err := s.lrps.DesireTask(ctx, &basinv1.DesireTaskRequest{TaskGuid: guid, Domain: TaskDomain, Definition: &basinv1.TaskDefinition{
		Stack: a.GetStack(), Command: req.GetCommand(), Env: env,
		Resources: &basinv1.ResourceLimits{MemoryMb: mem, DiskMb: disk, Pids: 1024},
		Droplet:   &basinv1.DropletRef{Digest: a.GetDropletDigest()},
	}})
	if err != nil {
		return nil, err
	}
	s.audit(ctx, a, "audit.app.task.create", fmt.Sprintf("task %s: %s", name, req.GetCommand()))
	return &basinv1.RunTaskResponse{Task: t.GetTask(), TaskName: name}, nil
}

func (s *Service) ListAppTasks(ctx context.Context, req *basinv1.ListAppTasksRequest) (*basinv1.ListAppTasksResponse, error) {
	if err := checkName("name", req.GetName()); err != nil {
		return nil, err
	}
	a, err := s.get(ctx, req.GetName())
	if err != nil {
		return nil, err
	}
	// The BBS first: a task is kept in the history before it is resolved
	// there, so one gone from the BBS's answer is in the later history
	// read; one in both shows once, from the history.
	ts, err := s.lrps.ListTasks(ctx, &basinv1.ListTasksRequest{Domain: TaskDomain})
	if err != nil {
		return nil, err
	}
	kept, err := s.taskHistory(ctx, a.GetGuid())
	if err != nil {
		return nil, err
	}
	out := &basinv1.ListAppTasksResponse{}
	p := taskPrefix(a.GetGuid())
	all := kept
	for _, t := range ts.GetTasks() {
		if !slices.ContainsFunc(kept, func(k *basinv1.Task) bool { return k.GetTaskGuid() == t.GetTaskGuid() }) {
			all = append(all, t)
		}
	}
	for _, t := range all {
		rest, ok := strings.CutPrefix(t.GetTaskGuid(), p)
		if !ok {
			continue
		}
		name := rest
		if i := strings.LastIndex(rest, "-"); i > 0 {
			name = rest[:i]
		}
		out.Tasks = append(out.Tasks, &basinv1.AppTask{TaskName: name, Task: t})
	}
	slices.SortFunc(out.Tasks, func(x, y *basinv1.AppTask) int {
		return cmp.Compare(x.GetTask().GetCreatedAtUnixNano(), y.GetTask().GetCreatedAtUnixNano())
	})
	return out, nil
}

// Serve builds the app layer over a BBS server and registers it there, so it
// shares the server's port, authentication and error mapping. The caller
// runs the returned Service's Run beside the server's.
func Serve(srv *bbs.Server, cli *clientv3.Client, cfg Config) *Service {
	if cfg.Prefix == "" {
		cfg.Prefix = srv.Store().Keys().Prefix
	}
	s := New(cli, srv.API(), srv.Store(), cfg)
	srv.RegisterService(&basinv1.AppService_ServiceDesc, s)
	return s
}

func (s *Service) GetInfo(context.Context, *basinv1.GetInfoRequest) (*basinv1.GetInfoResponse, error) {
	return &basinv1.GetInfoResponse{Domain: s.cfg.Domain, DefaultStack: s.cfg.DefaultStack, DefaultMemoryMb: s.cfg.DefaultMemoryMB, DefaultDiskMb: s.cfg.DefaultDiskMB}, nil
}
