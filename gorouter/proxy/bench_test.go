package proxy

import (
	"bufio"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"testing"

	"github.com/basinpaas/basin/gorouter/routetable"
)

// BenchmarkProxyKeepAlive measures one keep-alive request through the
// HTTP/1.1 path end to end on loopback, client and backend included; its
// allocs/op are the proxy's own plus the backend's.
func BenchmarkProxyKeepAlive(b *testing.B) {
	backendLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	// A minimal backend that answers every request on a connection with a
	// fixed response, so the numbers are about the proxy.
	go func() {
		for {
			c, err := backendLn.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				br := bufio.NewReader(c)
				for {
					req, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					io.Copy(io.Discard, req.Body)
					io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nHello, World!")
				}
			}()
		}
	}()
	defer backendLn.Close()

	tb := routetable.New()
	tb.Apply([]routetable.Change{{Key: "k", Endpoint: &routetable.Endpoint{Host: "bench.test", Addr: backendLn.Addr().String()}}})
	p, err := New(Config{}, tb, nil, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		b.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	go p.Serve(ln)
	defer func() {
		ln.Close()
		p.Shutdown(b.Context())
	}()

	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	br := bufio.NewReader(c)
	req := []byte("GET / HTTP/1.1\r\nHost: bench.test\r\nUser-Agent: bench\r\n\r\n")
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := c.Write(req); err != nil {
			b.Fatal(err)
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			b.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			b.Fatalf("status %d", resp.StatusCode)
		}
	}
}

// BenchmarkLookup is the route table read on every request, in a table of
// 100,000 hosts.
func BenchmarkLookup(b *testing.B) {
	tb := routetable.New()
	var all []*routetable.Endpoint
	for i := 0; i < 100000; i++ {
		h := "app-" + strings.Repeat("x", i%7) + string(rune('a'+i%26)) + itoa(i) + ".apps.test"
		all = append(all, &routetable.Endpoint{Key: h, Host: h, Addr: "127.0.0.1:1"})
	}
	tb.Replace(all)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if tb.Lookup(all[i%len(all)].Host, "/x") == nil {
			b.Fatal("miss")
		}
	}
}

func itoa(i int) string {
	var b [20]byte
	n := len(b)
	for {
		n--
		b[n] = byte('0' + i%10)
		i /= 10
		if i == 0 {
			return string(b[n:])
		}
	}
}
