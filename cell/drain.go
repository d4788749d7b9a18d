package cell

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"time"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
)

// DrainTarget says how to reach a cell's rep: plaintext on loopback, or TLS
// verified with CAFile and, when the rep requires one, a client certificate.
type DrainTarget struct {
	Address                   string
	CAFile, CertFile, KeyFile string
}

// Drain asks the cell to evacuate and waits until its instances run
// elsewhere, or timeout passed and the cell stopped them anyway.
func Drain(ctx context.Context, t DrainTarget, timeout time.Duration) error {
	creds := insecure.NewCredentials()
	if t.CAFile != "" {
		pem, err := os.ReadFile(t.CAFile)
		if err != nil {
			return fmt.Errorf("read CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return fmt.Errorf("CA %s holds no PEM certificate", t.CAFile)
		}
		tc := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
		if t.CertFile != "" {
			pair, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile)
			if err != nil {
				return fmt.Errorf("load client key pair: %w", err)
			}
			tc.Certificates = []tls.Certificate{pair}
		}
		creds = credentials.NewTLS(tc)
	}
	conn, err := grpc.NewClient(t.Address, grpc.WithTransportCredentials(creds))
	if err != nil {
		return fmt.Errorf("connect to cell at %s: %w", t.Address, err)
	}
	defer conn.Close()
	// The cell answers once its replacements run or its own timeout passed.
	ctx, cancel := context.WithTimeout(ctx, timeout+30*time.Second)
	defer cancel()
	if _, err := basinv1.NewCellServiceClient(conn).Drain(ctx, &basinv1.DrainRequest{TimeoutMs: timeout.Milliseconds()}); err != nil {
		return fmt.Errorf("drain cell at %s: %w", t.Address, err)
	}
	return nil
}
