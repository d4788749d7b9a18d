package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/basinpaas/basin/auctioneer"
	"github.com/basinpaas/basin/bbs"
	"github.com/basinpaas/basin/cell"
	"github.com/basinpaas/basin/cell/containerdproc"
	"github.com/basinpaas/basin/converger"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"github.com/basinpaas/basin/stack"
	"github.com/containerd/containerd/v2/client"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sync/errgroup"
)

// systemContainerd is where Debian's containerd listens when a system
// service runs it.
const systemContainerd = "/run/containerd/containerd.sock"

// launcherPath finds basin-launcher next to the basin binary (make build
// puts both in bin/).
func launcherPath() (string, error) {
	exe, err := os.Executable()
	if err != nil {
		return "", err
	}
	p := filepath.Join(filepath.Dir(exe), "basin-launcher")
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("basin-launcher is not next to %s: build both with `make build`", exe)
	}
	return p, nil
}

// builderPath finds basin-builder next to the basin binary, as
// launcherPath does; without it cells run apps but fail staging tasks.
func builderPath() (string, error) {
	exe, err := os.Executable()
	if err != nil {
		return "", err
	}
	p := filepath.Join(filepath.Dir(exe), "basin-builder")
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("basin-builder is not next to %s (build it with `make build`): staging tasks will fail", exe)
	}
	return p, nil
}

// connectContainerd uses a running system containerd, or starts basin's own
// under dir and returns a stop function for it.
func connectContainerd(ctx context.Context, dir string, log *slog.Logger) (*client.Client, string, func(), error) {
	if _, err := os.Stat(systemContainerd); err == nil {
		c, err := client.New(systemContainerd, client.WithTimeout(2*time.Second))
		if err == nil {
			if _, err := c.Version(ctx); err == nil {
				return c, systemContainerd, sync.OnceFunc(func() { c.Close() }), nil
			}
			c.Close()
		}
	}
	// The daemon lives until its context ends: stop cancels it once the
	// cells are done with it.
	dctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	d, err := containerdproc.Start(dctx, containerdproc.Config{Dir: dir, Logger: log})
	if err != nil {
		cancel()
		return nil, "", nil, fmt.Errorf("start containerd in %s: %w", dir, err)
	}
	stop := func() { cancel(); <-d.Stopped() }
	c, err := client.New(d.Address())
	if err != nil {
		stop()
		return nil, "", nil, fmt.Errorf("connect to containerd: %w", err)
	}
	return c, d.Address(), sync.OnceFunc(func() { c.Close(); stop() }), nil
}

// portOf returns the port of a host:port address, or 0.
func portOf(addr string) int {
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		return 0
	}
	n, _ := strconv.Atoi(p)
	return n
}

// platform holds the components basin dev up runs besides etcd, the BBS and
// the router: the auctioneer, the converger and the cells.
type platform struct {
	auctioneer *auctioneer.Auctioneer
	converger  *converger.Converger
	cells      []*cell.Cell
	stop       func()
}

type platformConfig struct {
	dir   string
	cells int
	netID int
	// stacks the cells run, ensured (built, imported) before they start.
	stacks    []string
	bbsClient *bbs.Client
	etcd      *clientv3.Client
	// protected are host ports containers must not reach.
	protected []int
	log       *slog.Logger
	step      func(format string, args ...any)
	out       io.Writer
}

