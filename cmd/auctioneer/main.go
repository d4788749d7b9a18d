// Command auctioneer places UNCLAIMED instances and PENDING tasks on cells.
// Run several: one leads, the others stand by.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/basinpaas/basin/auctioneer"
	"github.com/basinpaas/basin/bbs"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "auctioneer:", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		cfg       auctioneer.Config
		bbsCfg    bbs.ClientConfig
		endpoints string
		logLevel  string
	)
	host, _ := os.Hostname()
	fs := flag.NewFlagSet("auctioneer", flag.ContinueOnError)
	fs.StringVar(&endpoints, "etcd-endpoints", "http://127.0.0.1:2379", "comma-separated etcd endpoints")
	fs.StringVar(&cfg.Prefix, "prefix", bbs.DefaultPrefix, "etcd key prefix")
	fs.StringVar(&bbsCfg.Address, "bbs-address", "127.0.0.1:8889", "BBS gRPC address")
	fs.StringVar(&bbsCfg.CAFile, "bbs-ca", "", "CA file verifying the BBS; plaintext when empty")
	fs.StringVar(&bbsCfg.CertFile, "bbs-cert", "", "client certificate for the BBS")
	fs.StringVar(&bbsCfg.KeyFile, "bbs-key", "", "client key for the BBS")
	fs.StringVar(&cfg.ID, "id", fmt.Sprintf("%s-%d", host, os.Getpid()), "this replica's election value")
	fs.DurationVar(&cfg.LeaseTTL, "lease-ttl", 3*time.Second, "election lease TTL (whole seconds)")
	fs.DurationVar(&cfg.BatchWindow, "batch-window", 50*time.Millisecond, "how long to gather work into one auction")
	fs.IntVar(&cfg.MaxBatch, "max-batch", 5000, "most items in one auction")
	fs.DurationVar(&cfg.BusyWindow, "busy-window", time.Second, "under sustained load, the longest wait between auctions (each waits twice as long as the last took)")
	fs.DurationVar(&cfg.CellStateMaxAge, "cell-state-max-age", time.Second, "how long a cell's State answer serves later auctions, adjusted for what they placed")
	fs.DurationVar(&cfg.CellStateTimeout, "cell-state-timeout", time.Second, "time a cell has to answer State")
	fs.DurationVar(&cfg.PerformTimeout, "perform-timeout", 5*time.Second, "time a cell has to answer Perform")
	fs.IntVar(&cfg.MaxAttempts, "max-attempts", 5, "auctions an item may fail before its placement error")
	fs.DurationVar(&cfg.RetryDelay, "retry-delay", 500*time.Millisecond, "wait before auctioning failed work again")
	fs.DurationVar(&cfg.ClaimTimeout, "claim-timeout", 10*time.Second, "re-auction accepted work not claimed within this")
	fs.StringVar(&cfg.DebugAddress, "debug-addr", "127.0.0.1:8891", "metrics and pprof listen address; empty: off")
	fs.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	if err := fs.Parse(os.Args[1:]); err != nil {
		return err
	}
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
	logger.Info("auctioneer starting", "id", cfg.ID, "bbs", bbsCfg.Address, "debug", cfg.DebugAddress)
	return auctioneer.New(cfg, cli, b, logger.With("component", "auctioneer")).Run(ctx)
}
