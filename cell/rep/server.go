package rep

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sort"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"

	"github.com/basinpaas/basin/cell/executor"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

// Service is the rep's CellService: the thin gRPC layer over Rep.
type Service struct {
	basinv1.UnimplementedCellServiceServer
	rep *Rep
}

var _ basinv1.CellServiceServer = (*Service)(nil)

// NewService serves r.
func NewService(r *Rep) *Service { return &Service{rep: r} }

// NewGRPCServer returns a gRPC server with the CellService, health and
// reflection, and bounded message sizes and connection timeouts.
func NewGRPCServer(r *Rep, opts ...grpc.ServerOption) (*grpc.Server, *health.Server) {
	base := []grpc.ServerOption{
		grpc.MaxRecvMsgSize(4 << 20),
		grpc.MaxSendMsgSize(16 << 20),
		grpc.ConnectionTimeout(10 * time.Second),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
	}
	gs := grpc.NewServer(append(base, opts...)...)
	basinv1.RegisterCellServiceServer(gs, NewService(r))
	hs := health.NewServer()
	healthpb.RegisterHealthServer(gs, hs)
	reflection.Register(gs)
	return gs, hs
}

// Serve runs gs on lis until ctx ends, reporting SERVING once the rep is
// ready; it then stops gracefully, bounded.
func Serve(ctx context.Context, r *Rep, gs *grpc.Server, hs *health.Server, lis net.Listener) error {
	hs.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	errc := make(chan error, 1)
	go func() { errc <- gs.Serve(lis) }()
	select {
	case <-r.Ready():
		hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
		hs.SetServingStatus(basinv1.CellService_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
	case <-ctx.Done():
	case err := <-errc:
		return fmt.Errorf("serve cell gRPC: %w", err)
	}
	select {
	case <-ctx.Done():
	case err := <-errc:
		return fmt.Errorf("serve cell gRPC: %w", err)
	}
	hs.Shutdown()
	stopped := make(chan struct{})
	go func() { gs.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		gs.Stop()
	}
	if err := <-errc; err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return fmt.Errorf("serve cell gRPC: %w", err)
	}
	return nil
}

// State reports capacity, allocations and what runs here.
func (s *Service) State(_ context.Context, _ *basinv1.StateRequest) (*basinv1.StateResponse, error) {
	return s.rep.State(), nil
}

// State is the cell's current view for the auctioneer.
func (r *Rep) State() *basinv1.StateResponse {
	p := r.presence()
	r.mu.Lock()
	defer r.mu.Unlock()
	mem, disk, n := r.allocatedLocked()
	c := r.cfg.Capacity
	resp := &basinv1.StateResponse{
		Presence: p,
		Available: &basinv1.CellCapacity{
			MemoryMb: max(c.GetMemoryMb()-mem, 0), DiskMb: max(c.GetDiskMb()-disk, 0), Containers: max(c.GetContainers()-n, 0)},
		Tasks: int32(len(r.tasks)),
	}
	for _, l := range r.lrps {
		resp.Lrps = append(resp.Lrps, &basinv1.LRPAllocation{ProcessGuid: l.key.GetProcessGuid(), Index: l.key.GetIndex(), MemoryMb: l.memoryMB, DiskMb: l.diskMB})
	}
	sort.Slice(resp.Lrps, func(i, j int) bool {
		a, b := resp.Lrps[i], resp.Lrps[j]
		return a.GetProcessGuid() < b.GetProcessGuid() || (a.GetProcessGuid() == b.GetProcessGuid() && a.GetIndex() < b.GetIndex())
	})
	return resp
}

// Perform accepts or rejects each piece of work.
func (s *Service) Perform(ctx context.Context, req *basinv1.PerformRequest) (*basinv1.PerformResponse, error) {
	if len(req.GetLrps())+len(req.GetTasks()) > 1000 {
		return nil, status.Errorf(codes.InvalidArgument, "lrps, tasks: at most 1000 per call, got %d", len(req.GetLrps())+len(req.GetTasks()))
	}
	return s.rep.Perform(ctx, req)
}

// Drain evacuates the cell and returns when it is done (or the caller's
// deadline passes; the evacuation continues).
func (s *Service) Drain(ctx context.Context, req *basinv1.DrainRequest) (*basinv1.DrainResponse, error) {
	if req.GetTimeoutMs() < 0 {
		return nil, status.Errorf(codes.InvalidArgument, "timeout_ms: must be >= 0, got %d", req.GetTimeoutMs())
	}
	done := make(chan error, 1)
	ok := s.rep.goAttach(func(rctx context.Context) {
		done <- s.rep.Evacuate(rctx, time.Duration(req.GetTimeoutMs())*time.Millisecond)
	})
	if !ok {
		return nil, status.Error(codes.Unavailable, "cell is not running")
	}
	select {
	case err := <-done:
		if err != nil {
			return nil, status.Errorf(codes.Unavailable, "evacuate: %v", err)
		}
		return &basinv1.DrainResponse{}, nil
	case <-ctx.Done():
		return nil, status.FromContextError(ctx.Err()).Err()
	}
}

