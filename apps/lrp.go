package apps

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/basinpaas/basin/bbs"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"
)

// Domain is the BBS domain of apps' LRPs.
const Domain = "apps"

// TaskDomain is the BBS domain of apps' one-off tasks.
const TaskDomain = "app-tasks"

// AppPort is the port apps listen on ($PORT).
const AppPort = 8080

// processGUID names version v of an app's LRP.
func processGUID(appGUID string, v int64) string {
	return appGUID + "-v" + strconv.FormatInt(v, 10)
}

// appGUIDOf is the app guid of an app LRP's process guid.
func appGUIDOf(processGUID string) (string, bool) {
	i := strings.LastIndex(processGUID, "-v")
	if i <= 0 {
		return "", false
	}
	if _, err := strconv.ParseInt(processGUID[i+2:], 10, 64); err != nil {
		return "", false
	}
	return processGUID[:i], true
}

func current(a *basinv1.App) string {
	if n := len(a.GetProcessGuids()); n > 0 {
		return a.GetProcessGuids()[n-1]
	}
	return ""
}

// desireRequest is the LRP of one version of an app.
func desireRequest(a *basinv1.App, pg string, instances int32) *basinv1.DesireLRPRequest {
	var env []*basinv1.EnvVar
	for _, k := range slices.Sorted(maps.Keys(a.GetEnv())) {
		env = append(env, &basinv1.EnvVar{Name: k, Value: a.GetEnv()[k]})
	}
	return &basinv1.DesireLRPRequest{
		Schedule: &basinv1.DesiredLRPSchedule{
			ProcessGuid: pg,
			Domain:      Domain,
			Instances:   instances,
			Stack:       a.GetStack(),
			Resources:   &basinv1.ResourceLimits{MemoryMb: a.GetMemoryMb(), DiskMb: a.GetDiskMb(), Pids: 1024},
			Routes:      a.GetRoutes(),
			Annotation:  a.GetName(),
		},
		Run: &basinv1.DesiredLRPRun{
			// Empty runs the droplet's staged start command.
			StartCommand: a.GetCommand(),
			Env:          env,
			Droplet:      &basinv1.DropletRef{Digest: a.GetDropletDigest()},
			HealthCheck:  a.GetHealthCheck(),
			Ports:        []uint32{AppPort},
			AppName:      a.GetName(),
			AppGuid:      a.GetGuid(),
			AppVersion:   pg,
		},
	}
}

// newVersion bumps the app's version and makes it the only LRP the record
// names (keep keeps the older ones listed, for a rolling deploy).
func (s *Service) newVersion(ctx context.Context, name string, keep bool, check func(a *basinv1.App) error) (*basinv1.App, []string, error) {
	var old []string
	a, err := s.mutate(ctx, name, 0, func(a *basinv1.App) error {
		if a.GetDropletDigest() == "" {
			return fmt.Errorf("app %s has no droplet: push it first: %w", name, bbs.ErrTransition)
		}
		if check != nil {
			if err := check(a); err != nil {
				return err
			}
		}
		old = slices.Clone(a.GetProcessGuids())
		a.Version++
		a.State = basinv1.AppState_APP_STATE_STARTED
		pg := processGUID(a.GetGuid(), a.GetVersion())
		if keep {
			a.ProcessGuids = append(a.ProcessGuids, pg)
		} else {
			a.ProcessGuids = []string{pg}
		}
		return nil
	})
	return a, old, err
}

// desire desires the current LRP of a (AlreadyExists means an earlier try did).
func (s *Service) desire(ctx context.Context, a *basinv1.App, instances int32) error {
	_, err := s.lrps.DesireLRP(ctx, desireRequest(a, current(a), instances))
	if err != nil && !errors.Is(err, bbs.ErrAlreadyExists) {
		return fmt.Errorf("desire LRP of app %s: %w", a.GetName(), err)
	}
	return nil
}

