package bbs

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
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
	Blobs   basinv1.BlobstoreServiceClient
	Staging basinv1.StagingServiceClient
	Logs    basinv1.LogServiceClient
	SSH     basinv1.SSHServiceClient
	conn    *grpc.ClientConn
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
	return &Client{BBSServiceClient: basinv1.NewBBSServiceClient(conn), Blobs: basinv1.NewBlobstoreServiceClient(conn),
		Staging: basinv1.NewStagingServiceClient(conn), Logs: basinv1.NewLogServiceClient(conn),
		SSH: basinv1.NewSSHServiceClient(conn), conn: conn}, nil
}

// Conn is the connection, for the other services the BBS process serves
// (the app layer, staging, logs).
func (c *Client) Conn() *grpc.ClientConn { return c.conn }

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

// UploadBlob streams r to the blobstore; want, when set, is the digest the
// content must have.
func (c *Client) UploadBlob(ctx context.Context, r io.Reader, want string) (digest string, size int64, err error) {
	stream, err := c.Blobs.UploadBlob(ctx)
	if err != nil {
		return "", 0, fmt.Errorf("upload blob: %w", err)
	}
	if err := stream.Send(&basinv1.UploadBlobRequest{Part: &basinv1.UploadBlobRequest_Header{Header: &basinv1.BlobHeader{Digest: want}}}); err != nil {
		_, rerr := stream.CloseAndRecv()
		return "", 0, fmt.Errorf("upload blob: %w", errors.Join(err, rerr))
	}
	buf := make([]byte, 256<<10)
	for {
		n, rerr := r.Read(buf)
		if n > 0 {
			if err := stream.Send(&basinv1.UploadBlobRequest{Part: &basinv1.UploadBlobRequest_Chunk{Chunk: buf[:n]}}); err != nil {
				// The server ended the stream; its reason comes with CloseAndRecv.
				_, cerr := stream.CloseAndRecv()
				return "", 0, fmt.Errorf("upload blob: %w", cerr)
			}
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			stream.CloseSend()
			return "", 0, fmt.Errorf("read blob to upload: %w", rerr)
		}
	}
	resp, err := stream.CloseAndRecv()
	if err != nil {
		return "", 0, fmt.Errorf("upload blob: %w", err)
	}
	return resp.GetDigest(), resp.GetSize(), nil
}

// DownloadBlob writes the blob to w and returns its size.
func (c *Client) DownloadBlob(ctx context.Context, digest string, w io.Writer) (int64, error) {
	stream, err := c.Blobs.DownloadBlob(ctx, &basinv1.DownloadBlobRequest{Digest: digest})
	if err != nil {
		return 0, fmt.Errorf("download blob %s: %w", digest, err)
	}
	var n, size int64
	for {
		msg, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return n, fmt.Errorf("download blob %s: %w", digest, err)
		}
		if msg.GetSize() > 0 {
			size = msg.GetSize()
		}
		m, err := w.Write(msg.GetChunk())
		n += int64(m)
		if err != nil {
			return n, fmt.Errorf("write blob %s: %w", digest, err)
		}
	}
	if n != size {
		return n, fmt.Errorf("download blob %s: got %d of %d bytes", digest, n, size)
	}
	return n, nil
}

// UploadBits sends the header, then r (a zip or tar.gz of the files the
// header does not list as matched; nil when every file matched) in chunks.
func (c *Client) UploadBits(ctx context.Context, header *basinv1.UploadBitsHeader, r io.Reader) (*basinv1.UploadBitsResponse, error) {
	stream, err := c.Staging.UploadBits(ctx)
	if err != nil {
		return nil, fmt.Errorf("upload bits: %w", err)
	}
	if err := stream.Send(&basinv1.UploadBitsRequest{Part: &basinv1.UploadBitsRequest_Header{Header: header}}); err != nil {
		_, rerr := stream.CloseAndRecv()
		return nil, fmt.Errorf("upload bits: %w", errors.Join(err, rerr))
	}
	if r != nil {
		buf := make([]byte, 256<<10)
		for {
			n, rerr := r.Read(buf)
			if n > 0 {
				if err := stream.Send(&basinv1.UploadBitsRequest{Part: &basinv1.UploadBitsRequest_Chunk{Chunk: buf[:n]}}); err != nil {
					_, cerr := stream.CloseAndRecv()
					return nil, fmt.Errorf("upload bits: %w", cerr)
				}
			}
			if rerr == io.EOF {
				break
			}
			if rerr != nil {
				stream.CloseSend()
				return nil, fmt.Errorf("read bits to upload: %w", rerr)
			}
		}
	}
	resp, err := stream.CloseAndRecv()
	if err != nil {
		return nil, fmt.Errorf("upload bits: %w", err)
	}
	return resp, nil
}
