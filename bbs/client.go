package bbs

import (
	"context"
	"crypto/tls"
	"fmt"
	"time"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
)

// ClientConfig says how to reach a BBS.
type ClientConfig struct {
	Address string
	// Token is sent as a bearer token (users).
	Token string
	// CAFile verifies the server; CertFile/KeyFile authenticate a component.
	// Plaintext when all are empty.
	CAFile, CertFile, KeyFile string
	ServerName                string
}

// Client is a BBS connection.
type Client struct {
	basinv1.BBSServiceClient
	conn *grpc.ClientConn
}

// Dial connects to a BBS. The connection is lazy: the first call dials.
func Dial(cfg ClientConfig) (*Client, error) {
	opts := []grpc.DialOption{
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64 << 20)),
	}
	secure := cfg.CAFile != "" || cfg.CertFile != ""
	if secure {
		tc := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: cfg.ServerName}
		if cfg.CAFile != "" {
			pool, err := loadPool(cfg.CAFile)
			if err != nil {
				return nil, err
			}
			tc.RootCAs = pool
		}
		if cfg.CertFile != "" {
			cert, err := tls.LoadX509KeyPair(cfg.CertFile, cfg.KeyFile)
			if err != nil {
				return nil, fmt.Errorf("load client key pair %s: %w", cfg.CertFile, err)
			}
			tc.Certificates = []tls.Certificate{cert}
		}
		opts = append(opts, grpc.WithTransportCredentials(credentials.NewTLS(tc)))
	} else {
		opts = append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()))
	}
	if cfg.Token != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(TokenCredentials{Token: cfg.Token, Insecure: !secure}))
	}
	conn, err := grpc.NewClient(cfg.Address, opts...)
	if err != nil {
		return nil, fmt.Errorf("connect to BBS at %s: %w", cfg.Address, err)
	}
	return &Client{BBSServiceClient: basinv1.NewBBSServiceClient(conn), conn: conn}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// WaitReady polls until the BBS answers or ctx ends.
func (c *Client) WaitReady(ctx context.Context) error {
	for {
		_, err := c.ListCells(ctx, &basinv1.ListCellsRequest{})
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("BBS not ready: %w (last error: %v)", ctx.Err(), err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}