// removeLRPs removes the given LRPs; ones already gone are fine.
func (s *Service) removeLRPs(ctx context.Context, pgs []string) error {
	var errs []error
	for _, pg := range pgs {
		if _, err := s.lrps.RemoveDesiredLRP(ctx, &basinv1.RemoveDesiredLRPRequest{ProcessGuid: pg}); err != nil && !errors.Is(err, bbs.ErrNotFound) {
			errs = append(errs, fmt.Errorf("remove LRP %s: %w", pg, err))
		}
	}
	return errors.Join(errs...)
}

// restart replaces whatever runs by a new version with the app's settings.
func (s *Service) restart(ctx context.Context, name string, check func(a *basinv1.App) error) (*basinv1.App, error) {
	a, old, err := s.newVersion(ctx, name, false, check)
	if err != nil {
		return nil, err
	}
	if err := s.removeLRPs(ctx, old); err != nil {
		return nil, err
	}
	return a, s.desire(ctx, a, a.GetInstances())
}

// instances lists the instances of every LRP of the app.
func (s *Service) instances(ctx context.Context, a *basinv1.App) ([]*basinv1.AppInstance, error) {
	var out []*basinv1.AppInstance
	cur := current(a)
	for _, pg := range a.GetProcessGuids() {
		resp, err := s.lrps.ListActualLRPs(ctx, &basinv1.ListActualLRPsRequest{ProcessGuid: pg})
		if err != nil {
			return nil, fmt.Errorf("list instances of %s: %w", pg, err)
		}
		routed, err := s.routed(ctx, a.GetRoutes(), pg)
		if err != nil {
			return nil, err
		}
		for _, al := range resp.GetActualLrps() {
			idx := al.GetKey().GetIndex()
			running := al.GetState() == basinv1.ActualLRPState_ACTUAL_LRP_STATE_RUNNING
			out = append(out, &basinv1.AppInstance{
				ProcessGuid:    pg,
				Index:          idx,
				State:          al.GetState(),
				SinceUnixNano:  al.GetSinceUnixNano(),
				CellId:         al.GetInstanceKey().GetCellId(),
				CrashCount:     al.GetCrashCount(),
				CrashReason:    al.GetCrashReason(),
				PlacementError: al.GetPlacementError(),
				Routable:       running && routed(routedKey{idx, al.GetInstanceKey().GetInstanceGuid()}),
				Current:        pg == cur,
				Address:        hostPort(al.GetNetInfo()),
			})
		}
	}
	slices.SortFunc(out, func(x, y *basinv1.AppInstance) int {
		if x.Current != y.Current {
			if x.Current {
				return 1
			}
			return -1
		}
		return cmp.Compare(x.Index, y.Index)
	})
	return out, nil
}

func hostPort(n *basinv1.ActualLRPNetInfo) string {
	if n == nil || len(n.GetPorts()) == 0 {
		return ""
	}
	return fmt.Sprintf("%s:%d", n.GetAddress(), n.GetPorts()[0].GetHostPort())
}

type routedKey struct {
	index    int32
	instance string
}

// routed says which instances of pg have an endpoint under every route (the
// cells write them under routes/<host>/<pg>/<index> once an instance is
// healthy, and delete them before stopping it). With no routes every
// instance counts as routed.
func (s *Service) routed(ctx context.Context, routes []*basinv1.Route, pg string) (func(routedKey) bool, error) {
	if len(routes) == 0 {
		return func(routedKey) bool { return true }, nil
	}
	counts := map[routedKey]int{}
	for _, r := range routes {
		p := s.bbsKeys.Route(r.GetHost(), r.GetPath(), pg, 0)
		p = p[:len(p)-1] // routes/<seg>/<pg>/
		resp, err := s.etcd.Get(ctx, p, clientv3.WithPrefix())
		if err != nil {
			return nil, fmt.Errorf("read routes of %s: %w", pg, err)
		}
		for _, kv := range resp.Kvs {
			ep := &basinv1.RouteEndpoint{}
			if proto.Unmarshal(kv.Value, ep) != nil {
				continue
			}
			counts[routedKey{ep.GetIndex(), ep.GetInstanceGuid()}]++
		}
	}
	return func(k routedKey) bool { return counts[k] >= len(routes) }, nil
}

