//go:build integration

package integration

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/net/websocket"
	"google.golang.org/protobuf/proto"

	"github.com/basinpaas/basin/bbs"
	"github.com/basinpaas/basin/bbs/embeddedetcd"
	"github.com/basinpaas/basin/gorouter"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

// routerEtcd is one embedded etcd for every router test of this binary;
// tests keep apart by using their own key prefix. The package's TestMain
// is another component's, so the data dir outlives the binary: its name
// carries the pid, and the next run removes the dirs of dead pids.
var routerEtcd = sync.OnceValues(func() (*embeddedetcd.Etcd, error) {
	removeStaleRouterEtcdDirs()
	dir, err := os.MkdirTemp("", fmt.Sprintf("basin-router-etcd-%d-", os.Getpid()))
	if err != nil {
		return nil, err
	}
	return embeddedetcd.Start(context.Background(), embeddedetcd.Config{Dir: dir})
})

func removeStaleRouterEtcdDirs() {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), "basin-router-etcd-*"))
	for _, d := range dirs {
		pidPart, _, named := strings.Cut(strings.TrimPrefix(filepath.Base(d), "basin-router-etcd-"), "-")
		pid, err := strconv.Atoi(pidPart)
		if !named || err != nil || pid == os.Getpid() {
			continue
		}
		if syscall.Kill(pid, 0) == syscall.ESRCH {
			os.RemoveAll(d)
		}
	}
}

type routerEnv struct {
	t      *testing.T
	cli    *clientv3.Client
	keys   bbs.Keys
	router *gorouter.Router
	url    string
	client *http.Client
}

func newRouterEnv(t *testing.T, mutate func(*gorouter.Config)) *routerEnv {
	t.Helper()
	e, err := routerEtcd()
	if err != nil {
		t.Fatalf("start embedded etcd: %v", err)
	}
	cli, err := e.Client()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	prefix := fmt.Sprintf("/router-test/%s-%d/", t.Name(), time.Now().UnixNano())
	cfg := gorouter.Config{
		Prefix:       prefix,
		Addr:         "127.0.0.1:0",
		HealthAddr:   "127.0.0.1:0",
		DebugAddr:    "127.0.0.1:0",
		DrainTimeout: 5 * time.Second,
	}
	cfg.Proxy.SuspectFor = 30 * time.Second
	if mutate != nil {
		mutate(&cfg)
	}
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	r, err := gorouter.New(cfg, cli, logger)
	if err != nil {
		t.Fatalf("new router: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("router run: %v", err)
		}
	})
	select {
	case <-r.Synced():
	case <-time.After(10 * time.Second):
		t.Fatal("route table not synced after 10s")
	}
	tr := &http.Transport{MaxIdleConnsPerHost: 16}
	t.Cleanup(tr.CloseIdleConnections)
	return &routerEnv{t: t, cli: cli, keys: bbs.NewKeys(prefix), router: r,
		url: "http://" + r.Addr().String(), client: &http.Client{Transport: tr, Timeout: 10 * time.Second}}
}

// putRoute registers addr for host as a cell would; lease 0 means none.
func (env *routerEnv) putRoute(host, path, guid string, index int32, addr string, lease clientv3.LeaseID) string {
	env.t.Helper()
	h, p, err := net.SplitHostPort(addr)
	if err != nil {
		env.t.Fatal(err)
	}
	port, _ := strconv.Atoi(p)
	val, err := proto.Marshal(&basinv1.RouteEndpoint{
		Host: host, Path: path, ProcessGuid: guid, Index: index,
		InstanceGuid: fmt.Sprintf("%s-instance-%d", guid, index), Address: h, Port: uint32(port),
	})
	if err != nil {
		env.t.Fatal(err)
	}
	key := env.keys.Route(host, path, guid, index)
	var opts []clientv3.OpOption
	if lease != 0 {
		opts = append(opts, clientv3.WithLease(lease))
	}
	if _, err := env.cli.Put(context.Background(), key, string(val), opts...); err != nil {
		env.t.Fatalf("put route %s: %v", key, err)
	}
	return key
}

