package bbs

import (
	"context"
	"slices"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// API serves the BBSService over gRPC: validate, call the store, return.
// Errors become status codes in the interceptors (status.go).
type API struct {
	basinv1.UnimplementedBBSServiceServer
	store  *Store
	limits Limits
}

var _ basinv1.BBSServiceServer = (*API)(nil)

// NewAPI returns the gRPC service over store.
func NewAPI(store *Store, limits Limits) *API {
	return &API{store: store, limits: limits.withDefaults()}
}

func (a *API) DesireLRP(ctx context.Context, req *basinv1.DesireLRPRequest) (*basinv1.DesireLRPResponse, error) {
	if err := a.limits.checkSchedule(req.GetSchedule()); err != nil {
		return nil, err
	}
	if err := a.limits.checkRun(req.GetRun()); err != nil {
		return nil, err
	}
	d, err := a.store.DesireLRP(ctx, req.GetSchedule(), req.GetRun())
	if err != nil {
		return nil, err
	}
	return &basinv1.DesireLRPResponse{DesiredLrp: d}, nil
}

func (a *API) UpdateDesiredLRP(ctx context.Context, req *basinv1.UpdateDesiredLRPRequest) (*basinv1.UpdateDesiredLRPResponse, error) {
	if err := checkGUID("process_guid", req.GetProcessGuid()); err != nil {
		return nil, err
	}
	u := DesiredUpdate{IfRevision: req.GetIfRevision(), Droplet: req.GetDroplet()}
	if req.Instances != nil {
		if err := a.limits.checkInstances("instances", req.GetInstances()); err != nil {
			return nil, err
		}
		n := req.GetInstances()
		u.Instances = &n
	}
	if req.GetRoutes() != nil {
		if err := a.limits.checkRoutes("routes.routes", req.GetRoutes().GetRoutes()); err != nil {
			return nil, err
		}
		u.Routes, u.RoutesSet = req.GetRoutes().GetRoutes(), true
	}
	if req.GetEnv() != nil {
		if err := a.limits.checkEnv("env.env", req.GetEnv().GetEnv()); err != nil {
			return nil, err
		}
		u.Env, u.EnvSet = req.GetEnv().GetEnv(), true
	}
	if err := checkDroplet("droplet", req.GetDroplet()); err != nil {
		return nil, err
	}
	if req.Annotation != nil {
		if len(req.GetAnnotation()) > a.limits.MaxAnnotation {
			return nil, fieldErr("annotation", "must be at most %d bytes, got %d", a.limits.MaxAnnotation, len(req.GetAnnotation()))
		}
		s := req.GetAnnotation()
		u.Annotation = &s
	}
	if req.StartCommand != nil {
		if len(req.GetStartCommand()) > a.limits.MaxCommand {
			return nil, fieldErr("start_command", "must be at most %d bytes, got %d", a.limits.MaxCommand, len(req.GetStartCommand()))
		}
		s := req.GetStartCommand()
		u.StartCommand = &s
	}
	if req.GetIfRevision() < 0 {
		return nil, fieldErr("if_revision", "must not be negative, got %d", req.GetIfRevision())
	}
	d, err := a.store.UpdateDesiredLRP(ctx, req.GetProcessGuid(), u)
	if err != nil {
		return nil, err
	}
	return &basinv1.UpdateDesiredLRPResponse{DesiredLrp: d}, nil
}

func (a *API) RemoveDesiredLRP(ctx context.Context, req *basinv1.RemoveDesiredLRPRequest) (*basinv1.RemoveDesiredLRPResponse, error) {
	if err := checkGUID("process_guid", req.GetProcessGuid()); err != nil {
		return nil, err
	}
	return &basinv1.RemoveDesiredLRPResponse{}, a.store.RemoveDesiredLRP(ctx, req.GetProcessGuid())
}

func (a *API) GetDesiredLRP(ctx context.Context, req *basinv1.GetDesiredLRPRequest) (*basinv1.GetDesiredLRPResponse, error) {
	if err := checkGUID("process_guid", req.GetProcessGuid()); err != nil {
		return nil, err
	}
	d, err := a.store.GetDesiredLRP(ctx, req.GetProcessGuid())
	if err != nil {
		return nil, err
	}
	return &basinv1.GetDesiredLRPResponse{DesiredLrp: d}, nil
}

func (a *API) ListDesiredLRPs(ctx context.Context, req *basinv1.ListDesiredLRPsRequest) (*basinv1.ListDesiredLRPsResponse, error) {
	if err := checkOptionalGUID("domain", req.GetDomain()); err != nil {
		return nil, err
	}
	if req.GetMinRevision() < 0 {
		return nil, fieldErr("min_revision", "must not be negative, got %d", req.GetMinRevision())
	}
	if guids := req.GetProcessGuids(); len(guids) > 0 {
		if len(guids) > maxBatch {
			return nil, fieldErr("process_guids", "must list at most %d guids, got %d", maxBatch, len(guids))
		}
		for i, g := range guids {
			if err := checkGUID(indexed("process_guids", i), g); err != nil {
				return nil, err
			}
		}
		ds, err := a.store.GetDesiredLRPsAt(ctx, guids, req.GetMinRevision())
		if err != nil {
			return nil, err
		}
		if d := req.GetDomain(); d != "" {
			ds = slices.DeleteFunc(ds, func(x *basinv1.DesiredLRP) bool { return x.GetSchedule().GetDomain() != d })
		}
		return &basinv1.ListDesiredLRPsResponse{DesiredLrps: ds}, nil
	}
	ds, err := a.store.ListDesiredLRPs(ctx, req.GetDomain())
	if err != nil {
		return nil, err
	}
	return &basinv1.ListDesiredLRPsResponse{DesiredLrps: ds}, nil
}

func (a *API) ListDesiredLRPSchedules(ctx context.Context, req *basinv1.ListDesiredLRPSchedulesRequest) (*basinv1.ListDesiredLRPSchedulesResponse, error) {
	if err := checkOptionalGUID("domain", req.GetDomain()); err != nil {
		return nil, err
	}
	ss, err := a.store.ListDesiredLRPSchedules(ctx, req.GetDomain())
	if err != nil {
		return nil, err
	}
	return &basinv1.ListDesiredLRPSchedulesResponse{Schedules: ss}, nil
}

func (a *API) ListActualLRPs(ctx context.Context, req *basinv1.ListActualLRPsRequest) (*basinv1.ListActualLRPsResponse, error) {
	for _, c := range []struct{ field, v string }{{"process_guid", req.GetProcessGuid()}, {"cell_id", req.GetCellId()}, {"domain", req.GetDomain()}} {
		if err := checkOptionalGUID(c.field, c.v); err != nil {
			return nil, err
		}
	}
	as, err := a.store.ListActualLRPs(ctx, ActualFilter{ProcessGUID: req.GetProcessGuid(), CellID: req.GetCellId(), Domain: req.GetDomain()})
	if err != nil {
		return nil, err
	}
	return &basinv1.ListActualLRPsResponse{ActualLrps: as}, nil
}

func (a *API) GetActualLRP(ctx context.Context, req *basinv1.GetActualLRPRequest) (*basinv1.GetActualLRPResponse, error) {
	if err := a.limits.checkActualKey("", &basinv1.ActualLRPKey{ProcessGuid: req.GetProcessGuid(), Index: req.GetIndex()}); err != nil {
		return nil, err
	}
	al, err := a.store.GetActualLRP(ctx, req.GetProcessGuid(), req.GetIndex())
	if err != nil {
		return nil, err
	}
	return &basinv1.GetActualLRPResponse{ActualLrp: al}, nil
}

// checkCellRequest validates the key, instance key and fence of a cell's call.
func (a *API) checkCellRequest(key *basinv1.ActualLRPKey, ik *basinv1.ActualLRPInstanceKey, fence *basinv1.Fence) error {
	if err := a.limits.checkActualKey("key", key); err != nil {
		return err
	}
	if err := checkInstanceKey("instance_key", ik); err != nil {
		return err
	}
	return a.store.checkCellFence("fence", ik.GetCellId(), fence)
}

// checkClaim, checkStart and checkCrash validate a cell's transition for its
// single call and for ApplyActualLRPTransitions alike.
func (a *API) checkClaim(req *basinv1.ClaimActualLRPRequest) error {
	return a.checkCellRequest(req.GetKey(), req.GetInstanceKey(), req.GetFence())
}

func (a *API) checkStart(req *basinv1.StartActualLRPRequest) error {
	if err := a.checkCellRequest(req.GetKey(), req.GetInstanceKey(), req.GetFence()); err != nil {
		return err
	}
	if req.GetNetInfo() == nil {
		return fieldErr("net_info", "is required")
	}
	for i, p := range req.GetNetInfo().GetPorts() {
		if p.GetContainerPort() > 65535 || p.GetHostPort() > 65535 {
			return fieldErr(indexed("net_info.ports", i), "ports must be at most 65535")
		}
	}
	return nil
}

func (a *API) checkCrash(req *basinv1.CrashActualLRPRequest) error {
	if err := a.checkCellRequest(req.GetKey(), req.GetInstanceKey(), req.GetFence()); err != nil {
		return err
	}
	if len(req.GetReason()) > a.limits.MaxResultBytes {
		return fieldErr("reason", "must be at most %d bytes, got %d", a.limits.MaxResultBytes, len(req.GetReason()))
	}
	return nil
}

func (a *API) ClaimActualLRP(ctx context.Context, req *basinv1.ClaimActualLRPRequest) (*basinv1.ClaimActualLRPResponse, error) {
	if err := a.checkClaim(req); err != nil {
		return nil, err
	}
	al, err := a.store.ClaimActualLRP(ctx, req.GetKey(), req.GetInstanceKey(), req.GetFence())
	if err != nil {
		return nil, err
	}
	return &basinv1.ClaimActualLRPResponse{ActualLrp: al}, nil
}

func (a *API) StartActualLRP(ctx context.Context, req *basinv1.StartActualLRPRequest) (*basinv1.StartActualLRPResponse, error) {
	if err := a.checkStart(req); err != nil {
		return nil, err
	}
	al, err := a.store.StartActualLRP(ctx, req.GetKey(), req.GetInstanceKey(), req.GetNetInfo(), req.GetFence())
	if err != nil {
		return nil, err
	}
	return &basinv1.StartActualLRPResponse{ActualLrp: al}, nil
}

// maxBatch bounds the items of one batched request.
const maxBatch = 1000

// ApplyActualLRPTransitions validates each transition as its single call
// does and runs the valid ones together in the store, each with its single
// call's fencing and guarded transaction; the committer merges them into few
// etcd transactions. One gRPC call instead of many is what makes a cell's
// batch cheap: the per-call cost of gRPC, not etcd, dominates at high rates.
// Results are in request order, each with the code its single call returns.
func (a *API) ApplyActualLRPTransitions(ctx context.Context, req *basinv1.ApplyActualLRPTransitionsRequest) (*basinv1.ApplyActualLRPTransitionsResponse, error) {
	ts := req.GetTransitions()
	if len(ts) > maxBatch {
		return nil, fieldErr("transitions", "must hold at most %d transitions, got %d", maxBatch, len(ts))
	}
	results := make([]*basinv1.ActualLRPTransitionResult, len(ts))
	changes := make([]actualChange, 0, len(ts))
	at := make([]int, 0, len(ts)) // the request index of each change
	for i, t := range ts {
		var c actualChange
		var err error
		switch op := t.GetTransition().(type) {
		case *basinv1.ActualLRPTransition_Claim:
			r := op.Claim
			if err = a.checkClaim(r); err == nil {
				c = actualChange{key: r.GetKey(), fence: r.GetFence(), step: a.store.claimStep(r.GetKey(), r.GetInstanceKey())}
			}
		case *basinv1.ActualLRPTransition_Start:
			r := op.Start
			if err = a.checkStart(r); err == nil {
				c = actualChange{key: r.GetKey(), fence: r.GetFence(), step: a.store.startStep(r.GetKey(), r.GetInstanceKey(), r.GetNetInfo())}
			}
		case *basinv1.ActualLRPTransition_Crash:
			r := op.Crash
			if err = a.checkCrash(r); err == nil {
				c = actualChange{key: r.GetKey(), fence: r.GetFence(), step: a.store.crashStep(r.GetKey(), r.GetInstanceKey(), r.GetReason())}
			}
		default:
			err = fieldErr(indexed("transitions", i), "must set claim, start or crash")
		}
		if err != nil {
			results[i] = transitionResult(nil, err)
			continue
		}
		changes = append(changes, c)
		at = append(at, i)
	}
	out, errs := a.store.applyActualChanges(ctx, changes)
	for j, i := range at {
		results[i] = transitionResult(out[j], errs[j])
	}
	return &basinv1.ApplyActualLRPTransitionsResponse{Results: results}, nil
}

// transitionResult carries an item's error as the status code and message
// its single call would return.
func transitionResult(al *basinv1.ActualLRP, err error) *basinv1.ActualLRPTransitionResult {
	res := &basinv1.ActualLRPTransitionResult{ActualLrp: al}
	if err != nil {
		st, _ := status.FromError(toStatus(err))
		res.Code, res.Message = int32(st.Code()), st.Message()
	}
	return res
}

func (a *API) CrashActualLRP(ctx context.Context, req *basinv1.CrashActualLRPRequest) (*basinv1.CrashActualLRPResponse, error) {
	if err := a.checkCrash(req); err != nil {
		return nil, err
	}
	al, err := a.store.CrashActualLRP(ctx, req.GetKey(), req.GetInstanceKey(), req.GetReason(), req.GetFence())
	if err != nil {
		return nil, err
	}
	return &basinv1.CrashActualLRPResponse{ActualLrp: al}, nil
}

func (a *API) FailActualLRP(ctx context.Context, req *basinv1.FailActualLRPRequest) (*basinv1.FailActualLRPResponse, error) {
	if err := a.limits.checkActualKey("key", req.GetKey()); err != nil {
		return nil, err
	}
	if req.GetPlacementError() == "" || len(req.GetPlacementError()) > 1024 {
		return nil, fieldErr("placement_error", "must be 1 to 1024 bytes, got %d", len(req.GetPlacementError()))
	}
	if err := a.store.checkLeaderFence("fence", req.GetFence()); err != nil {
		return nil, err
	}
	al, err := a.store.FailActualLRP(ctx, req.GetKey(), req.GetPlacementError(), req.GetFence())
	if err != nil {
		return nil, err
	}
	return &basinv1.FailActualLRPResponse{ActualLrp: al}, nil
}

func (a *API) UnclaimActualLRP(ctx context.Context, req *basinv1.UnclaimActualLRPRequest) (*basinv1.UnclaimActualLRPResponse, error) {
	if err := a.limits.checkActualKey("key", req.GetKey()); err != nil {
		return nil, err
	}
	if req.GetInstanceKey() != nil {
		if err := checkInstanceKey("instance_key", req.GetInstanceKey()); err != nil {
			return nil, err
		}
	}
	if err := a.store.checkLeaderFence("fence", req.GetFence()); err != nil {
		return nil, err
	}
	al, err := a.store.UnclaimActualLRP(ctx, req.GetKey(), req.GetInstanceKey(), req.GetFence())
	if err != nil {
		return nil, err
	}
	return &basinv1.UnclaimActualLRPResponse{ActualLrp: al}, nil
}

func (a *API) RetireActualLRP(ctx context.Context, req *basinv1.RetireActualLRPRequest) (*basinv1.RetireActualLRPResponse, error) {
	if err := a.limits.checkActualKey("key", req.GetKey()); err != nil {
		return nil, err
	}
	if err := a.store.checkLeaderFence("fence", req.GetFence()); err != nil {
		return nil, err
	}
	return &basinv1.RetireActualLRPResponse{}, a.store.RetireActualLRP(ctx, req.GetKey(), req.GetFence())
}

func (a *API) RemoveActualLRP(ctx context.Context, req *basinv1.RemoveActualLRPRequest) (*basinv1.RemoveActualLRPResponse, error) {
	if err := a.limits.checkActualKey("key", req.GetKey()); err != nil {
		return nil, err
	}
	if req.GetInstanceKey() != nil {
		if err := checkInstanceKey("instance_key", req.GetInstanceKey()); err != nil {
			return nil, err
		}
	}
	if err := a.store.checkLeaderFence("fence", req.GetFence()); err != nil {
		return nil, err
	}
	return &basinv1.RemoveActualLRPResponse{}, a.store.RemoveActualLRP(ctx, req.GetKey(), req.GetInstanceKey(), req.GetFence())
}

func (a *API) CreateMissingActualLRPs(ctx context.Context, req *basinv1.CreateMissingActualLRPsRequest) (*basinv1.CreateMissingActualLRPsResponse, error) {
	if err := checkGUID("process_guid", req.GetProcessGuid()); err != nil {
		return nil, err
	}
	if err := a.store.checkLeaderFence("fence", req.GetFence()); err != nil {
		return nil, err
	}
	created, err := a.store.CreateMissingActualLRPs(ctx, req.GetProcessGuid(), req.GetFence())
	if err != nil {
		return nil, err
	}
	return &basinv1.CreateMissingActualLRPsResponse{Created: created}, nil
}

func (a *API) DesireTask(ctx context.Context, req *basinv1.DesireTaskRequest) (*basinv1.DesireTaskResponse, error) {
	if err := checkGUID("task_guid", req.GetTaskGuid()); err != nil {
		return nil, err
	}
	if err := checkOptionalGUID("domain", req.GetDomain()); err != nil {
		return nil, err
	}
	if err := a.limits.checkTaskDefinition("definition", req.GetDefinition()); err != nil {
		return nil, err
	}
	t, err := a.store.DesireTask(ctx, req.GetTaskGuid(), req.GetDomain(), req.GetDefinition())
	if err != nil {
		return nil, err
	}
	return &basinv1.DesireTaskResponse{Task: t}, nil
}

func (a *API) StartTask(ctx context.Context, req *basinv1.StartTaskRequest) (*basinv1.StartTaskResponse, error) {
	if err := checkGUID("task_guid", req.GetTaskGuid()); err != nil {
		return nil, err
	}
	if err := checkGUID("cell_id", req.GetCellId()); err != nil {
		return nil, err
	}
	if err := a.store.checkCellFence("fence", req.GetCellId(), req.GetFence()); err != nil {
		return nil, err
	}
	t, should, err := a.store.StartTask(ctx, req.GetTaskGuid(), req.GetCellId(), req.GetFence())
	if err != nil {
		return nil, err
	}
	return &basinv1.StartTaskResponse{Task: t, ShouldStart: should}, nil
}

func (a *API) CompleteTask(ctx context.Context, req *basinv1.CompleteTaskRequest) (*basinv1.CompleteTaskResponse, error) {
	if err := checkGUID("task_guid", req.GetTaskGuid()); err != nil {
		return nil, err
	}
	if err := checkGUID("cell_id", req.GetCellId()); err != nil {
		return nil, err
	}
	if err := a.store.checkCellFence("fence", req.GetCellId(), req.GetFence()); err != nil {
		return nil, err
	}
	if len(req.GetResult()) > a.limits.MaxResultBytes {
		return nil, fieldErr("result", "must be at most %d bytes, got %d", a.limits.MaxResultBytes, len(req.GetResult()))
	}
	if len(req.GetFailureReason()) > a.limits.MaxResultBytes {
		return nil, fieldErr("failure_reason", "must be at most %d bytes, got %d", a.limits.MaxResultBytes, len(req.GetFailureReason()))
	}
	t, err := a.store.CompleteTask(ctx, req.GetTaskGuid(), req.GetCellId(), req.GetFailed(), req.GetFailureReason(), req.GetResult(), req.GetFence())
	if err != nil {
		return nil, err
	}
	return &basinv1.CompleteTaskResponse{Task: t}, nil
}

func (a *API) FailTask(ctx context.Context, req *basinv1.FailTaskRequest) (*basinv1.FailTaskResponse, error) {
	if err := checkGUID("task_guid", req.GetTaskGuid()); err != nil {
		return nil, err
	}
	if req.GetFailureReason() == "" || len(req.GetFailureReason()) > a.limits.MaxResultBytes {
		return nil, fieldErr("failure_reason", "must be 1 to %d bytes, got %d", a.limits.MaxResultBytes, len(req.GetFailureReason()))
	}
	if err := a.store.checkLeaderFence("fence", req.GetFence()); err != nil {
		return nil, err
	}
	t, err := a.store.FailTask(ctx, req.GetTaskGuid(), req.GetFailureReason(), req.GetFence())
	if err != nil {
		return nil, err
	}
	return &basinv1.FailTaskResponse{Task: t}, nil
}

func (a *API) CancelTask(ctx context.Context, req *basinv1.CancelTaskRequest) (*basinv1.CancelTaskResponse, error) {
	if err := checkGUID("task_guid", req.GetTaskGuid()); err != nil {
		return nil, err
	}
	t, err := a.store.CancelTask(ctx, req.GetTaskGuid())
	if err != nil {
		return nil, err
	}
	return &basinv1.CancelTaskResponse{Task: t}, nil
}

func (a *API) ResolveTask(ctx context.Context, req *basinv1.ResolveTaskRequest) (*basinv1.ResolveTaskResponse, error) {
	if err := checkGUID("task_guid", req.GetTaskGuid()); err != nil {
		return nil, err
	}
	if err := a.store.checkLeaderFence("fence", req.GetFence()); err != nil {
		return nil, err
	}
	return &basinv1.ResolveTaskResponse{}, a.store.ResolveTask(ctx, req.GetTaskGuid(), req.GetFence())
}

func (a *API) GetTask(ctx context.Context, req *basinv1.GetTaskRequest) (*basinv1.GetTaskResponse, error) {
	if err := checkGUID("task_guid", req.GetTaskGuid()); err != nil {
		return nil, err
	}
	t, err := a.store.GetTask(ctx, req.GetTaskGuid())
	if err != nil {
		return nil, err
	}
	return &basinv1.GetTaskResponse{Task: t}, nil
}

func (a *API) ListTasks(ctx context.Context, req *basinv1.ListTasksRequest) (*basinv1.ListTasksResponse, error) {
	if err := checkOptionalGUID("domain", req.GetDomain()); err != nil {
		return nil, err
	}
	if err := checkOptionalGUID("cell_id", req.GetCellId()); err != nil {
		return nil, err
	}
	ts, err := a.store.ListTasks(ctx, req.GetDomain(), req.GetCellId())
	if err != nil {
		return nil, err
	}
	return &basinv1.ListTasksResponse{Tasks: ts}, nil
}

func (a *API) ListCells(ctx context.Context, _ *basinv1.ListCellsRequest) (*basinv1.ListCellsResponse, error) {
	cs, err := a.store.ListCells(ctx)
	if err != nil {
		return nil, err
	}
	return &basinv1.ListCellsResponse{Cells: cs}, nil
}

func (a *API) SubscribeToEvents(req *basinv1.SubscribeToEventsRequest, stream basinv1.BBSService_SubscribeToEventsServer) error {
	if err := checkOptionalGUID("guid", req.GetGuid()); err != nil {
		return err
	}
	sub := a.store.Subscribe(req.GetGuid())
	defer sub.Close()
	// Headers tell the client it is subscribed: whatever it writes after
	// receiving them shows up in the stream.
	if err := stream.SendHeader(metadata.MD{}); err != nil {
		return err
	}
	ctx := stream.Context()
	for {
		ev, err := sub.Next(ctx)
		if err != nil {
			return err
		}
		if err := stream.Send(&basinv1.SubscribeToEventsResponse{Event: ev}); err != nil {
			return err
		}
	}
}
