package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/basinpaas/basin/bbs"
	"github.com/basinpaas/basin/cell/executor"
	"github.com/basinpaas/basin/cell/rep"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// nullExec is the executor of a benchmark cell: the real rep decides,
// claims, fetches the droplet and reports, and "containers" are records that
// are healthy at once.
type nullExec struct {
	mu    sync.Mutex
	insts map[string]executor.Info
	port  uint16
}

var _ rep.Executor = (*nullExec)(nil)

func newNullExec() *nullExec { return &nullExec{insts: map[string]executor.Info{}, port: 40000} }

func (e *nullExec) Start(_ context.Context, spec executor.Spec) (executor.Info, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if _, ok := e.insts[spec.InstanceGUID]; ok {
		return executor.Info{}, executor.ErrExists
	}
	e.port++
	info := executor.Info{InstanceGUID: spec.InstanceGUID, ProcessGUID: spec.ProcessGUID, Index: spec.Index,
		State: executor.StateRunning, HostIP: "127.0.0.1", ContainerIP: "10.0.0.2", Labels: spec.Labels,
		Ports: []executor.PortMapping{{ContainerPort: 8080, HostPort: e.port}}}
	e.insts[spec.InstanceGUID] = info
	return info, nil
}

func (e *nullExec) WaitHealthy(_ context.Context, guid string) (executor.Info, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	info, ok := e.insts[guid]
	if !ok {
		return executor.Info{}, executor.ErrNotFound
	}
	return info, nil
}

func (e *nullExec) Stop(_ context.Context, guid string, _ time.Duration) error {
	return e.Destroy(context.Background(), guid)
}

func (e *nullExec) List(context.Context) ([]executor.Info, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []executor.Info
	for _, i := range e.insts {
		out = append(out, i)
	}
	return out, nil
}

func (e *nullExec) Adopt(_ context.Context, guid string) (executor.Info, error) {
	return executor.Info{}, executor.ErrNotFound
}

func (e *nullExec) Destroy(_ context.Context, guid string) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	delete(e.insts, guid)
	return nil
}

func (e *nullExec) Logs(string) (*executor.LogBuffer, error) { return nil, executor.ErrNotFound }
func (e *nullExec) Exec(context.Context, string, executor.ExecSpec) (int, error) {
	return 0, executor.ErrNotFound
}

// startReps runs n real reps on null executors until ctx ends; wait blocks
// until they have all stopped.
func startReps(ctx context.Context, n, zones, containers int, cli *clientv3.Client, b rep.BBS, keys bbs.Keys, dir string, log *slog.Logger) (wait func(), err error) {
	var wg sync.WaitGroup
	wait = wg.Wait
	for i := range n {
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return wait, err
		}
		r, err := rep.New(rep.Config{
			CellID: fmt.Sprintf("cell-%04d", i), Zone: fmt.Sprintf("z%d", i%zones), Stacks: []string{"tiny"},
			Capacity:   &basinv1.CellCapacity{MemoryMb: 256 * 1024, DiskMb: 1024 * 1024, Containers: int32(containers)},
			RepAddress: lis.Addr().String(), Keys: keys, LeaseTTL: 10 * time.Second,
			DropletDir: filepath.Join(dir, fmt.Sprintf("cell-%04d", i)), Logger: log,
		}, cli, b, newNullExec())
		if err != nil {
			lis.Close()
			return wait, err
		}
		gs, hs := rep.NewGRPCServer(r)
		wg.Go(func() {
			if err := rep.Serve(ctx, r, gs, hs, lis); err != nil {
				log.Warn("rep gRPC", "err", err)
			}
		})
		wg.Go(func() {
			if err := r.Run(ctx); err != nil && ctx.Err() == nil {
				log.Warn("rep", "err", err)
			}
		})
		select {
		case <-r.Ready():
		case <-ctx.Done():
			return wait, ctx.Err()
		}
	}
	return wait, nil
}

// benchDroplet writes a small droplet and returns its reference; each rep
// fetches it once into its cache.
func benchDroplet(dir string) (*basinv1.DropletRef, error) {
	body := []byte("a droplet the null executor never unpacks\n")
	sum := sha256.Sum256(body)
	path := filepath.Join(dir, "droplet.tgz")
	if err := os.WriteFile(path, body, 0o644); err != nil {
		return nil, err
	}
	return &basinv1.DropletRef{Digest: "sha256:" + hex.EncodeToString(sum[:]), Url: "file://" + path}, nil
}