// roll runs a rolling deploy of a new version of the app, reporting progress.
func (s *Service) roll(ctx context.Context, name string, timeout time.Duration, progress func(*basinv1.RollAppResponse) error) (*basinv1.App, error) {
	a, old, err := s.newVersion(ctx, name, true, nil)
	if err != nil {
		return nil, err
	}
	// A deploy cut short earlier may have left several LRPs: the oldest
	// serves while the new one starts; the others go at once.
	var prev string
	if len(old) > 0 {
		prev = old[len(old)-1]
		if err := s.removeLRPs(ctx, old[:len(old)-1]); err != nil {
			return nil, err
		}
	}
	newPG := current(a)
	n := a.GetInstances()
	oldCount := int32(0)
	if prev != "" {
		d, err := s.lrps.GetDesiredLRP(ctx, &basinv1.GetDesiredLRPRequest{ProcessGuid: prev})
		switch {
		case errors.Is(err, bbs.ErrNotFound):
			prev = ""
		case err != nil:
			return nil, err
		default:
			oldCount = d.GetDesiredLrp().GetSchedule().GetInstances()
		}
	}
	if err := s.desire(ctx, a, n); err != nil {
		return nil, err
	}
	s.audit(ctx, a, "audit.app.deployment.create", fmt.Sprintf("rolling deploy to version %d", a.GetVersion()))

	fail := func(cause error) (*basinv1.App, error) {
		// Put the old version back as it was, and drop the new one.
		// A step that fails is logged, not returned: the caller must see
		// why the deploy failed.
		bg := context.WithoutCancel(ctx)
		log := s.log.With("app", name, "process_guid", newPG)
		if prev != "" {
			if _, err := s.lrps.UpdateDesiredLRP(bg, &basinv1.UpdateDesiredLRPRequest{ProcessGuid: prev, Instances: &oldCount}); err != nil {
				log.Warn("rollback: scale the old version back up", "old_process_guid", prev, "err", err)
			}
		}
		if err := s.removeLRPs(bg, []string{newPG}); err != nil {
			log.Warn("rollback: remove the new version", "err", err)
		}
		if _, err := s.mutate(bg, name, 0, func(x *basinv1.App) error {
			x.ProcessGuids = slices.DeleteFunc(x.ProcessGuids, func(pg string) bool { return pg == newPG })
			return nil
		}); err != nil {
			log.Warn("rollback: drop the new version from the app", "err", err)
		}
		s.audit(bg, a, "audit.app.deployment.cancel", cause.Error())
		return nil, cause
	}

	deadline := s.now().Add(timeout)
	// An instance counts once routed for settle: the router learns of a
	// route through its watch, a moment after the cell wrote it.
	routedSince := map[int32]time.Time{}
	left := oldCount
	for {
		list, err := s.lrps.ListActualLRPs(ctx, &basinv1.ListActualLRPsRequest{ProcessGuid: newPG})
		if err != nil {
			return fail(fmt.Errorf("list new instances: %w", err))
		}
		routed, err := s.routed(ctx, a.GetRoutes(), newPG)
		if err != nil {
			return fail(err)
		}
		ready := int32(0)
		for _, al := range list.GetActualLrps() {
			idx := al.GetKey().GetIndex()
			if al.GetState() == basinv1.ActualLRPState_ACTUAL_LRP_STATE_CRASHED {
				return fail(fmt.Errorf("instance %d of the new version crashed: %s: %w", idx, al.GetCrashReason(), bbs.ErrTransition))
			}
			ok := al.GetState() == basinv1.ActualLRPState_ACTUAL_LRP_STATE_RUNNING &&
				routed(routedKey{idx, al.GetInstanceKey().GetInstanceGuid()})
			if !ok {
				delete(routedSince, idx)
				continue
			}
			if _, seen := routedSince[idx]; !seen {
				routedSince[idx] = s.now()
			}
			if s.now().Sub(routedSince[idx]) >= s.cfg.RouteSettle {
				ready++
			}
		}
		if prev != "" {
			if want := max(0, min(oldCount, n-ready)); want < left {
				if _, err := s.lrps.UpdateDesiredLRP(ctx, &basinv1.UpdateDesiredLRPRequest{ProcessGuid: prev, Instances: &want}); err != nil && !errors.Is(err, bbs.ErrNotFound) {
					return fail(fmt.Errorf("scale old version down: %w", err))
				}
				left = want
			}
		}
		done := ready >= n
		if done {
			if prev != "" {
				if err := s.removeLRPs(ctx, []string{prev}); err != nil {
					return nil, err
				}
				left = 0
			}
			a, err = s.mutate(ctx, name, 0, func(x *basinv1.App) error {
				x.ProcessGuids = slices.DeleteFunc(x.ProcessGuids, func(pg string) bool { return pg != newPG })
				return nil
			})
			if err != nil {
				return nil, err
			}
		}
		if err := progress(&basinv1.RollAppResponse{OldProcessGuid: prev, NewProcessGuid: newPG, Instances: n, NewRoutable: ready, OldInstances: left, Done: done, App: a}); err != nil {
			return nil, err
		}
		if done {
			return a, nil
		}
		if s.now().After(deadline) {
			return fail(fmt.Errorf("the new version had %d of %d instances running and routed after %s: %w", ready, n, timeout, context.DeadlineExceeded))
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(s.cfg.PollInterval):
		}
	}
}

