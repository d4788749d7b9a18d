// Command gorouter routes HTTP requests by host name to app instances, from
// the routes cells register in etcd.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/basinpaas/basin/bbs"
	"github.com/basinpaas/basin/gorouter"
	"github.com/basinpaas/basin/gorouter/proxy"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "gorouter:", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		cfg       gorouter.Config
		endpoints string
		etcdTLS   transport.TLSInfo
		accessLog string
		logLevel  string
	)
	fs := flag.NewFlagSet("gorouter", flag.ContinueOnError)
	fs.StringVar(&endpoints, "etcd-endpoints", "http://127.0.0.1:2379", "comma-separated etcd endpoints")
	fs.StringVar(&etcdTLS.CertFile, "etcd-cert", "", "client certificate for etcd (mutual TLS)")
	fs.StringVar(&etcdTLS.KeyFile, "etcd-key", "", "client key for etcd")
	fs.StringVar(&etcdTLS.TrustedCAFile, "etcd-ca", "", "CA that signed etcd's certificate")
	fs.StringVar(&cfg.Prefix, "prefix", bbs.DefaultPrefix, "etcd key prefix")
	fs.StringVar(&cfg.DefaultDomain, "default-domain", "apps.localhost", "apps domain (myapp.<domain>)")
	fs.StringVar(&cfg.Addr, "addr", ":8080", "plain HTTP listen address")
	fs.StringVar(&cfg.TLSAddr, "tls-addr", "", "HTTPS listen address (needs -tls-cert-dir); empty: off")
	fs.StringVar(&cfg.TLSCertDir, "tls-cert-dir", "", "directory of <name>.crt + <name>.key pairs, picked by SNI")
	fs.DurationVar(&cfg.TLSReloadInterval, "tls-reload-interval", 30*time.Second, "how often changed certificate files are picked up")
	fs.StringVar(&cfg.HealthAddr, "health-addr", ":8081", "health check listen address (/health)")
	fs.StringVar(&cfg.DebugAddr, "debug-addr", "127.0.0.1:8082", "metrics and pprof listen address; empty: off")
	fs.DurationVar(&cfg.DrainWait, "drain-wait", 5*time.Second, "unhealthy period before listeners close on SIGTERM")
	fs.DurationVar(&cfg.DrainTimeout, "drain-timeout", 30*time.Second, "longest wait for requests in flight on SIGTERM")
	fs.StringVar(&cfg.Proxy.Balancing, "balancing", proxy.RoundRobin, "round-robin or least-connections")
	fs.DurationVar(&cfg.Proxy.DialTimeout, "dial-timeout", 5*time.Second, "endpoint connect timeout")
	fs.DurationVar(&cfg.Proxy.ResponseHeaderTimeout, "endpoint-timeout", 60*time.Second, "wait for an endpoint's response head (then 504)")
	fs.IntVar(&cfg.Proxy.MaxIdlePerEndpoint, "max-idle-per-endpoint", 512, "idle keep-alive connections kept per endpoint")
	fs.IntVar(&cfg.Proxy.MaxAttempts, "max-attempts", 3, "endpoints tried when connecting fails")
	fs.Int64Var(&cfg.Proxy.MaxBodyBytes, "max-body-bytes", 1<<30, "largest request body")
	fs.IntVar(&cfg.Proxy.MaxHeaderBytes, "max-header-bytes", 64<<10, "largest request head")
	fs.StringVar(&accessLog, "access-log", "-", "access log file; - for stdout, empty for none")
	fs.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	if err := fs.Parse(os.Args[1:]); err != nil {
		return err
	}

	var level slog.Level
	if err := level.UnmarshalText([]byte(logLevel)); err != nil {
		return fmt.Errorf("-log-level: %w", err)
	}
	logger := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	switch accessLog {
	case "":
	case "-":
		cfg.Proxy.AccessLog = os.Stdout
	default:
		f, err := os.OpenFile(accessLog, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
		if err != nil {
			return fmt.Errorf("open access log: %w", err)
		}
		defer f.Close()
		cfg.Proxy.AccessLog = io.Writer(f)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	var err error

	ecfg := clientv3.Config{Endpoints: strings.Split(endpoints, ","), DialTimeout: 5 * time.Second}
	if !etcdTLS.Empty() || etcdTLS.TrustedCAFile != "" {
		if ecfg.TLS, err = etcdTLS.ClientConfig(); err != nil {
			return fmt.Errorf("etcd TLS: %w", err)
		}
	}
	cli, err := clientv3.New(ecfg)
	if err != nil {
		return fmt.Errorf("etcd client for %s: %w", endpoints, err)
	}
	defer cli.Close()

	r, err := gorouter.New(cfg, cli, logger)
	if err != nil {
		return err
	}
	logger.Info("router listening", "http", r.Addr().String(), "https", addrOrOff(r.TLSAddr()),
		"health", addrOrOff(r.HealthAddr()), "debug", addrOrOff(r.DebugAddr()), "domain", cfg.DefaultDomain)
	return r.Run(ctx)
}

func addrOrOff(a net.Addr) string {
	if a == nil {
		return "off"
	}
	return a.String()
}