func startPlatform(ctx context.Context, pc platformConfig) (*platform, error) {
	p := &platform{stop: func() {}}
	host, _ := os.Hostname()
	p.auctioneer = auctioneer.New(auctioneer.Config{ID: host + "/auctioneer"}, pc.etcd, pc.bbsClient, pc.log)
	p.converger = converger.New(converger.Config{ID: host + "/converger"}, pc.etcd, pc.bbsClient, pc.log)
	pc.step("auctioneer, converger (leader-elected)")
	if pc.cells == 0 {
		return p, nil
	}
	launcher, err := launcherPath()
	if err != nil {
		return nil, err
	}
	builder, err := builderPath()
	if err != nil {
		pc.log.Warn("no basin-builder", "err", err)
		builder = ""
	}
	ctrd, addr, stopCtrd, err := connectContainerd(ctx, filepath.Join(pc.dir, "containerd"), pc.log.With("component", "containerd"))
	if err != nil {
		return nil, err
	}
	p.stop = stopCtrd
	pc.step("containerd    %s", addr)
	for _, name := range pc.stacks {
		t0 := time.Now()
		if name != "tiny" {
			fmt.Fprintf(pc.out, "  … stack %s: building it if this machine has not yet (once per recipe; the first build takes a few minutes)\n", name)
		}
		snap, err := stack.Ensure(ctx, ctrd, name, filepath.Join(pc.dir, "stacks"))
		if err != nil {
			stopCtrd()
			return nil, fmt.Errorf("stack %s: %w", name, err)
		}
		pc.step("stack %-7s %s (%s)", name, snap, time.Since(t0).Round(100*time.Millisecond))
	}
	// Containers must not reach any component, the cells' own reps
	// included, so the reps' ports are bound first.
	listeners := make([]net.Listener, pc.cells)
	for i := range listeners {
		if listeners[i], err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			for _, l := range listeners[:i] {
				l.Close()
			}
			p.stop()
			return nil, fmt.Errorf("listen for cell-%d: %w", i, err)
		}
		pc.protected = append(pc.protected, portOf(listeners[i].Addr().String()))
	}
	stagingEnv, caBundle := cell.HostStagingEnv()
	base := cell.Config{
		ID:             "cell",
		Stacks:         pc.stacks,
		StagingEnv:     stagingEnv,
		CABundle:       caBundle,
		Capacity:       &basinv1.CellCapacity{MemoryMb: 4096, DiskMb: 16384, Containers: 100},
		BBSClient:      pc.bbsClient,
		Etcd:           pc.etcd,
		Containerd:     ctrd,
		LauncherPath:   launcher,
		BuilderPath:    builder,
		StateDir:       filepath.Join(pc.dir, "cells"),
		ProtectedPorts: pc.protected,
		Logger:         pc.log,
	}
	for i := range pc.cells {
		cfg := devCellConfig(base, pc.netID, i)
		cfg.Listener = listeners[i]
		c, err := cell.New(cfg)
		if err != nil {
			for _, l := range listeners[i:] {
				l.Close()
			}
			p.stop()
			return nil, err
		}
		p.cells = append(p.cells, c)
		pc.step("%-13s %s (4 GiB, 100 containers, zone %s)", cfg.ID, c.Addr(), cfg.Zone)
	}
	return p, nil
}

// devCellConfig is dev up's cell i: names and a subnet of dev up's own, so a
// cell started on its own (cmd/cell, with the executor's defaults) never
// shares a bridge. netID (dev up --net-id) picks another set of names,
// subnets and host ports (below Linux's ephemeral range), so two dev ups (two test runs) on one machine do not collide.
// dev down derives the same names to clean up.
func devCellConfig(base cell.Config, netID, i int) cell.Config {
	cfg := cell.Numbered(base, i)
	if netID == 0 {
		cfg.NetworkName = fmt.Sprintf("basin-dev-%d", i)
		cfg.BridgeName = fmt.Sprintf("basin-dev%d", i)
		cfg.Subnet = fmt.Sprintf("10.214.%d.0/24", i%256)
		cfg.FirewallChain = fmt.Sprintf("BASIN-DEV-%d", i)
	} else {
		cfg.NetworkName = fmt.Sprintf("basin-d%d-%d", netID, i)
		cfg.BridgeName = fmt.Sprintf("basin-d%d-%d", netID, i)
		cfg.Subnet = fmt.Sprintf("10.%d.%d.0/24", 214+netID, i%256)
		cfg.FirewallChain = fmt.Sprintf("BASIN-D%d-%d", netID, i)
		// Host ports too: a port mapped by another platform's cell (or
		// left mapped by one that died) would take this cell's traffic.
		cfg.HostPortLow = 20000 + (netID-1)*1000 + i*100
		cfg.HostPortHigh = cfg.HostPortLow + 99
	}
	cfg.Zone = fmt.Sprintf("z%d", i%2+1)
	return cfg
}

// netIDFile keeps dev up's --net-id for dev down.
const netIDFile = "net-id"

func readNetID(dir string) int {
	b, err := os.ReadFile(filepath.Join(dir, netIDFile))
	if err != nil {
		return 0
	}
	n, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return n
}

// run runs every component until ctx ends.
func (p *platform) run(ctx context.Context, g *errgroup.Group) {
	g.Go(func() error { return p.auctioneer.Run(ctx) })
	g.Go(func() error { return p.converger.Run(ctx) })
	for _, c := range p.cells {
		g.Go(func() error {
			if err := c.Run(ctx); err != nil && !errors.Is(err, context.Canceled) {
				return err
			}
			return nil
		})
	}
}
