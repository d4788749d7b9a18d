package proxy

import (
	"bytes"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/basinpaas/basin/gorouter/routetable"
)

// lockedBuffer is an access log sink safe to read while the proxy writes.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func TestAccessLogLine(t *testing.T) {
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "hello")
	}))
	defer backend.Close()
	tb := routetable.New()
	tb.Apply([]routetable.Change{{Key: "k", Endpoint: &routetable.Endpoint{
		Host: "log.test", ProcessGUID: "pg", Index: 2, Addr: backend.Listener.Addr().String()}}})

	var logBuf lockedBuffer
	p, err := New(Config{AccessLog: &logBuf}, tb, nil, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- p.Serve(ln) }()

	for _, host := range []string{"log.test", "missing.test"} {
		req, _ := http.NewRequest("GET", "http://"+ln.Addr().String()+"/p?q=\"x\"", nil)
		req.Host = host
		req.Header.Set("X-Request-Id", "rid-1")
		req.Header.Set("User-Agent", "ua\"quoted")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	http.DefaultClient.CloseIdleConnections()
	ln.Close()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := p.Shutdown(t.Context()); err != nil {
		t.Fatal(err)
	}

	lines := strings.Split(strings.TrimSpace(logBuf.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("%d access log lines, want 2:\n%s", len(lines), logBuf.String())
	}
	for _, want := range []string{`log.test - [`, `"GET /p?q=\"x\" HTTP/1.1" 200 5 "-" "ua\"quoted"`,
		`"` + backend.Listener.Addr().String() + `"`, `vcap_request_id:"rid-1"`, `app_id:"pg" app_index:"2"`, "response_time:"} {
		if !strings.Contains(lines[0], want) {
			t.Errorf("line %q lacks %q", lines[0], want)
		}
	}
	for _, want := range []string{`missing.test - [`, `" 404 `, `x_cf_routererror:"unknown_route"`} {
		if !strings.Contains(lines[1], want) {
			t.Errorf("line %q lacks %q", lines[1], want)
		}
	}
}