// Logs streams the recent lines of the LRP's instances on this cell, then,
// with follow, new lines, also of instances that start later.
func (s *Service) Logs(req *basinv1.LogsRequest, stream grpc.ServerStreamingServer[basinv1.LogsResponse]) error {
	if req.GetTaskGuid() != "" {
		if req.GetProcessGuid() != "" || req.Index != nil {
			return status.Error(codes.InvalidArgument, "task_guid: set either process_guid (and index) or task_guid")
		}
		return s.taskLogs(req, stream)
	}
	if req.GetProcessGuid() == "" {
		return status.Error(codes.InvalidArgument, "process_guid: must be set (or task_guid)")
	}
	recent := int(req.GetRecent())
	if recent <= 0 {
		recent = 100
	}
	ctx, cancel := context.WithCancel(stream.Context())
	defer cancel()
	var sendMu sync.Mutex
	send := func(meta logMeta, l executor.LogLine) error {
		sendMu.Lock()
		defer sendMu.Unlock()
		return stream.Send(&basinv1.LogsResponse{Line: &basinv1.LogLine{
			ProcessGuid: req.GetProcessGuid(), Index: meta.index, Source: l.Source, Stream: l.Stream,
			TimeUnixNano: l.Time.UnixNano(), Text: l.Text, InstanceGuid: meta.instance,
		}})
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	errc := make(chan error, 1)
	seen := map[string]bool{}
	scan := func() {
		for _, m := range s.rep.logSources(req.GetProcessGuid(), req.Index) {
			if seen[m.instance] {
				continue
			}
			buf, err := s.rep.exec.Logs(m.instance)
			if err != nil {
				continue // not created yet: picked up by a later scan
			}
			seen[m.instance] = true
			lines := buf.Recent(recent)
			var after uint64
			if len(lines) > 0 {
				after = lines[0].Seq - 1
			}
			if !req.GetFollow() {
				for _, l := range lines {
					if err := send(m, l); err != nil {
						select {
						case errc <- err:
						default:
						}
						return
					}
				}
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				err := buf.Follow(ctx, after, func(l executor.LogLine) error { return send(m, l) })
				if err != nil && ctx.Err() == nil {
					select {
					case errc <- err:
					default:
					}
				}
			}()
		}
	}
	scan()
	if !req.GetFollow() {
		select {
		case err := <-errc:
			return err
		default:
			return nil
		}
	}
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-errc:
			cancel()
			return err
		case <-tick.C:
			scan()
		}
	}
}

type goneInstance struct {
	process string
	meta    logMeta
}

type logMeta struct {
	instance string
	index    int32
}

// logSources lists the instances of guid (optionally one index) this cell
// holds.
func (r *Rep) logSources(guid string, index *int32) []logMeta {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []logMeta
	for _, l := range r.lrps {
		if l.key.GetProcessGuid() != guid || (index != nil && l.key.GetIndex() != *index) {
			continue
		}
		out = append(out, logMeta{instance: l.guid, index: l.key.GetIndex()})
	}
	for _, g := range r.gone {
		if g.process == guid && (index == nil || g.meta.index == *index) {
			out = append(out, g.meta)
		}
	}
	if t := r.tasks[guid]; t != nil && t.instance != "" {
		out = append(out, logMeta{instance: t.instance})
	}
	return out
}

// taskLogs streams a task's container output: what is buffered (also after
// the container exited), then, following, new lines until the container has
// exited. A task this cell holds but whose container does not exist yet (a
// staging task fetching its bits) is waited for.
func (s *Service) taskLogs(req *basinv1.LogsRequest, stream grpc.ServerStreamingServer[basinv1.LogsResponse]) error {
	guid := req.GetTaskGuid()
	recent := int(req.GetRecent())
	if recent <= 0 {
		recent = 100
	}
	ctx := stream.Context()
	inst := taskInstanceGUID(guid)
	var buf *executor.LogBuffer
	for {
		var err error
		if buf, err = s.rep.exec.Logs(inst); err == nil {
			break
		}
		s.rep.mu.Lock()
		held := s.rep.tasks[guid] != nil
		s.rep.mu.Unlock()
		if !req.GetFollow() || !held {
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(100 * time.Millisecond):
		}
	}
	send := func(l executor.LogLine) error {
		return stream.Send(&basinv1.LogsResponse{Line: &basinv1.LogLine{
			ProcessGuid: guid, Source: l.Source, Stream: l.Stream, TimeUnixNano: l.Time.UnixNano(), Text: l.Text, InstanceGuid: inst,
		}})
	}
	lines := buf.Recent(recent)
	if !req.GetFollow() {
		for _, l := range lines {
			if err := send(l); err != nil {
				return err
			}
		}
		return nil
	}
	var after uint64
	if len(lines) > 0 {
		after = lines[0].Seq - 1
	}
	if err := buf.Follow(ctx, after, send); err != nil && ctx.Err() == nil {
		return err
	}
	return nil
}
