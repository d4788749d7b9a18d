// Command bbs serves basin's Bulletin Board System: the gRPC API over the
// desired and actual state in etcd. Several may run at once on one etcd.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/basinpaas/basin/apps"
	"github.com/basinpaas/basin/bbs"
	"github.com/basinpaas/basin/bbs/blobstore"
	"github.com/basinpaas/basin/bbs/embeddedetcd"
	"github.com/basinpaas/basin/buildpacks"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"
)

type config struct {
	server                    bbs.Config
	etcdEndpoints             string
	etcdCA, etcdCert, etcdKey string
	embeddedDir               string
	tokenFile                 string
	blobDir                   string
	blobWebDAV                string
	logLevel                  string
	appDomain                 string
}

func main() {
	var c config
	fs := flag.NewFlagSet("bbs", flag.ExitOnError)
	fs.StringVar(&c.server.ListenAddress, "listen", "127.0.0.1:8889", "gRPC address")
	fs.StringVar(&c.server.DebugAddress, "debug-listen", "127.0.0.1:17017", "address for /metrics; empty disables")
	fs.StringVar(&c.etcdEndpoints, "etcd-endpoints", "", "comma-separated etcd client URLs of an external cluster")
	fs.StringVar(&c.etcdCA, "etcd-ca", "", "CA file that signed the etcd servers' certificates")
	fs.StringVar(&c.etcdCert, "etcd-cert", "", "client certificate for etcd")
	fs.StringVar(&c.etcdKey, "etcd-key", "", "client key for etcd")
	fs.StringVar(&c.embeddedDir, "embedded-etcd-dir", "", "run an embedded etcd with its data here instead of an external cluster")
	fs.StringVar(&c.server.Store.Prefix, "prefix", bbs.DefaultPrefix, "etcd key prefix")
	fs.StringVar(&c.server.CertFile, "tls-cert", "", "server certificate (plaintext when empty)")
	fs.StringVar(&c.server.KeyFile, "tls-key", "", "server key")
	fs.StringVar(&c.server.ClientCAFile, "client-ca", "", "CA that signs component client certificates")
	fs.StringVar(&c.blobDir, "blob-dir", "", "serve the local blobstore (droplets, app bits) from this directory")
	fs.StringVar(&c.blobWebDAV, "blob-webdav", "", "serve blobs kept on this WebDAV collection (nginx's DAV module), e.g. http://blobs:8081/blobs/; shared by several BBS replicas")
	fs.StringVar(&c.tokenFile, "token-file", "", "file holding the users' bearer token (BASIN_TOKEN also works)")
	var maxInstances int
	fs.IntVar(&maxInstances, "max-instances", int(bbs.DefaultLimits.MaxInstances), "most instances one LRP may ask for")
	fs.IntVar(&c.server.Store.Workers, "txn-concurrency", 2, "etcd transactions in flight at once; concurrent writes are merged into them")
	fs.IntVar(&c.server.Store.MaxTxnOps, "max-txn-ops", 0, "the etcd cluster's --max-txn-ops, up to which writes are merged (default: 128, etcd's default; the embedded etcd's 1024)")
	fs.StringVar(&c.appDomain, "app-domain", "apps.localhost", "default app domain: app NAME is routed at NAME.<domain>")
	fs.StringVar(&c.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.Parse(os.Args[1:])
	c.server.Limits.MaxInstances = int32(maxInstances)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, c); err != nil {
		fmt.Fprintln(os.Stderr, "bbs:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, c config) error {
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.logLevel)); err != nil {
		return fmt.Errorf("-log-level: %w", err)
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	c.server.Logger = log

	c.server.Token = os.Getenv("BASIN_TOKEN")
	if c.tokenFile != "" {
		b, err := os.ReadFile(c.tokenFile)
		if err != nil {
			return fmt.Errorf("read token file: %w", err)
		}
		c.server.Token = strings.TrimSpace(string(b))
	}
	if c.server.Token == "" && c.server.ClientCAFile == "" {
		log.Warn("no token and no client CA: the API is open to anyone who can reach it")
	}

	var cli *clientv3.Client
	switch {
	case c.embeddedDir != "" && c.etcdEndpoints != "":
		return errors.New("give either -etcd-endpoints or -embedded-etcd-dir, not both")
	case c.embeddedDir != "":
		e, err := embeddedetcd.Start(ctx, embeddedetcd.Config{Dir: c.embeddedDir, Logger: log})
		if err != nil {
			return err
		}
		defer e.Close()
		if c.server.Store.MaxTxnOps == 0 {
			c.server.Store.MaxTxnOps = embeddedetcd.MaxTxnOps
		}
		if cli, err = e.Client(); err != nil {
			return err
		}
	case c.etcdEndpoints != "":
		tc, err := etcdTLS(c.etcdCA, c.etcdCert, c.etcdKey)
		if err != nil {
			return err
		}
		cli, err = clientv3.New(clientv3.Config{
			Endpoints:   strings.Split(c.etcdEndpoints, ","),
			DialTimeout: 5 * time.Second,
			TLS:         tc,
			Logger:      zap.NewNop(),
		})
		if err != nil {
			return fmt.Errorf("connect to etcd %s: %w", c.etcdEndpoints, err)
		}
	default:
		return errors.New("give -etcd-endpoints (an external cluster) or -embedded-etcd-dir")
	}
	defer cli.Close()

	switch {
	case c.blobDir != "" && c.blobWebDAV != "":
		return errors.New("give either -blob-dir or -blob-webdav, not both")
	case c.blobDir != "":
		blobs, err := blobstore.NewLocal(c.blobDir)
		if err != nil {
			return err
		}
		c.server.Blobs = blobs
	case c.blobWebDAV != "":
		blobs, err := blobstore.NewWebDAV(c.blobWebDAV, filepath.Join(os.TempDir(), "basin-bbs-uploads"), nil)
		if err != nil {
			return err
		}
		c.server.Blobs = blobs
	}
	if c.server.Blobs != nil {
		c.server.BuiltinBuildpacks = buildpacks.Builtin
	}
	srv, err := bbs.NewServer(cli, c.server)
	if err != nil {
		return err
	}
	appLayer := apps.Serve(srv, cli, apps.Config{Prefix: c.server.Store.Prefix, Domain: c.appDomain, Logger: log.With("component", "apps")})
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return srv.Run(gctx) })
	g.Go(func() error { return appLayer.Run(gctx) })
	return g.Wait()
}

func etcdTLS(ca, cert, key string) (*tls.Config, error) {
	if ca == "" && cert == "" {
		return nil, nil
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if ca != "" {
		pem, err := os.ReadFile(ca)
		if err != nil {
			return nil, fmt.Errorf("read etcd CA: %w", err)
		}
		tc.RootCAs = x509.NewCertPool()
		if !tc.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("etcd CA %s holds no PEM certificate", ca)
		}
	}
	if cert != "" {
		kp, err := tls.LoadX509KeyPair(cert, key)
		if err != nil {
			return nil, fmt.Errorf("load etcd client key pair: %w", err)
		}
		tc.Certificates = []tls.Certificate{kp}
	}
	return tc, nil
}
