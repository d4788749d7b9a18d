package gorouter

import (
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/basinpaas/basin/gorouter/proxy"
)

func TestNewRefusesBadConfig(t *testing.T) {
	// The client never dials: New must fail before touching etcd.
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{"http://127.0.0.1:1"}, DialTimeout: time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	cases := []struct {
		name string
		cfg  Config
		want string
	}{
		{"no address", Config{}, "addr: required"},
		{"bad balancing", Config{Addr: "127.0.0.1:0", Proxy: proxy.Config{Balancing: "random"}}, "balancing"},
		{"too many attempts", Config{Addr: "127.0.0.1:0", Proxy: proxy.Config{MaxAttempts: 50}}, "max attempts"},
		{"TLS without certificates", Config{Addr: "127.0.0.1:0", TLSAddr: "127.0.0.1:0"}, "tls cert dir"},
		{"TLS with an empty directory", Config{Addr: "127.0.0.1:0", TLSAddr: "127.0.0.1:0", TLSCertDir: t.TempDir()}, "no <name>.crt"},
		{"bad listen address", Config{Addr: "256.0.0.1:0"}, "listen for http"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r, err := New(tc.cfg, cli, logger)
			if err == nil {
				r.closeListeners()
				t.Fatal("accepted")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err %q does not say %q", err, tc.want)
			}
		})
	}
}
