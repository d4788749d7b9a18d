// Package embeddedetcd runs etcd inside a basin process, for one-machine
// installations, tests and benchmarks. A cluster of several machines uses an
// external etcd instead.
package embeddedetcd

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// Config configures an embedded etcd.
type Config struct {
	// Dir holds etcd's data.
	Dir string
	// ClientAddress to listen on, e.g. "127.0.0.1:2379"; "127.0.0.1:0" when empty
	// picks a free port.
	ClientAddress string
	Logger        *slog.Logger
}

// MaxTxnOps is the embedded member's --max-txn-ops. A BBS on it merges
// concurrent writes into transactions this large: under a burst (1,000 cells
// claiming at once) etcd's cost is per transaction, and 128 (etcd's default)
// made the transaction count, not the writes, the limit.
const MaxTxnOps = 1024

// Etcd is a running embedded etcd member.
type Etcd struct {
	e        *embed.Etcd
	endpoint string
}

// Start starts a one-member etcd and waits until it serves.
func Start(ctx context.Context, cfg Config) (*Etcd, error) {
	clientAddr := cfg.ClientAddress
	if clientAddr == "" {
		clientAddr = "127.0.0.1:0"
	}
	clientURL, err := freeURL(clientAddr)
	if err != nil {
		return nil, err
	}
	peerURL, err := freeURL("127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	ec := embed.NewConfig()
	ec.Dir = cfg.Dir
	ec.Name = "basin"
	ec.ListenClientUrls = []url.URL{*clientURL}
	ec.AdvertiseClientUrls = []url.URL{*clientURL}
	ec.ListenPeerUrls = []url.URL{*peerURL}
	ec.AdvertisePeerUrls = []url.URL{*peerURL}
	ec.InitialCluster = ec.Name + "=" + peerURL.String()
	ec.LogLevel = "error"
	ec.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	// Room for a busy installation's state; etcd's 2 GiB default is low.
	ec.QuotaBackendBytes = 8 << 30
	ec.MaxTxnOps = MaxTxnOps
	// Slow requests are logged (with the request rendered as text) past
	// this; the logger here discards them, so do not pay for rendering.
	ec.WarningUnaryRequestDuration = time.Hour
	// A compaction every hour keeps history bounded; watchers re-list.
	ec.AutoCompactionMode = "periodic"
	ec.AutoCompactionRetention = "1h"
	e, err := embed.StartEtcd(ec)
	if err != nil {
		return nil, fmt.Errorf("start embedded etcd in %s: %w", cfg.Dir, err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("embedded etcd failed: %w", err)
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, fmt.Errorf("embedded etcd in %s not ready after 60s", cfg.Dir)
	case <-ctx.Done():
		e.Close()
		return nil, ctx.Err()
	}
	if cfg.Logger != nil {
		cfg.Logger.Info("embedded etcd ready", "endpoint", clientURL.String(), "dir", cfg.Dir)
	}
	return &Etcd{e: e, endpoint: clientURL.String()}, nil
}

// Endpoint is the client URL, e.g. "http://127.0.0.1:2379".
func (e *Etcd) Endpoint() string { return e.endpoint }

// Client returns a new client of this member.
func (e *Etcd) Client() (*clientv3.Client, error) {
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   []string{e.endpoint},
		DialTimeout: 5 * time.Second,
		Logger:      zap.NewNop(),
	})
	if err != nil {
		return nil, fmt.Errorf("connect to embedded etcd: %w", err)
	}
	return cli, nil
}

// Err reports a fatal server error.
func (e *Etcd) Err() <-chan error { return e.e.Err() }

// Close stops the member.
func (e *Etcd) Close() { e.e.Close() }

// freeURL resolves a ":0" port to a free one, since etcd needs concrete URLs.
func freeURL(addr string) (*url.URL, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("parse address %q: %w", addr, err)
	}
	if port == "0" {
		l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
		if err != nil {
			return nil, fmt.Errorf("find a free port on %s: %w", host, err)
		}
		addr = l.Addr().String()
		l.Close()
	}
	return &url.URL{Scheme: "http", Host: addr}, nil
}
