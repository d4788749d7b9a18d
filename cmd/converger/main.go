// Command converger keeps actual state equal to desired state.
// Run several: one leads, the others stand by.
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

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/basinpaas/basin/bbs"
	"github.com/basinpaas/basin/converger"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "converger:", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		cfg       converger.Config
		bbsCfg    bbs.ClientConfig
		endpoints string
		logLevel  string
	)
	host, _ := os.Hostname()
	fs := flag.NewFlagSet("converger", flag.ContinueOnError)
	fs.StringVar(&endpoints, "etcd-endpoints", "http://127.0.0.1:2379", "comma-separated etcd endpoints")
	fs.StringVar(&cfg.Prefix, "prefix", bbs.DefaultPrefix, "etcd key prefix")
	fs.StringVar(&bbsCfg.Address, "bbs-address", "127.0.0.1:8889", "BBS gRPC address")
	fs.StringVar(&bbsCfg.CAFile, "bbs-ca", "", "CA file verifying the BBS; plaintext when empty")
	fs.StringVar(&bbsCfg.CertFile, "bbs-cert", "", "client certificate for the BBS")
	fs.StringVar(&bbsCfg.KeyFile, "bbs-key", "", "client key for the BBS")
	fs.StringVar(&cfg.ID, "id", fmt.Sprintf("%s-%d", host, os.Getpid()), "this replica's election value")
	fs.DurationVar(&cfg.LeaseTTL, "lease-ttl", 3*time.Second, "election lease TTL (whole seconds)")
	fs.DurationVar(&cfg.Interval, "interval", 30*time.Second, "time between full passes")
	fs.DurationVar(&cfg.UnclaimedTimeout, "unclaimed-timeout", 30*time.Second, "requeue instances unclaimed and off the queue this long")
	fs.DurationVar(&cfg.ResolveTaskTimeout, "resolve-task-timeout", 2*time.Minute, "delete completed tasks unresolved this long")
	restart := converger.DefaultRestartPolicy()
	fs.Func("immediate-restarts", "crashes restarted at once (3)", intFlag(&restart.ImmediateRestarts))
	fs.DurationVar(&restart.BaseDelay, "restart-delay", restart.BaseDelay, "delay after the immediate restarts, doubling per crash")
	fs.DurationVar(&restart.MaxDelay, "max-restart-delay", restart.MaxDelay, "cap of the restart delay")
	fs.Func("max-restarts", "crashes after which an instance stays CRASHED (200)", intFlag(&restart.MaxRestarts))
	fs.StringVar(&cfg.DebugAddress, "debug-addr", "127.0.0.1:8892", "metrics and pprof listen address; empty: off")
	fs.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	if err := fs.Parse(os.Args[1:]); err != nil {
		return err
	}
	cfg.Restart = restart
	var level slog.Level
	if err := level.UnmarshalText([]byte(logLevel)); err != nil {
		return fmt.Errorf("-log-level: %w", err)
	}
	logger := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	cli, err := clientv3.New(clientv3.Config{Endpoints: strings.Split(endpoints, ","), DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		return fmt.Errorf("etcd client for %s: %w", endpoints, err)
	}
	defer cli.Close()
	b, err := bbs.Dial(bbsCfg)
	if err != nil {
		return err
	}
	defer b.Close()
	logger.Info("converger starting", "id", cfg.ID, "bbs", bbsCfg.Address, "debug", cfg.DebugAddress)
	return converger.New(cfg, cli, b, logger.With("component", "converger")).Run(ctx)
}

func intFlag(p *int32) func(string) error {
	return func(s string) error {
		n, err := strconv.ParseInt(s, 10, 32)
		if err != nil {
			return err
		}
		*p = int32(n)
		return nil
	}
}
