package executor_test

import (
	"context"
	"log/slog"
	"time"

	"github.com/containerd/containerd/v2/client"

	"github.com/basinpaas/basin/cell/executor"
)

// The rep's view of the executor: run it, start an instance, wait for it to
// be healthy, follow its logs, stop it; exits arrive through OnEvent.
func Example() {
	ctx := context.Background()
	c, _ := client.New("/run/basin/containerd/containerd.sock")
	e, _ := executor.New(executor.Config{
		Client:         c,
		LauncherPath:   "/usr/local/lib/basin/basin-launcher",
		Logger:         slog.Default(),
		ProtectedPorts: []int{2379, 8889},
		OnEvent: func(ev executor.Event) {
			if ev.Type == executor.EventExited && !ev.Exit.Stopped {
				// remove the route, then report CRASHED with ev.Exit.Status,
				// ev.Exit.Reason and ev.Exit.LastLines
			}
		},
	})
	go e.Run(ctx) // until the cell shuts down; containers survive it

	// After a restart: adopt what is still ours, destroy the rest.
	infos, _ := e.List(ctx)
	for _, in := range infos {
		_, _ = e.Adopt(ctx, in.InstanceGUID)
	}

	_, _ = e.Start(ctx, executor.Spec{
		InstanceGUID: "a1b2", ProcessGUID: "web", Index: 0, Stack: "tiny",
		Droplet:  executor.Droplet{Digest: "sha256:…", Path: "/var/cache/basin/droplets/…"},
		MemoryMB: 256,
	})
	info, _ := e.WaitHealthy(ctx, "a1b2") // then mark RUNNING and write the route
	_ = info.Ports[0].HostPort

	logs, _ := e.Logs("a1b2")
	_ = logs.Follow(ctx, 0, func(l executor.LogLine) error { return nil })

	_ = e.Stop(ctx, "a1b2", 10*time.Second)
}
