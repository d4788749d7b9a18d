package bbs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/protobuf/proto"
)

// Log relay timings; variables so tests can shorten them.
var (
	// logPoll is how often a follower looks for a task's placement or
	// completion and for new cells hosting an LRP.
	logPoll = 250 * time.Millisecond
	// logRecentTimeout bounds a non-following read of one cell.
	logRecentTimeout = 30 * time.Second
	// logCompletionWait bounds the wait, once a task's container exited,
	// for the cell to complete the task (uploads happen in between).
	logCompletionWait = 10 * time.Minute
)

// logBuffer is how many lines may wait between the cells' streams and the
// client's: a slow client slows the cells' streams, never grows memory.
const logBuffer = 256

// cellConns shares one gRPC connection per rep address, dialled with the
// options the auctioneer uses to reach cells.
type cellConns struct {
	opts []grpc.DialOption

	mu    sync.Mutex
	conns map[string]*grpc.ClientConn
}

func newCellConns(opts []grpc.DialOption) *cellConns {
	if len(opts) == 0 {
		opts = []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	}
	opts = append(opts, grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}))
	return &cellConns{opts: opts, conns: map[string]*grpc.ClientConn{}}
}

func (c *cellConns) get(addr string) (basinv1.CellServiceClient, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	conn, ok := c.conns[addr]
	if !ok {
		var err error
		if conn, err = grpc.NewClient(addr, c.opts...); err != nil {
			return nil, fmt.Errorf("connect to cell at %s: %w", addr, err)
		}
		c.conns[addr] = conn
	}
	return basinv1.NewCellServiceClient(conn), nil
}

func (c *cellConns) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for addr, conn := range c.conns {
		conn.Close()
		delete(c.conns, addr)
	}
}

// LogAPI serves the LogService: it finds the cells that run a task or an
// LRP's instances and relays their CellService.Logs streams.
type LogAPI struct {
	basinv1.UnimplementedLogServiceServer
	store *Store
	cells *cellConns
	log   *slog.Logger
}

var _ basinv1.LogServiceServer = (*LogAPI)(nil)

// newLogAPI relays logs from cells reached through cells.
func newLogAPI(store *Store, cells *cellConns, log *slog.Logger) *LogAPI {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &LogAPI{store: store, cells: cells, log: log}
}

func (a *LogAPI) StreamLogs(req *basinv1.StreamLogsRequest, stream grpc.ServerStreamingServer[basinv1.StreamLogsResponse]) error {
	if req.GetRecent() < 0 || req.GetRecent() > 10000 {
		return fieldErr("recent", "must be between 0 and 10000, got %d", req.GetRecent())
	}
	send := func(l *basinv1.LogLine) error { return stream.Send(&basinv1.StreamLogsResponse{Line: l}) }
	switch src := req.GetSource().(type) {
	case *basinv1.StreamLogsRequest_TaskGuid:
		if err := checkGUID("task_guid", src.TaskGuid); err != nil {
			return err
		}
		if req.Index != nil {
			return fieldErr("index", "applies to an LRP's instances, not to a task")
		}
		return a.taskLogs(stream.Context(), src.TaskGuid, req, send)
	case *basinv1.StreamLogsRequest_ProcessGuid:
		if err := checkGUID("process_guid", src.ProcessGuid); err != nil {
			return err
		}
		if req.Index != nil && req.GetIndex() < 0 {
			return fieldErr("index", "must not be negative, got %d", req.GetIndex())
		}
		return a.lrpLogs(stream.Context(), src.ProcessGuid, req, send)
	}
	return fieldErr("source", "process_guid or task_guid is required")
}

// repAddress finds where a cell's rep listens, from its presence.
func repAddress(ctx context.Context, store *Store, cellID string) (string, error) {
	resp, err := store.cli.Get(ctx, store.keys.Cell(cellID))
	if err != nil {
		return "", fmt.Errorf("read presence of cell %s: %w", cellID, err)
	}
	if len(resp.Kvs) == 0 {
		return "", fmt.Errorf("cell %s is gone: %w", cellID, ErrNotFound)
	}
	p := &basinv1.CellPresence{}
	if err := proto.Unmarshal(resp.Kvs[0].Value, p); err != nil {
		return "", fmt.Errorf("decode presence of cell %s: %w", cellID, err)
	}
	return p.GetRepAddress(), nil
}

