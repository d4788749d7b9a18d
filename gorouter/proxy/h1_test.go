package proxy

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"

	"github.com/basinpaas/basin/gorouter/routetable"
)

func testProxy(t *testing.T) *Proxy {
	t.Helper()
	p, err := New(Config{}, routetable.New(), nil, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// parse runs the HTTP/1.1 front end's parser on raw.
func parse(t *testing.T, p *Proxy, raw string) (*h1conn, error) {
	t.Helper()
	a, b := net.Pipe()
	t.Cleanup(func() { a.Close(); b.Close() })
	c := &h1conn{p: p, conn: a, br: bufio.NewReader(strings.NewReader(raw))}
	return c, c.readRequest()
}

func TestReadRequestRefuses(t *testing.T) {
	p := testProxy(t)
	cases := []struct {
		name, raw string
		want      error
	}{
		{"CL and TE", "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", errBadRequest},
		{"TE and CL", "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", errBadRequest},
		{"two different CL", "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", errBadRequest},
		{"signed CL", "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +3\r\n\r\n", errBadRequest},
		{"CL not a number", "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3x\r\n\r\n", errBadRequest},
		{"unknown TE", "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", errNotImplemented},
		{"TE chunked twice", "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", errNotImplemented},
		{"TE in 1.0", "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", errBadRequest},
		{"space before colon", "GET / HTTP/1.1\r\nHost : h\r\n\r\n", errBadRequest},
		{"bad name", "GET / HTTP/1.1\r\nHost: h\r\nA(b): 1\r\n\r\n", errBadRequest},
		{"no colon", "GET / HTTP/1.1\r\nHost: h\r\nJunk\r\n\r\n", errBadRequest},
		{"folding", "GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n", errBadRequest},
		{"NUL in value", "GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n", errBadRequest},
		{"no host", "GET / HTTP/1.1\r\n\r\n", errBadRequest},
		{"two hosts", "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", errBadRequest},
		{"HTTP/2 preface", "PRI * HTTP/2.0\r\n\r\n", errVersion},
		{"garbage version", "GET / FOO\r\nHost: h\r\n\r\n", errBadRequest},
		{"CONNECT", "CONNECT h:443 HTTP/1.1\r\nHost: h\r\n\r\n", errMethodNotAllowed},
		{"relative target", "GET foo HTTP/1.1\r\nHost: h\r\n\r\n", errBadRequest},
		{"space in target", "GET /a b HTTP/1.1\r\nHost: h\r\n\r\n", errBadRequest},
		{"huge head", "GET / HTTP/1.1\r\nHost: h\r\nX: " + strings.Repeat("a", 65<<10) + "\r\n\r\n", errHeaderTooLarge},
		{"huge body", "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 9999999999999\r\n\r\n", errBodyTooLarge},
		{"cut short", "GET / HTTP/1.1\r\nHost: h\r\n", io.ErrUnexpectedEOF},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parse(t, p, tc.raw)
			if tc.want == io.ErrUnexpectedEOF {
				if err == nil {
					t.Fatal("accepted a cut request")
				}
				return
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
		})
	}
}

func TestReadRequestFields(t *testing.T) {
	p := testProxy(t)
	raw := "\r\nPOST /a/b?x=1 HTTP/1.1\r\n" +
		"Host: App.Example.com:80\r\n" +
		"Content-Length: 5\r\n" +
		"Connection: keep-alive, X-Drop\r\n" +
		"X-Drop: secret\r\n" +
		"Keep-Alive: 5\r\n" +
		"X-Forwarded-For: 1.1.1.1\r\n" +
		"X-Forwarded-For: 2.2.2.2\r\n" +
		"X-Request-Id: rid\r\n" +
		"Cookie: a=b; __VCAP_ID__=inst-1; JSESSIONID=s\r\n" +
		"X-CF-App-Instance: g:1\r\n" +
		"Upgrade: websocket\r\n" +
		"Expect: 100-continue\r\n" +
		"X-Keep:   spaced value \t\r\n" +
		"\r\nhello"
	c, err := parse(t, p, raw)
	if err != nil {
		t.Fatal(err)
	}
	r := &c.req
	checks := []struct{ name, got, want string }{
		{"method", r.method, "POST"},
		{"target", r.target, "/a/b?x=1"},
		{"path", r.path, "/a/b"},
		{"host", r.host, "App.Example.com:80"},
		{"xff", r.xff, "1.1.1.1, 2.2.2.2"},
		{"request id", r.requestID, "rid"},
		{"vcap id", r.vcapID, "inst-1"},
		{"app instance", r.appInstance, "g:1"},
		{"upgrade", r.upgrade, "websocket"},
	}
	for _, ck := range checks {
		if ck.got != ck.want {
			t.Errorf("%s = %q, want %q", ck.name, ck.got, ck.want)
		}
	}
	if !r.hasJSessionID || !r.expectContinue || r.contentLen != 5 {
		t.Errorf("jsession %v expect %v contentLen %d", r.hasJSessionID, r.expectContinue, r.contentLen)
	}
	var fwd []string
	for _, h := range r.headers {
		if !h.hop {
			fwd = append(fwd, h.name+"="+h.value)
		}
	}
	if got := strings.Join(fwd, "|"); got != "Cookie=a=b; __VCAP_ID__=inst-1; JSESSIONID=s|X-Keep=spaced value" {
		t.Errorf("forwarded headers %q", got)
	}
	body, _ := io.ReadAll(r.body)
	if string(body) != "hello" || !c.body.done() {
		t.Errorf("body %q done %v", body, c.body.done())
	}
}

func TestAbsoluteFormWinsOverHost(t *testing.T) {
	c, err := parse(t, testProxy(t), "GET http://real.example.com/p?q HTTP/1.1\r\nHost: other\r\n\r\n")
	if err != nil {
		t.Fatal(err)
	}
	if c.req.host != "real.example.com" || c.req.target != "/p?q" {
		t.Fatalf("host %q target %q", c.req.host, c.req.target)
	}
}

func TestChunkedBodyWithTrailer(t *testing.T) {
	p := testProxy(t)
	raw := "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\nGET /next HTTP/1.1\r\nHost: h\r\n\r\n"
	c, err := parse(t, p, raw)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(c.req.body)
	if err != nil || string(body) != "hello world" {
		t.Fatalf("body %q err %v", body, err)
	}
	// The trailer was consumed: the next request parses.
	c.req.reset()
	if err := c.readRequest(); err != nil || c.req.target != "/next" {
		t.Fatalf("next request: %v %q", err, c.req.target)
	}
}

func TestChunkedBodyLimit(t *testing.T) {
	p := testProxy(t)
	p.cfg.MaxBodyBytes = 4
	c, err := parse(t, p, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadAll(c.req.body); !errors.Is(err, errBodyTooLarge) {
		t.Fatalf("err = %v, want body too large", err)
	}
}

func TestWriteRequestHead(t *testing.T) {
	p := testProxy(t)
	cases := []struct {
		name string
		r    request
		want string
	}{
		{"plain GET", request{method: "GET", target: "/x", host: "h.test", remoteAddr: "10.0.0.9:5555", requestID: "id", vcapRequestID: "id",
			headers: []header{{name: "Accept", value: "*/*"}, {name: "X-Hop", value: "1", hop: true}}},
			"GET /x HTTP/1.1\r\nHost: h.test\r\nAccept: */*\r\nX-Forwarded-For: 10.0.0.9\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: h.test\r\nX-Request-Id: id\r\nX-Vcap-Request-Id: id\r\n\r\n"},
		{"TLS, proxies before, chunked body", request{method: "POST", target: "/", host: "h.test", remoteAddr: "[::1]:5", tls: true, xff: "1.2.3.4", xfHost: "orig",
			requestID: "a", vcapRequestID: "b", contentLen: -1, body: strings.NewReader("")},
			"POST / HTTP/1.1\r\nHost: h.test\r\nX-Forwarded-For: 1.2.3.4, ::1\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: orig\r\nX-Request-Id: a\r\nX-Vcap-Request-Id: b\r\nTransfer-Encoding: chunked\r\n\r\n"},
		{"websocket", request{method: "GET", target: "/ws", host: "h", remoteAddr: "1.1.1.1:1", xfProto: "https", requestID: "r", vcapRequestID: "r", upgrade: "websocket"},
			"GET /ws HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: h\r\nX-Request-Id: r\r\nX-Vcap-Request-Id: r\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"},
		{"empty POST", request{method: "POST", target: "/", host: "h", remoteAddr: "1.1.1.1:1", requestID: "r", vcapRequestID: "r"},
			"POST / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: h\r\nX-Request-Id: r\r\nX-Vcap-Request-Id: r\r\nContent-Length: 0\r\n\r\n"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			bw := bufio.NewWriter(&buf)
			p.writeRequestHead(bw, &tc.r)
			bw.Flush()
			if buf.String() != tc.want {
				t.Fatalf("got\n%q\nwant\n%q", buf.String(), tc.want)
			}
		})
	}
}

func TestReadResponseHead(t *testing.T) {
	cases := []struct {
		name, raw  string
		status     int
		contentLen int64
		chunked    bool
		close      bool
		forwarded  string
		session    bool
		wantErr    bool
	}{
		{name: "keep-alive", raw: "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\n", status: 200, contentLen: 2, forwarded: "Content-Type"},
		{name: "chunked, hop-by-hop", raw: "HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nConnection: close, X-Private\r\nX-Private: 1\r\nKeep-Alive: 3\r\nX-Public: 2\r\n\r\n",
			status: 201, contentLen: -1, chunked: true, close: true, forwarded: "X-Public"},
		{name: "1.0 closes", raw: "HTTP/1.0 200 OK\r\n\r\n", status: 200, contentLen: -1, close: true},
		{name: "1.0 keep-alive", raw: "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n", status: 200},
		{name: "session cookie", raw: "HTTP/1.1 200 OK\r\nSet-Cookie: JSESSIONID=abc; Max-Age=60\r\nContent-Length: 0\r\n\r\n", status: 200, forwarded: "Set-Cookie", session: true},
		{name: "101 keeps Upgrade", raw: "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", status: 101, contentLen: -1, forwarded: "Upgrade"},
		{name: "conflicting CL", raw: "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", wantErr: true},
		{name: "bad TE", raw: "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", wantErr: true},
		{name: "bad status", raw: "HTTP/1.1 20 OK\r\n\r\n", wantErr: true},
		{name: "not http", raw: "SSH-2.0-OpenSSH\r\n\r\n", wantErr: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var res response
			_, err := readResponseHead(bufio.NewReader(strings.NewReader(tc.raw)), nil, 64<<10, &res)
			if tc.wantErr {
				if !errors.Is(err, errBackendProtocol) {
					t.Fatalf("err = %v, want a protocol error", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var fwd []string
			for _, h := range res.headers {
				if !h.hop {
					fwd = append(fwd, h.name)
				}
			}
			if res.status != tc.status || res.contentLen != tc.contentLen || res.chunked != tc.chunked || res.close != tc.close ||
				strings.Join(fwd, ",") != tc.forwarded || res.setsSession != tc.session {
				t.Fatalf("got status %d len %d chunked %v close %v forwarded %v session %v", res.status, res.contentLen, res.chunked, res.close, fwd, res.setsSession)
			}
		})
	}
}

func TestVcapCookie(t *testing.T) {
	cases := []struct {
		session string
		secure  bool
		want    string
	}{
		{"JSESSIONID=abc; Max-Age=60", false, "__VCAP_ID__=inst; Path=/; Max-Age=60; HttpOnly"},
		{"JSESSIONID=abc; Secure; SameSite=Strict", false, "__VCAP_ID__=inst; Path=/; HttpOnly; Secure; SameSite=Strict"},
		{"", true, "__VCAP_ID__=inst; Path=/; HttpOnly; Secure"},
	}
	for _, tc := range cases {
		if got := vcapCookieFor("inst", tc.session, tc.secure); got != tc.want {
			t.Errorf("vcapCookieFor(%q, %v) = %q, want %q", tc.session, tc.secure, got, tc.want)
		}
	}
}

func TestPick(t *testing.T) {
	tb := routetable.New()
	var changes []routetable.Change
	for i, a := range []string{"a:1", "b:1", "c:1"} {
		changes = append(changes, routetable.Change{Key: a, Endpoint: &routetable.Endpoint{Host: "h", Addr: a, InstanceGUID: "i" + a, Index: int32(i)}})
	}
	tb.Apply(changes)
	pool := tb.Lookup("h", "/")
	p := testProxy(t)

	seen := map[string]int{}
	for i := 0; i < 9; i++ {
		seen[p.pick(pool, &request{}, nil).Addr]++
	}
	if seen["a:1"] != 3 || seen["b:1"] != 3 || seen["c:1"] != 3 {
		t.Fatalf("round-robin spread %v", seen)
	}
	if e := p.pick(pool, &request{vcapID: "ib:1"}, nil); e.Addr != "b:1" {
		t.Fatalf("sticky pick %s", e.Addr)
	}
	b := pool.ByInstance("ib:1")
	if e := p.pick(pool, &request{vcapID: "ib:1"}, []*routetable.Endpoint{b}); e == b {
		t.Fatal("picked an endpoint already tried")
	}

	pool.Endpoints[0].Acquire()
	pool.Endpoints[2].Acquire()
	// A route tagged for least-connections uses it under a round-robin router.
	tagged := *pool
	tagged.Balancing = LeastConnections
	for i := 0; i < 3; i++ {
		if e := p.pick(&tagged, &request{}, nil); e.Addr != "b:1" {
			t.Fatalf("least-connections route picked %s, want b:1", e.Addr)
		}
	}
	p.cfg.Balancing = LeastConnections
	for i := 0; i < 3; i++ {
		if e := p.pick(pool, &request{}, nil); e.Addr != "b:1" {
			t.Fatalf("least-connections picked %s, want b:1", e.Addr)
		}
	}
	// And a route tagged round-robin keeps rotating under a least-connections router.
	tagged.Balancing = RoundRobin
	seen = map[string]int{}
	for i := 0; i < 3; i++ {
		seen[p.pick(&tagged, &request{}, nil).Addr]++
	}
	if len(seen) != 3 {
		t.Fatalf("round-robin route under a least-connections router: %v", seen)
	}
}
