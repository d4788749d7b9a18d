// Command cell runs one basin cell: the rep and the executor over containerd.
// `cell drain --rep ADDR` asks a running cell to evacuate and waits for it.
//
// SIGTERM evacuates (instances are placed elsewhere, then stopped here) and
// exits. SIGINT exits at once and leaves the containers running, for an
// in-place restart: the next cell process with the same --id and --state-dir
// adopts them.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/basinpaas/basin/bbs"
	"github.com/basinpaas/basin/cell"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "cell:", err)
		os.Exit(1)
	}
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

func run(args []string) error {
	if len(args) > 0 && args[0] == "drain" {
		return drain(args[1:])
	}
	fs := flag.NewFlagSet("cell", flag.ContinueOnError)
	var cfg cell.Config
	var capMem, capDisk int64
	var capContainers int
	var stacks, tags, etcd, ports, protected, logLevel string
	fs.StringVar(&cfg.ID, "id", "", "cell id (required)")
	fs.StringVar(&cfg.Zone, "zone", "z1", "availability zone")
	fs.StringVar(&stacks, "stacks", "tiny", "comma-separated stacks this cell runs")
	fs.StringVar(&tags, "placement-tags", "", "comma-separated placement tags")
	fs.Int64Var(&capMem, "memory-mb", 4096, "memory capacity in MiB")
	fs.Int64Var(&capDisk, "disk-mb", 16384, "disk capacity in MiB")
	fs.IntVar(&capContainers, "containers", 100, "container capacity")
	fs.StringVar(&cfg.AdvertiseAddress, "advertise", "127.0.0.1", "address instance ports are mapped on and advertised")
	fs.StringVar(&cfg.ListenAddress, "listen", "127.0.0.1:1800", "rep gRPC listen address")
	fs.StringVar(&cfg.RepAddress, "rep-address", "", "rep address written in presence (default: the listen address)")
	fs.StringVar(&cfg.DebugAddress, "debug", "", "address of /metrics and pprof (empty: off)")
	fs.StringVar(&cfg.CertFile, "tls-cert", "", "serve the rep's API over TLS with this certificate")
	fs.StringVar(&cfg.KeyFile, "tls-key", "", "the certificate's key")
	fs.StringVar(&cfg.ClientCAFile, "tls-client-ca", "", "require client certificates signed by this CA")
	fs.StringVar(&cfg.BBS.Address, "bbs", "127.0.0.1:8889", "BBS gRPC address")
	fs.StringVar(&cfg.BBS.Token, "bbs-token", os.Getenv("BASIN_BBS_TOKEN"), "BBS bearer token (default $BASIN_BBS_TOKEN)")
	fs.StringVar(&cfg.BBS.CAFile, "bbs-ca", "", "CA file verifying the BBS")
	fs.StringVar(&cfg.BBS.CertFile, "bbs-cert", "", "client certificate for the BBS")
	fs.StringVar(&cfg.BBS.KeyFile, "bbs-key", "", "client key for the BBS")
	fs.StringVar(&etcd, "etcd", "127.0.0.1:2379", "comma-separated etcd endpoints")
	fs.StringVar(&cfg.Prefix, "prefix", bbs.DefaultPrefix, "etcd key prefix")
	fs.StringVar(&cfg.ContainerdAddress, "containerd", "", "containerd socket (empty: start an own containerd under --state-dir)")
	fs.StringVar(&cfg.LauncherPath, "launcher", "/usr/local/lib/basin/basin-launcher", "static basin-launcher binary")
	fs.StringVar(&cfg.BuilderPath, "builder", "/usr/local/lib/basin/basin-builder", "static basin-builder binary staging containers run (staging tasks fail without it)")
	fs.StringVar(&cfg.StateDir, "state-dir", "/var/lib/basin/cell", "state directory (keep it short)")
	fs.StringVar(&cfg.BridgeName, "bridge", "", "CNI bridge (default basin0)")
	fs.StringVar(&cfg.NetworkName, "network", "", "CNI network name (default basin)")
	fs.StringVar(&cfg.Subnet, "subnet", "", "instance subnet (default 10.213.0.0/16)")
	fs.StringVar(&cfg.FirewallChain, "firewall-chain", "", "iptables chain (default BASIN-PROTECT)")
	fs.StringVar(&ports, "host-ports", "", "host port range LOW-HIGH (default 61000-61999)")
	fs.StringVar(&protected, "protected-ports", "", "comma-separated host ports containers must not reach (etcd, BBS; added automatically when on loopback)")
	fs.DurationVar(&cfg.LeaseTTL, "lease-ttl", 3*time.Second, "presence and route lease TTL")
	fs.DurationVar(&cfg.StopGrace, "stop-grace", 10*time.Second, "SIGTERM to SIGKILL when stopping an instance")
	fs.DurationVar(&cfg.EvacuationTimeout, "evacuation-timeout", time.Minute, "how long evacuation waits for replacements")
	fs.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if cfg.ID == "" {
		return fmt.Errorf("--id is required")
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(logLevel)); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	cfg.Stacks = splitList(stacks)
	cfg.PlacementTags = splitList(tags)
	cfg.EtcdEndpoints = splitList(etcd)
	cfg.Capacity = &basinv1.CellCapacity{MemoryMb: capMem, DiskMb: capDisk, Containers: int32(capContainers)}
	if ports != "" {
		lo, hi, ok := strings.Cut(ports, "-")
		l, err1 := strconv.Atoi(lo)
		h, err2 := strconv.Atoi(hi)
		if !ok || err1 != nil || err2 != nil || l <= 0 || h < l || h > 65535 {
			return fmt.Errorf("--host-ports: want LOW-HIGH, got %q", ports)
		}
		cfg.HostPortLow, cfg.HostPortHigh = l, h
	}
	for _, p := range splitList(protected) {
		n, err := strconv.Atoi(p)
		if err != nil {
			return fmt.Errorf("--protected-ports: %q: %w", p, err)
		}
		cfg.ProtectedPorts = append(cfg.ProtectedPorts, n)
	}
	// Containers must reach neither etcd nor the BBS nor this rep.
	for _, a := range append(append([]string{cfg.BBS.Address, cfg.ListenAddress}, cfg.EtcdEndpoints...), cfg.DebugAddress) {
		if i := strings.LastIndex(a, ":"); i >= 0 {
			if n, err := strconv.Atoi(a[i+1:]); err == nil && n > 0 {
				cfg.ProtectedPorts = append(cfg.ProtectedPorts, n)
			}
		}
	}

	cfg.StagingEnv, cfg.CABundle = cell.HostStagingEnv()
	c, err := cell.New(cfg)
	if err != nil {
		return err
	}
	termCtx, stopTerm := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stopTerm()
	intCtx, stopInt := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stopInt()

	runCtx, cancelRun := context.WithCancel(context.Background())
	defer cancelRun()
	done := make(chan error, 1)
	go func() { done <- c.Run(runCtx) }()
	select {
	case err := <-done:
		return err
	case <-intCtx.Done():
		cfg.Logger.Info("SIGINT: exiting, containers keep running for the next cell process")
	case <-termCtx.Done():
		cfg.Logger.Info("SIGTERM: evacuating")
		// A SIGINT during evacuation cuts it short.
		ectx, cancel := context.WithTimeout(intCtx, cfg.EvacuationTimeout+cfg.StopGrace+10*time.Second)
		if err := c.Evacuate(ectx, cfg.EvacuationTimeout); err != nil {
			cfg.Logger.Error("evacuation", "err", err)
		}
		cancel()
	}
	cancelRun()
	return <-done
}

// drain calls the cell's Drain and waits until its instances run elsewhere
// (or the timeout passed and they were stopped anyway).
func drain(args []string) error {
	fs := flag.NewFlagSet("cell drain", flag.ContinueOnError)
	addr := fs.String("rep", "127.0.0.1:1800", "the cell's rep gRPC address")
	timeout := fs.Duration("timeout", time.Minute, "how long the cell waits for replacements")
	caFile := fs.String("ca", "", "CA verifying the cell (TLS when set)")
	certFile := fs.String("cert", "", "client certificate")
	keyFile := fs.String("key", "", "client key")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	t0 := time.Now()
	if err := cell.Drain(ctx, cell.DrainTarget{Address: *addr, CAFile: *caFile, CertFile: *certFile, KeyFile: *keyFile}, *timeout); err != nil {
		return err
	}
	fmt.Printf("cell at %s drained in %s\n", *addr, time.Since(t0).Round(time.Millisecond))
	return nil
}