// relay copies one cell's Logs stream into send until it ends.
func (a *LogAPI) relay(ctx context.Context, cellID string, req *basinv1.LogsRequest, send func(*basinv1.LogLine) error) error {
	addr, err := repAddress(ctx, a.store, cellID)
	if err != nil {
		return err
	}
	c, err := a.cells.get(addr)
	if err != nil {
		return err
	}
	if !req.GetFollow() {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, logRecentTimeout)
		defer cancel()
	}
	s, err := c.Logs(ctx, req)
	if err != nil {
		return fmt.Errorf("logs from cell %s at %s: %w", cellID, addr, err)
	}
	for {
		m, err := s.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("logs from cell %s at %s: %w", cellID, addr, err)
		}
		if err := send(m.GetLine()); err != nil {
			return err
		}
	}
}

// taskLogs relays a task's container output from the cell that runs it.
// Following, it waits for the task to be placed, streams until its
// container exits, then until the task completes.
func (a *LogAPI) taskLogs(ctx context.Context, guid string, req *basinv1.StreamLogsRequest, send func(*basinv1.LogLine) error) error {
	t, err := a.store.GetTask(ctx, guid)
	if err != nil {
		return err
	}
	for req.GetFollow() && t.GetCellId() == "" && t.GetState() != taskCompleted {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(logPoll):
		}
		if t, err = a.store.GetTask(ctx, guid); err != nil {
			return err
		}
	}
	if t.GetCellId() == "" {
		return nil // never placed: no output anywhere
	}
	lr := &basinv1.LogsRequest{TaskGuid: guid, Follow: req.GetFollow(), Recent: req.GetRecent()}
	relayErr := a.relay(ctx, t.GetCellId(), lr, send)
	if !req.GetFollow() || ctx.Err() != nil {
		return relayErr
	}
	// The container is gone; the cell still uploads and reports.
	deadline := time.Now().Add(logCompletionWait)
	for time.Now().Before(deadline) {
		if t, err = a.store.GetTask(ctx, guid); err != nil {
			if isNotFound(err) {
				return nil // completed and resolved already
			}
			return err
		}
		if t.GetState() == taskCompleted {
			return nil
		}
		if relayErr != nil {
			// The cell's stream broke while the task still runs there.
			return relayErr
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(logPoll):
		}
	}
	return nil
}

// lrpLogs fans in the logs of an LRP's instances from every cell that runs
// one; following, cells that get an instance later are added as they
// appear, and a cell whose stream broke is asked again (its recent lines
// may then arrive twice).
func (a *LogAPI) lrpLogs(ctx context.Context, guid string, req *basinv1.StreamLogsRequest, send func(*basinv1.LogLine) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	lines := make(chan *basinv1.LogLine, logBuffer)
	forward := func(l *basinv1.LogLine) error {
		select {
		case lines <- l:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	lr := &basinv1.LogsRequest{ProcessGuid: guid, Index: req.Index, Follow: req.GetFollow(), Recent: req.GetRecent()}
	var wg sync.WaitGroup
	var mu sync.Mutex
	active := map[string]bool{}
	scan := func() error {
		as, err := a.store.ListActualLRPs(ctx, ActualFilter{ProcessGUID: guid})
		if err != nil {
			return err
		}
		for _, al := range as {
			cell := al.GetInstanceKey().GetCellId()
			if cell == "" || (req.Index != nil && al.GetKey().GetIndex() != req.GetIndex()) {
				continue
			}
			mu.Lock()
			running := active[cell]
			active[cell] = true
			mu.Unlock()
			if running {
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := a.relay(ctx, cell, lr, forward); err != nil && ctx.Err() == nil {
					a.log.Debug("relay logs", "process", guid, "cell", cell, "err", err)
					if req.GetFollow() {
						select {
						case <-ctx.Done():
						case <-time.After(time.Second):
						}
					}
				}
				mu.Lock()
				delete(active, cell)
				mu.Unlock()
			}()
		}
		return nil
	}
	// Every return path stops the relays and waits for them.
	defer func() { cancel(); wg.Wait() }()
	if err := scan(); err != nil {
		return err
	}
	if !req.GetFollow() {
		// No scan starts relays after this one: once they are done no
		// one sends on lines.
		go func() { wg.Wait(); close(lines) }()
		for l := range lines {
			if err := send(l); err != nil {
				return err
			}
		}
		return nil
	}
	tick := time.NewTicker(4 * logPoll)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case l := <-lines:
			if err := send(l); err != nil {
				return err
			}
		case <-tick.C:
			if err := scan(); err != nil && ctx.Err() == nil {
				return err
			}
		}
	}
}