// waitEndpoints waits until host/path has n endpoints in the table.
func (env *routerEnv) waitEndpoints(host, path string, n int) {
	env.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		p := env.router.Table().Lookup(host, path)
		if (p == nil && n == 0) || (p != nil && len(p.Endpoints) == n) {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	env.t.Fatalf("host %s%s: never got %d endpoints", host, path, n)
}

func (env *routerEnv) get(host, path string, hdr http.Header) (*http.Response, string) {
	env.t.Helper()
	req, err := http.NewRequest("GET", env.url+path, nil)
	if err != nil {
		env.t.Fatal(err)
	}
	req.Host = host
	for k, v := range hdr {
		req.Header[k] = v
	}
	resp, err := env.client.Do(req)
	if err != nil {
		env.t.Fatalf("GET %s%s: %v", host, path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		env.t.Fatalf("read body of %s%s: %v", host, path, err)
	}
	return resp, string(body)
}

// backend is a plain Go HTTP server answering its name and recording the
// last request it saw.
type backend struct {
	name string
	srv  *httptest.Server
	hits atomic.Int64
	mu   sync.Mutex
	last *http.Request
}

func newBackend(t *testing.T, name string, h http.HandlerFunc) *backend {
	b := &backend{name: name}
	b.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b.hits.Add(1)
		b.mu.Lock()
		b.last = r.Clone(context.Background())
		b.mu.Unlock()
		if h != nil {
			h(w, r)
			return
		}
		io.WriteString(w, name)
	}))
	t.Cleanup(b.srv.Close)
	return b
}

func (b *backend) addr() string { return b.srv.Listener.Addr().String() }

func TestRouterRoundRobinSpreadsEvenly(t *testing.T) {
	env := newRouterEnv(t, nil)
	counts := map[string]int{}
	for i := 0; i < 3; i++ {
		b := newBackend(t, fmt.Sprintf("b%d", i), nil)
		env.putRoute("rr.apps.test", "", "rr-guid", int32(i), b.addr(), 0)
		counts[b.name] = 0
	}
	env.waitEndpoints("rr.apps.test", "/", 3)
	for i := 0; i < 300; i++ {
		resp, body := env.get("rr.apps.test", "/", nil)
		if resp.StatusCode != 200 {
			t.Fatalf("request %d: status %d body %q", i, resp.StatusCode, body)
		}
		counts[body]++
	}
	for name, n := range counts {
		if n != 100 {
			t.Errorf("backend %s got %d of 300 requests, want 100 (all: %v)", name, n, counts)
		}
	}
}

func TestRouterUnknownHost404NamesHost(t *testing.T) {
	env := newRouterEnv(t, nil)
	resp, body := env.get("nope.apps.test", "/", nil)
	if resp.StatusCode != 404 || !strings.Contains(body, "nope.apps.test") {
		t.Fatalf("unknown host: status %d body %q, want 404 naming the host", resp.StatusCode, body)
	}
	if got := resp.Header.Get("X-Cf-Routererror"); got != "unknown_route" {
		t.Errorf("X-Cf-Routererror = %q, want unknown_route", got)
	}
}

func TestRouterDeletingRouteStopsTraffic(t *testing.T) {
	env := newRouterEnv(t, nil)
	a, b := newBackend(t, "a", nil), newBackend(t, "b", nil)
	keyA := env.putRoute("del.apps.test", "", "del", 0, a.addr(), 0)
	env.putRoute("del.apps.test", "", "del", 1, b.addr(), 0)
	env.waitEndpoints("del.apps.test", "/", 2)
	if _, err := env.cli.Delete(context.Background(), keyA); err != nil {
		t.Fatal(err)
	}
	env.waitEndpoints("del.apps.test", "/", 1)
	before := a.hits.Load()
	for i := 0; i < 50; i++ {
		if resp, body := env.get("del.apps.test", "/", nil); resp.StatusCode != 200 || body != "b" {
			t.Fatalf("after delete: status %d body %q, want 200 from b", resp.StatusCode, body)
		}
	}
	if n := a.hits.Load() - before; n != 0 {
		t.Fatalf("deleted endpoint got %d requests", n)
	}
}

