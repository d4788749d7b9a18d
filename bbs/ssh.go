package bbs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// SSHAPI serves the SSHService: it finds the cell that runs an instance
// and relays an Exec stream between the client and that cell's rep, so
// clients never talk to cells.
type SSHAPI struct {
	basinv1.UnimplementedSSHServiceServer
	store *Store
	cells *cellConns
	log   *slog.Logger
}

var _ basinv1.SSHServiceServer = (*SSHAPI)(nil)

// newSSHAPI relays exec sessions to cells reached through cells.
func newSSHAPI(store *Store, cells *cellConns, log *slog.Logger) *SSHAPI {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &SSHAPI{store: store, cells: cells, log: log}
}

// Exec relays one session: the first request's start is resolved to a
// running instance and its cell, then both directions are piped until the
// cell's stream ends (after the exit) or the client goes away, which ends
// the cell's stream and so the process.
func (a *SSHAPI) Exec(stream grpc.BidiStreamingServer[basinv1.SSHServiceExecRequest, basinv1.SSHServiceExecResponse]) error {
	ctx, cancel := context.WithCancel(stream.Context())
	defer cancel()
	first, err := stream.Recv()
	if errors.Is(err, io.EOF) {
		return fieldErr("request.start", "the first request must carry start")
	}
	if err != nil {
		return err
	}
	start := first.GetRequest().GetStart()
	if err := validateExecStart(start); err != nil {
		return err
	}
	al, err := a.resolve(ctx, start)
	if err != nil {
		return err
	}
	cellID := al.GetInstanceKey().GetCellId()
	addr, err := repAddress(ctx, a.store, cellID)
	if err != nil {
		return fmt.Errorf("instance %d of %s: %w", al.GetKey().GetIndex(), start.GetProcessGuid(), err)
	}
	c, err := a.cells.get(addr)
	if err != nil {
		return err
	}
	cs, err := c.Exec(ctx)
	if err != nil {
		return cellStatus(cellID, addr, err)
	}
	// The cell execs exactly the instance resolved here, even if index i
	// moved meanwhile.
	start = proto.CloneOf(start)
	start.Index, start.InstanceGuid = al.GetKey().GetIndex(), al.GetInstanceKey().GetInstanceGuid()
	if err := cs.Send(&basinv1.ExecRequest{Msg: &basinv1.ExecRequest_Start{Start: start}}); err != nil {
		_, err = cs.Recv() // the cell's reason
		return cellStatus(cellID, addr, err)
	}

	// Client → cell. Only this goroutine sends on cs from here on. It ends
	// at the latest when Exec returns: gRPC then cancels the stream, which
	// ends stream.Recv.
	go func() {
		for {
			m, err := stream.Recv()
			if errors.Is(err, io.EOF) {
				_ = cs.CloseSend()
				return
			}
			if err != nil {
				cancel()
				return
			}
			req := m.GetRequest()
			if req.GetStart() != nil {
				a.log.Debug("exec: a second start from the client", "process", start.GetProcessGuid())
				cancel()
				return
			}
			if req == nil {
				continue
			}
			if err := cs.Send(req); err != nil {
				return // the cell's stream ended: Recv below reports why
			}
		}
	}()
	// Cell → client.
	for {
		r, err := cs.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			if stream.Context().Err() != nil {
				return stream.Context().Err()
			}
			if ctx.Err() != nil {
				return fieldErr("request.start", "only the first request may carry start")
			}
			return cellStatus(cellID, addr, err)
		}
		if err := stream.Send(&basinv1.SSHServiceExecResponse{Response: r}); err != nil {
			return err
		}
	}
}

// validateExecStart checks what the BBS can before asking a cell.
func validateExecStart(s *basinv1.ExecStart) error {
	if s == nil {
		return fieldErr("request.start", "the first request must carry start")
	}
	if err := checkGUID("start.process_guid", s.GetProcessGuid()); err != nil {
		return err
	}
	if s.GetIndex() < 0 {
		return fieldErr("start.index", "must not be negative, got %d", s.GetIndex())
	}
	if err := checkOptionalGUID("start.instance_guid", s.GetInstanceGuid()); err != nil {
		return err
	}
	if len(s.GetCommand()) > 0 && s.GetCommand()[0] == "" {
		return fieldErr("start.command[0]", "must not be empty")
	}
	return nil
}

// resolve finds the running instance start names: by instance guid when
// set, else by index.
func (a *SSHAPI) resolve(ctx context.Context, s *basinv1.ExecStart) (*basinv1.ActualLRP, error) {
	guid := s.GetProcessGuid()
	d, err := a.store.GetDesiredLRP(ctx, guid)
	if err != nil {
		if isNotFound(err) {
			return nil, fmt.Errorf("app %s does not exist: %w", guid, ErrNotFound)
		}
		return nil, err
	}
	name := guid
	if n := d.GetRun().GetAppName(); n != "" && n != guid {
		name = fmt.Sprintf("%s (%s)", n, guid)
	}
	var al *basinv1.ActualLRP
	if ig := s.GetInstanceGuid(); ig != "" {
		as, err := a.store.ListActualLRPs(ctx, ActualFilter{ProcessGUID: guid})
		if err != nil {
			return nil, err
		}
		for _, x := range as {
			if x.GetInstanceKey().GetInstanceGuid() == ig {
				al = x
			}
		}
		if al == nil {
			return nil, fmt.Errorf("app %s has no instance %s: %w", name, ig, ErrNotFound)
		}
	} else {
		al, err = a.store.GetActualLRP(ctx, guid, s.GetIndex())
		if err != nil {
			if isNotFound(err) {
				return nil, fmt.Errorf("app %s has no instance %d (it has %d instances): %w",
					name, s.GetIndex(), d.GetSchedule().GetInstances(), ErrNotFound)
			}
			return nil, err
		}
	}
	idx := al.GetKey().GetIndex()
	if al.GetState() != basinv1.ActualLRPState_ACTUAL_LRP_STATE_RUNNING || al.GetInstanceKey().GetCellId() == "" {
		why := actualStateName(al.GetState())
		if r := al.GetCrashReason(); r != "" && al.GetState() == basinv1.ActualLRPState_ACTUAL_LRP_STATE_CRASHED {
			why += ": " + r
		}
		return nil, fmt.Errorf("instance %d of app %s is not running (it is %s): %w", idx, name, why, ErrNotRunning)
	}
	return al, nil
}

func actualStateName(s basinv1.ActualLRPState) string {
	switch s {
	case basinv1.ActualLRPState_ACTUAL_LRP_STATE_UNCLAIMED:
		return "waiting for a cell"
	case basinv1.ActualLRPState_ACTUAL_LRP_STATE_CLAIMED:
		return "starting"
	case basinv1.ActualLRPState_ACTUAL_LRP_STATE_RUNNING:
		return "running"
	case basinv1.ActualLRPState_ACTUAL_LRP_STATE_CRASHED:
		return "crashed"
	}
	return s.String()
}

// cellStatus keeps a cell's status code and says which cell answered.
func cellStatus(cellID, addr string, err error) error {
	st := status.Convert(err)
	return status.Errorf(st.Code(), "cell %s at %s: %s", cellID, addr, st.Message())
}