// reconcile repairs what a BBS dying between an app's record and its LRPs
// leaves: a started app whose current LRP is missing gets it, and an LRP of
// the apps domain that no app names is removed once older than
// OrphanGrace. LRPs are listed before apps: an app's record names a new LRP
// before it is desired, so every LRP listed is named by the apps read after.
func (s *Service) reconcile(ctx context.Context) error {
	scheds, err := s.listSchedules(ctx)
	if err != nil {
		return err
	}
	as, err := s.list(ctx)
	if err != nil {
		return err
	}
	named := map[string]bool{}
	var errs []error
	for _, a := range as {
		for _, pg := range a.GetProcessGuids() {
			named[pg] = true
		}
		pg := current(a)
		if a.GetState() != basinv1.AppState_APP_STATE_STARTED || pg == "" || a.GetDropletDigest() == "" {
			continue
		}
		if _, ok := scheds[pg]; !ok && len(a.GetProcessGuids()) == 1 {
			s.log.Warn("app's LRP missing; desiring it again", "app", a.GetName(), "process_guid", pg)
			if err := s.desire(ctx, a, a.GetInstances()); err != nil {
				errs = append(errs, err)
			}
		}
	}
	now := s.now()
	for pg, sc := range scheds {
		if named[pg] || now.Sub(time.Unix(0, sc.GetCreatedAtUnixNano())) < s.cfg.OrphanGrace {
			continue
		}
		s.log.Warn("removing an LRP no app names", "process_guid", pg)
		if err := s.removeLRPs(ctx, []string{pg}); err != nil {
			errs = append(errs, err)
		}
	}
	// Completions the event stream missed (a resubscription) are kept and
	// resolved here, before the converger's timeout deletes them.
	ts, err := s.lrps.ListTasks(ctx, &basinv1.ListTasksRequest{Domain: TaskDomain})
	if err != nil {
		errs = append(errs, fmt.Errorf("list app tasks: %w", err))
	}
	for _, t := range ts.GetTasks() {
		if t.GetState() == basinv1.TaskState_TASK_STATE_COMPLETED {
			s.keepCompleted(ctx, t)
		}
	}
	return errors.Join(errs...)
}

func (s *Service) listSchedules(ctx context.Context) (map[string]*basinv1.DesiredLRPSchedule, error) {
	resp, err := s.lrps.ListDesiredLRPSchedules(ctx, &basinv1.ListDesiredLRPSchedulesRequest{Domain: Domain})
	if err != nil {
		return nil, fmt.Errorf("list app LRPs: %w", err)
	}
	out := map[string]*basinv1.DesiredLRPSchedule{}
	for _, sc := range resp.GetSchedules() {
		out[sc.GetProcessGuid()] = sc
	}
	return out, nil
}