func TestRouterLeaseExpiryRemovesRoutes(t *testing.T) {
	env := newRouterEnv(t, nil)
	a, b := newBackend(t, "a", nil), newBackend(t, "b", nil)
	lease, err := env.cli.Grant(context.Background(), 2)
	if err != nil {
		t.Fatal(err)
	}
	env.putRoute("lease-one.apps.test", "", "l1", 0, a.addr(), lease.ID)
	env.putRoute("lease-two.apps.test", "", "l2", 0, b.addr(), lease.ID)
	env.putRoute("lease-two.apps.test", "", "l2", 1, a.addr(), 0) // another cell's, no lease
	env.waitEndpoints("lease-one.apps.test", "/", 1)
	env.waitEndpoints("lease-two.apps.test", "/", 2)
	// Nobody keeps the lease alive: the cell is gone.
	deadline := time.Now().Add(15 * time.Second)
	for env.router.Table().Lookup("lease-one.apps.test", "/") != nil {
		if time.Now().After(deadline) {
			t.Fatal("routes of the expired lease still in the table after 15s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	env.waitEndpoints("lease-two.apps.test", "/", 1)
	if resp, _ := env.get("lease-one.apps.test", "/", nil); resp.StatusCode != 404 {
		t.Fatalf("expired route: status %d, want 404", resp.StatusCode)
	}
	for i := 0; i < 20; i++ {
		if resp, body := env.get("lease-two.apps.test", "/", nil); resp.StatusCode != 200 || body != "a" {
			t.Fatalf("surviving route: status %d body %q, want 200 from a", resp.StatusCode, body)
		}
	}
}

func TestRouterDeadEndpointCostsNoFailedRequest(t *testing.T) {
	env := newRouterEnv(t, nil)
	live := newBackend(t, "live", nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	ln.Close() // the port is closed: connecting fails at once
	env.putRoute("dead.apps.test", "", "dead", 0, dead, 0)
	env.putRoute("dead.apps.test", "", "dead", 1, live.addr(), 0)
	env.putRoute("dead.apps.test", "", "dead", 2, dead, 0)
	env.waitEndpoints("dead.apps.test", "/", 3)
	for i := 0; i < 100; i++ {
		if resp, body := env.get("dead.apps.test", "/", nil); resp.StatusCode != 200 || body != "live" {
			t.Fatalf("request %d: status %d body %q, want 200 from live", i, resp.StatusCode, body)
		}
	}
	// With only dead endpoints left the router says so.
	env.putRoute("alldead.apps.test", "", "alldead", 0, dead, 0)
	env.waitEndpoints("alldead.apps.test", "/", 1)
	if resp, _ := env.get("alldead.apps.test", "/", nil); resp.StatusCode != 503 {
		t.Fatalf("only dead endpoints: status %d, want 503", resp.StatusCode)
	}
}

func TestRouterWebSocketEcho(t *testing.T) {
	env := newRouterEnv(t, nil)
	ws := httptest.NewServer(websocket.Handler(func(c *websocket.Conn) { io.Copy(c, c) }))
	t.Cleanup(ws.Close)
	env.putRoute("ws.apps.test", "", "ws", 0, ws.Listener.Addr().String(), 0)
	env.waitEndpoints("ws.apps.test", "/", 1)

	wcfg, err := websocket.NewConfig("ws://ws.apps.test/echo", "http://ws.apps.test/")
	if err != nil {
		t.Fatal(err)
	}
	raw, err := net.Dial("tcp", env.router.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	raw.SetDeadline(time.Now().Add(10 * time.Second))
	conn, err := websocket.NewClient(wcfg, raw)
	if err != nil {
		t.Fatalf("websocket handshake through the router: %v", err)
	}
	for _, msg := range []string{"hello", strings.Repeat("x", 100000), "bye"} {
		if err := websocket.Message.Send(conn, msg); err != nil {
			t.Fatalf("send: %v", err)
		}
		// The echo server writes back what each read returned, so a long
		// message may come back in several frames.
		var got string
		for len(got) < len(msg) {
			var part string
			if err := websocket.Message.Receive(conn, &part); err != nil {
				t.Fatalf("receive: %v", err)
			}
			got += part
		}
		if got != msg {
			t.Fatalf("echo of %d bytes came back as %d bytes", len(msg), len(got))
		}
	}
}

func TestRouterRefusesSmuggling(t *testing.T) {
	env := newRouterEnv(t, nil)
	b := newBackend(t, "b", nil)
	env.putRoute("smuggle.apps.test", "", "sm", 0, b.addr(), 0)
	env.waitEndpoints("smuggle.apps.test", "/", 1)

	cases := []struct {
		name, raw string
		status    int
	}{
		{"CL.TE", "POST / HTTP/1.1\r\nHost: smuggle.apps.test\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG", 400},
		{"TE.CL", "POST / HTTP/1.1\r\nHost: smuggle.apps.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n", 400},
		{"conflicting CL", "POST / HTTP/1.1\r\nHost: smuggle.apps.test\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400},
		{"obfuscated TE", "POST / HTTP/1.1\r\nHost: smuggle.apps.test\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 501},
		{"TE list", "POST / HTTP/1.1\r\nHost: smuggle.apps.test\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 501},
		{"space before colon", "POST / HTTP/1.1\r\nHost: smuggle.apps.test\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400},
		{"bad header name", "GET / HTTP/1.1\r\nHost: smuggle.apps.test\r\nX[Bad]: 1\r\n\r\n", 400},
		{"obs-fold", "GET / HTTP/1.1\r\nHost: smuggle.apps.test\r\nX-A: 1\r\n  folded\r\n\r\n", 400},
		{"two hosts", "GET / HTTP/1.1\r\nHost: smuggle.apps.test\r\nHost: other.apps.test\r\n\r\n", 400},
		{"no host", "GET / HTTP/1.1\r\n\r\n", 400},
		{"CR in value", "GET / HTTP/1.1\r\nHost: smuggle.apps.test\r\nX-A: a\rb\r\n\r\n", 400},
		{"huge header", "GET / HTTP/1.1\r\nHost: smuggle.apps.test\r\nX-A: " + strings.Repeat("a", 70<<10) + "\r\n\r\n", 431},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := b.hits.Load()
			c, err := net.Dial("tcp", env.router.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			go io.WriteString(c, tc.raw) // the router may answer before reading it all
			br := bufio.NewReader(c)
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("read response: %v", err)
			}
			io.Copy(io.Discard, resp.Body)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d", resp.StatusCode, tc.status)
			}
			// The router closes the connection: nothing after it is parsed.
			if _, err := br.ReadByte(); err == nil {
				t.Fatal("connection still open after a refused request")
			}
			if n := b.hits.Load() - before; n != 0 {
				t.Fatalf("backend saw %d requests", n)
			}
		})
	}
}

func TestRouterStickySessions(t *testing.T) {
	env := newRouterEnv(t, nil)
	for i := 0; i < 3; i++ {
		name := fmt.Sprintf("s%d", i)
		b := newBackend(t, name, func(w http.ResponseWriter, r *http.Request) {
			if _, err := r.Cookie("JSESSIONID"); err != nil {
				http.SetCookie(w, &http.Cookie{Name: "JSESSIONID", Value: "sess-" + name, Path: "/"})
			}
			io.WriteString(w, name)
		})
		env.putRoute("sticky.apps.test", "", "sticky", int32(i), b.addr(), 0)
	}
	env.waitEndpoints("sticky.apps.test", "/", 3)
	jar, _ := cookiejar.New(nil)
	client := &http.Client{Jar: jar, Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp", env.router.Addr().String())
		},
	}}
	get := func() (string, *http.Response) {
		resp, err := client.Get("http://sticky.apps.test/")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return string(body), resp
	}
	first, resp := get()
	var vcap *http.Cookie
	for _, c := range resp.Cookies() {
		if c.Name == "__VCAP_ID__" {
			vcap = c
		}
	}
	if vcap == nil || vcap.Value != "sticky-instance-"+first[1:] || !vcap.HttpOnly {
		t.Fatalf("first response cookies %v: want an HttpOnly __VCAP_ID__ naming instance of %s", resp.Cookies(), first)
	}
	for i := 0; i < 30; i++ {
		if got, _ := get(); got != first {
			t.Fatalf("request %d went to %s, pinned to %s", i, got, first)
		}
	}
	// Without the cookie requests spread again.
	seen := map[string]bool{}
	for i := 0; i < 6; i++ {
		_, body := env.get("sticky.apps.test", "/", nil)
		seen[body] = true
	}
	if len(seen) < 2 {
		t.Fatalf("without cookies all requests went to %v", seen)
	}
}

func TestRouterHeadersAndPaths(t *testing.T) {
	env := newRouterEnv(t, nil)
	root := newBackend(t, "root", nil)
	api := newBackend(t, "api", nil)
	wild := newBackend(t, "wild", nil)
	env.putRoute("hdr.apps.test", "", "root", 0, root.addr(), 0)
	env.putRoute("hdr.apps.test", "/api", "api", 0, api.addr(), 0)
	env.putRoute("hdr.apps.test", "/api", "api", 1, api.addr(), 0)
	env.putRoute("*.wild.test", "", "wild", 0, wild.addr(), 0)
	env.waitEndpoints("hdr.apps.test", "/api", 2)
	env.waitEndpoints("x.wild.test", "/", 1)

	for _, tc := range []struct{ host, path, want string }{
		{"hdr.apps.test", "/", "root"},
		{"hdr.apps.test", "/apix", "root"},
		{"hdr.apps.test", "/api", "api"},
		{"hdr.apps.test", "/api/v1?q=1", "api"},
		{"HDR.Apps.Test:80", "/api/", "api"},
		{"anything.wild.test", "/", "wild"},
		{"a.b.wild.test", "/x", "wild"},
	} {
		if resp, body := env.get(tc.host, tc.path, nil); resp.StatusCode != 200 || body != tc.want {
			t.Errorf("%s%s: status %d body %q, want %s", tc.host, tc.path, resp.StatusCode, body, tc.want)
		}
	}

	resp, _ := env.get("hdr.apps.test", "/", http.Header{
		"X-Forwarded-For": {"10.1.2.3"},
		"Connection":      {"X-Secret"},
		"X-Secret":        {"hop"},
		"Keep-Alive":      {"timeout=5"},
	})
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	root.mu.Lock()
	got := root.last
	root.mu.Unlock()
	checks := map[string]string{
		"X-Forwarded-For":   "10.1.2.3, 127.0.0.1",
		"X-Forwarded-Proto": "http",
		"X-Forwarded-Host":  "hdr.apps.test",
		"X-Secret":          "",
		"Keep-Alive":        "",
	}
	for k, want := range checks {
		if v := got.Header.Get(k); v != want {
			t.Errorf("backend saw %s = %q, want %q", k, v, want)
		}
	}
	if got.Host != "hdr.apps.test" {
		t.Errorf("backend saw Host %q, want hdr.apps.test", got.Host)
	}
	rid := got.Header.Get("X-Request-Id")
	if len(rid) != 36 || got.Header.Get("X-Vcap-Request-Id") != rid {
		t.Errorf("request ids: X-Request-Id %q X-Vcap-Request-Id %q", rid, got.Header.Get("X-Vcap-Request-Id"))
	}
	env.get("hdr.apps.test", "/", http.Header{"X-Request-Id": {"given-id"}})
	root.mu.Lock()
	got = root.last
	root.mu.Unlock()
	if got.Header.Get("X-Request-Id") != "given-id" || got.Header.Get("X-Vcap-Request-Id") != "given-id" {
		t.Errorf("given request id not passed through: %v", got.Header)
	}

	// X-CF-App-Instance targets one instance.
	inst := newBackend(t, "inst1", nil)
	env.putRoute("inst.apps.test", "", "ig", 0, root.addr(), 0)
	env.putRoute("inst.apps.test", "", "ig", 1, inst.addr(), 0)
	env.waitEndpoints("inst.apps.test", "/", 2)
	for i := 0; i < 5; i++ {
		if resp, body := env.get("inst.apps.test", "/", http.Header{"X-Cf-App-Instance": {"ig:1"}}); resp.StatusCode != 200 || body != "inst1" {
			t.Fatalf("X-CF-App-Instance ig:1: status %d body %q", resp.StatusCode, body)
		}
	}
	if resp, _ := env.get("inst.apps.test", "/", http.Header{"X-Cf-App-Instance": {"ig:7"}}); resp.StatusCode != 400 {
		t.Fatalf("X-CF-App-Instance of a missing instance: status %d, want 400", resp.StatusCode)
	}
}

func TestRouterStreamsAndPostsBodies(t *testing.T) {
	env := newRouterEnv(t, nil)
	step := make(chan struct{})
	b := newBackend(t, "stream", func(w http.ResponseWriter, r *http.Request) {
		if r.Method == "POST" {
			n, _ := io.Copy(io.Discard, r.Body)
			fmt.Fprintf(w, "got %d", n)
			return
		}
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: one\n\n")
		w.(http.Flusher).Flush()
		<-step // the second event waits until the client saw the first
		io.WriteString(w, "data: two\n\n")
	})
	_ = b
	env.putRoute("stream.apps.test", "", "st", 0, b.addr(), 0)
	env.waitEndpoints("stream.apps.test", "/", 1)

	req, _ := http.NewRequest("GET", env.url+"/", nil)
	req.Host = "stream.apps.test"
	resp, err := env.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(resp.Body)
	line, err := br.ReadString('\n')
	if err != nil || line != "data: one\n" {
		t.Fatalf("first event %q, %v: the router did not stream", line, err)
	}
	close(step)
	rest, _ := io.ReadAll(br)
	resp.Body.Close()
	if string(rest) != "\ndata: two\n\n" {
		t.Fatalf("rest of stream %q", rest)
	}

	for _, chunked := range []bool{false, true} {
		body := strings.Repeat("0123456789", 100000)
		var rd io.Reader = strings.NewReader(body)
		if chunked {
			rd = io.MultiReader(rd) // hides the length: sent chunked
		}
		req, _ := http.NewRequest("POST", env.url+"/", rd)
		req.Host = "stream.apps.test"
		resp, err := env.client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		got, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(got) != "got 1000000" {
			t.Fatalf("POST (chunked %v): %q", chunked, got)
		}
	}
}

func TestRouterTLSWithSNIAndHTTP2(t *testing.T) {
	dir := t.TempDir()
	writeCert(t, dir, "one", "*.one.test")
	writeCert(t, dir, "two", "app.two.test")
	env := newRouterEnv(t, func(c *gorouter.Config) {
		c.TLSAddr = "127.0.0.1:0"
		c.TLSCertDir = dir
		c.TLSReloadInterval = 50 * time.Millisecond
	})
	b := newBackend(t, "tls", func(w http.ResponseWriter, r *http.Request) {
		if r.Method == "POST" {
			n, _ := io.Copy(io.Discard, r.Body)
			fmt.Fprintf(w, "posted %d", n)
			return
		}
		fmt.Fprintf(w, "%s %s", r.Header.Get("X-Forwarded-Proto"), r.Host)
	})
	env.putRoute("app.two.test", "", "tls", 0, b.addr(), 0)
	env.putRoute("x.one.test", "", "tls", 0, b.addr(), 0)
	env.waitEndpoints("app.two.test", "/", 1)
	env.waitEndpoints("x.one.test", "/", 1)

	for _, host := range []string{"app.two.test", "x.one.test"} {
		for _, h2 := range []bool{true, false} {
			var seen *x509.Certificate
			tr := &http.Transport{
				ForceAttemptHTTP2: h2,
				TLSClientConfig: &tls.Config{InsecureSkipVerify: true, VerifyConnection: func(cs tls.ConnectionState) error {
					seen = cs.PeerCertificates[0]
					return nil
				}},
				DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
					var d net.Dialer
					return d.DialContext(ctx, "tcp", env.router.TLSAddr().String())
				},
			}
			if !h2 {
				tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
			}
			resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get("https://" + host + "/")
			if err != nil {
				t.Fatalf("https %s (h2 %v): %v", host, h2, err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			tr.CloseIdleConnections()
			if want := "https " + host; string(body) != want {
				t.Errorf("https %s: body %q, want %q", host, body, want)
			}
			if wantMajor := map[bool]int{true: 2, false: 1}[h2]; resp.ProtoMajor != wantMajor {
				t.Errorf("https %s: protocol %s, want major %d", host, resp.Proto, wantMajor)
			}
			if seen == nil || seen.VerifyHostname(host) != nil {
				t.Errorf("https %s: certificate for %v served", host, seen.DNSNames)
			}
			// A streamed request body (no length) crosses HTTP/2 too.
			req, _ := http.NewRequest("POST", "https://"+host+"/", io.MultiReader(strings.NewReader(strings.Repeat("z", 300000))))
			resp, err = (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Do(req)
			if err != nil {
				t.Fatalf("POST https %s (h2 %v): %v", host, h2, err)
			}
			body, _ = io.ReadAll(resp.Body)
			resp.Body.Close()
			tr.CloseIdleConnections()
			if string(body) != "posted 300000" {
				t.Errorf("POST https %s (h2 %v): %q", host, h2, body)
			}
		}
	}

	// A certificate added to the directory is served without a restart.
	writeCert(t, dir, "three", "app.three.test")
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, err := tls.Dial("tcp", env.router.TLSAddr().String(), &tls.Config{ServerName: "app.three.test", InsecureSkipVerify: true})
		if err != nil {
			t.Fatal(err)
		}
		cert := c.ConnectionState().PeerCertificates[0]
		c.Close()
		if cert.VerifyHostname("app.three.test") == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("new certificate not served after 5s; got one for %v", cert.DNSNames)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestRouterHealthAndMetrics(t *testing.T) {
	env := newRouterEnv(t, nil)
	resp, err := http.Get("http://" + env.router.HealthAddr().String() + "/health")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("health: %d", resp.StatusCode)
	}
	env.get("unknown.apps.test", "/", nil)
	resp, err = http.Get("http://" + env.router.DebugAddr().String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{`basin_router_requests_total{class="4xx"} 1`, "basin_router_routes 0", "basin_router_request_duration_seconds_bucket"} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

func TestRouterDrainsGracefully(t *testing.T) {
	e, err := routerEtcd()
	if err != nil {
		t.Fatal(err)
	}
	cli, err := e.Client()
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	release := make(chan struct{})
	started := make(chan struct{})
	slow := newBackend(t, "slow", func(w http.ResponseWriter, r *http.Request) {
		close(started)
		<-release
		io.WriteString(w, "done")
	})
	prefix := "/router-test/drain/"
	r, err := gorouter.New(gorouter.Config{Prefix: prefix, Addr: "127.0.0.1:0", HealthAddr: "127.0.0.1:0",
		DrainWait: 300 * time.Millisecond, DrainTimeout: 10 * time.Second}, cli, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	env := &routerEnv{t: t, cli: cli, keys: bbs.NewKeys(prefix), router: r, url: "http://" + r.Addr().String(),
		client: &http.Client{Timeout: 10 * time.Second}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	<-r.Synced()
	env.putRoute("drain.apps.test", "", "dr", 0, slow.addr(), 0)
	env.waitEndpoints("drain.apps.test", "/", 1)

	got := make(chan string, 1)
	go func() {
		req, _ := http.NewRequest("GET", env.url+"/", nil)
		req.Host = "drain.apps.test"
		resp, err := env.client.Do(req)
		if err != nil {
			got <- err.Error()
			return
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		got <- string(b)
	}()
	<-started
	cancel()
	health := "http://" + r.HealthAddr().String() + "/health"
	deadline := time.Now().Add(5 * time.Second)
	for {
		resp, err := http.Get(health)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 503 {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("health never turned 503 while draining")
		}
		time.Sleep(10 * time.Millisecond)
	}
	close(release)
	if body := <-got; body != "done" {
		t.Fatalf("request in flight during drain: %q", body)
	}
	if err := <-done; err != nil {
		t.Fatalf("run: %v", err)
	}
}

// writeCert writes a self-signed <name>.crt/.key for dnsName into dir.
func writeCert(t *testing.T, dir, name, dnsName string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: dnsName},
		DNSNames:     []string{dnsName},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, name+".crt"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, name+".key"), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// syncBuffer collects the access log while the router writes it.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestRouterTimeoutIs504AndClientGoneIs499(t *testing.T) {
	var accessLog syncBuffer
	env := newRouterEnv(t, func(c *gorouter.Config) {
		c.Proxy.ResponseHeaderTimeout = 2 * time.Second
		c.Proxy.AccessLog = &accessLog
	})
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	slow := newBackend(t, "slow", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-time.After(time.Duration(len(r.URL.Path)) * 100 * time.Millisecond):
		}
		io.WriteString(w, "late")
	})
	env.putRoute("slow.apps.test", "", "slow", 0, slow.addr(), 0)
	env.waitEndpoints("slow.apps.test", "/", 1)

	// The path length sets the work: 3.1 s, over the 2 s head timeout.
	resp, body := env.get("slow.apps.test", "/"+strings.Repeat("a", 30), http.Header{"X-Request-Id": {"timeout-req"}})
	if resp.StatusCode != 504 {
		t.Fatalf("slow endpoint: status %d body %q, want 504", resp.StatusCode, body)
	}

	// The client hangs up while the endpoint takes 1.3 s (more than the 1 s
	// after which the router checks on its client, less than the timeout).
	c, err := net.Dial("tcp", env.router.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(c, "GET /"+strings.Repeat("b", 12)+" HTTP/1.1\r\nHost: slow.apps.test\r\nX-Request-Id: gone-req\r\n\r\n")
	time.Sleep(200 * time.Millisecond)
	c.Close()

	deadline := time.Now().Add(5 * time.Second)
	for {
		log := accessLog.String()
		if strings.Contains(log, "gone-req") && strings.Contains(log, "timeout-req") {
			for _, ln := range strings.Split(log, "\n") {
				switch {
				case strings.Contains(ln, "timeout-req") && !strings.Contains(ln, `" 504 `):
					t.Errorf("timeout logged as %q, want 504", ln)
				case strings.Contains(ln, "gone-req") && !strings.Contains(ln, `" 499 `):
					t.Errorf("client gone logged as %q, want 499", ln)
				}
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("access log lacks the requests:\n%s", log)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestRouterReplaysOnConnectionTheEndpointClosedIdle(t *testing.T) {
	env := newRouterEnv(t, nil)
	b := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "fresh")
	}))
	// The endpoint drops idle keep-alive connections quickly; the router's
	// pooled one is then dead when the next request takes it.
	b.Config.IdleTimeout = 50 * time.Millisecond
	b.Start()
	t.Cleanup(b.Close)
	env.putRoute("idle.apps.test", "", "idle", 0, b.Listener.Addr().String(), 0)
	env.waitEndpoints("idle.apps.test", "/", 1)
	for i := 0; i < 5; i++ {
		if resp, body := env.get("idle.apps.test", "/", nil); resp.StatusCode != 200 || body != "fresh" {
			t.Fatalf("request %d: status %d body %q", i, resp.StatusCode, body)
		}
		time.Sleep(150 * time.Millisecond)
	}
}

func TestRouterHTTP1Framing(t *testing.T) {
	env := newRouterEnv(t, nil)
	b := newBackend(t, "frames", func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/chunked":
			io.WriteString(w, "part1-")
			w.(http.Flusher).Flush()
			io.WriteString(w, "part2")
		case "/echo":
			body, _ := io.ReadAll(r.Body)
			fmt.Fprintf(w, "%s:%s", r.Method, body)
		default:
			w.Header().Set("Content-Length", "7")
			io.WriteString(w, "default")
		}
	})
	env.putRoute("frames.apps.test", "", "fr", 0, b.addr(), 0)
	env.waitEndpoints("frames.apps.test", "/", 1)

	exchange := func(t *testing.T, raw string, n int) ([]*http.Response, []string, *bufio.Reader) {
		t.Helper()
		c, err := net.Dial("tcp", env.router.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.WriteString(c, raw); err != nil {
			t.Fatal(err)
		}
		br := bufio.NewReader(c)
		var resps []*http.Response
		var bodies []string
		for i := 0; i < n; i++ {
			method := "GET"
			if strings.Contains(raw, "HEAD ") && i == 0 {
				method = "HEAD"
			}
			resp, err := http.ReadResponse(br, &http.Request{Method: method})
			if err != nil {
				t.Fatalf("response %d: %v", i, err)
			}
			body, err := io.ReadAll(resp.Body)
			if err != nil {
				t.Fatalf("body %d: %v", i, err)
			}
			resps = append(resps, resp)
			bodies = append(bodies, string(body))
		}
		return resps, bodies, br
	}

	t.Run("pipelined", func(t *testing.T) {
		req := "GET /a HTTP/1.1\r\nHost: frames.apps.test\r\n\r\n"
		post := "POST /echo HTTP/1.1\r\nHost: frames.apps.test\r\nContent-Length: 3\r\n\r\nabc"
		_, bodies, _ := exchange(t, req+post+req, 3)
		if fmt.Sprint(bodies) != "[default POST:abc default]" {
			t.Fatalf("pipelined bodies %q", bodies)
		}
	})
	t.Run("chunked to 1.1, close-delimited to 1.0", func(t *testing.T) {
		resps, bodies, _ := exchange(t, "GET /chunked HTTP/1.1\r\nHost: frames.apps.test\r\n\r\n", 1)
		if bodies[0] != "part1-part2" || len(resps[0].TransferEncoding) == 0 {
			t.Fatalf("1.1: body %q transfer-encoding %v", bodies[0], resps[0].TransferEncoding)
		}
		resps, bodies, br := exchange(t, "GET /chunked HTTP/1.0\r\nHost: frames.apps.test\r\n\r\n", 1)
		if bodies[0] != "part1-part2" || len(resps[0].TransferEncoding) != 0 || !resps[0].Close {
			t.Fatalf("1.0: body %q transfer-encoding %v close %v", bodies[0], resps[0].TransferEncoding, resps[0].Close)
		}
		if _, err := br.ReadByte(); err == nil {
			t.Fatal("1.0 connection stayed open after a close-delimited body")
		}
	})
	t.Run("HEAD keeps length, sends no body", func(t *testing.T) {
		resps, _, _ := exchange(t, "HEAD /x HTTP/1.1\r\nHost: frames.apps.test\r\n\r\nGET /y HTTP/1.1\r\nHost: frames.apps.test\r\n\r\n", 2)
		if resps[0].ContentLength != 7 || resps[1].StatusCode != 200 {
			t.Fatalf("HEAD content-length %d, next status %d", resps[0].ContentLength, resps[1].StatusCode)
		}
	})
	t.Run("chunked request body and 100-continue", func(t *testing.T) {
		c, err := net.Dial("tcp", env.router.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(c, "POST /echo HTTP/1.1\r\nHost: frames.apps.test\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n")
		br := bufio.NewReader(c)
		line, err := br.ReadString('\n')
		if err != nil || !strings.HasPrefix(line, "HTTP/1.1 100") {
			t.Fatalf("before the body: %q %v, want 100 Continue", line, err)
		}
		br.ReadString('\n')
		io.WriteString(c, "3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		if string(body) != "POST:abcde" {
			t.Fatalf("echo %q", body)
		}
	})
	t.Run("1.0 keep-alive", func(t *testing.T) {
		resps, _, _ := exchange(t, "GET /a HTTP/1.0\r\nHost: frames.apps.test\r\nConnection: keep-alive\r\n\r\nGET /b HTTP/1.0\r\nHost: frames.apps.test\r\n\r\n", 2)
		if resps[0].Close || !resps[1].Close {
			t.Fatalf("keep-alive then close: got close %v, %v", resps[0].Close, resps[1].Close)
		}
	})
}
