// Package proxy is the router's data path: it takes requests from clients
// (its own strict HTTP/1.1 front end, or net/http's HTTP/2 over TLS), finds
// the pool in the route table, picks an endpoint and relays the exchange on a
// pooled keep-alive connection, in the request's own goroutine.
package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httputil"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/net/http2"

	"github.com/basinpaas/basin/gorouter/routetable"
)

// Balancing algorithms.
const (
	RoundRobin       = "round-robin"
	LeastConnections = "least-connections"
)

// Config holds every timeout and limit of the data path; zero values take
// the defaults of WithDefaults.
type Config struct {
	Balancing string

	DialTimeout           time.Duration // connecting to an endpoint
	ResponseHeaderTimeout time.Duration // from sending the request to the response head → 504
	BackendReadTimeout    time.Duration // longest pause between reads of a response body
	BackendIdleTimeout    time.Duration // idle keep-alive connection to an endpoint is closed after
	MaxIdlePerEndpoint    int           // idle connections kept per endpoint; keep ≥ expected concurrency

	MaxAttempts int           // endpoints tried per request when connecting fails
	RetryBudget time.Duration // no new attempt after this long since the request arrived
	SuspectFor  time.Duration // an endpoint that refused a connection is skipped this long

	ReadHeaderTimeout time.Duration // client must send a request head within this
	ClientIdleTimeout time.Duration // idle keep-alive client connection is closed after
	MaxHeaderBytes    int
	MaxBodyBytes      int64

	// AccessLog receives one line per request; nil turns it off.
	AccessLog io.Writer
}

// WithDefaults fills zero fields.
func (c Config) WithDefaults() Config {
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	if c.Balancing == "" {
		c.Balancing = RoundRobin
	}
	def(&c.DialTimeout, 5*time.Second)
	def(&c.ResponseHeaderTimeout, 60*time.Second)
	def(&c.BackendReadTimeout, 5*time.Minute)
	def(&c.BackendIdleTimeout, 60*time.Second)
	def(&c.RetryBudget, 5*time.Second)
	def(&c.SuspectFor, 10*time.Second)
	def(&c.ReadHeaderTimeout, 10*time.Second)
	def(&c.ClientIdleTimeout, 90*time.Second)
	if c.MaxIdlePerEndpoint == 0 {
		c.MaxIdlePerEndpoint = 512
	}
	if c.MaxAttempts == 0 {
		c.MaxAttempts = 3
	}
	if c.MaxHeaderBytes == 0 {
		c.MaxHeaderBytes = 64 << 10
	}
	if c.MaxBodyBytes == 0 {
		c.MaxBodyBytes = 1 << 30
	}
	return c
}

// Validate reports the first invalid field.
func (c Config) Validate() error {
	if c.Balancing != RoundRobin && c.Balancing != LeastConnections {
		return fmt.Errorf("balancing: must be %q or %q, got %q", RoundRobin, LeastConnections, c.Balancing)
	}
	if c.MaxAttempts < 1 || c.MaxAttempts > 10 {
		return fmt.Errorf("max attempts: must be between 1 and 10, got %d", c.MaxAttempts)
	}
	return nil
}

// Proxy relays requests to the endpoints of a route table.
type Proxy struct {
	cfg      Config
	table    *routetable.Table
	log      *slog.Logger
	metrics  *Metrics
	bufs     *buffers
	backends *backends
	draining atomic.Bool

	h2     *http2.Server
	h2base *http.Server

	mu    sync.Mutex
	conns map[net.Conn]*atomic.Int32 // client connections and their state
	wg    sync.WaitGroup

	logMu  sync.Mutex
	logBuf *bufio.Writer // nil when the access log is off

	// ctx bounds work that is not tied to a client context (HTTP/1 dials
	// and handshakes); it ends when a drain runs out of time.
	ctx    context.Context
	cancel context.CancelFunc
}

// New returns a proxy over table. metrics may be nil.
func New(cfg Config, table *routetable.Table, metrics *Metrics, log *slog.Logger) (*Proxy, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("proxy config: %w", err)
	}
	if metrics == nil {
		metrics = NewMetrics(nil)
	}
	p := &Proxy{
		cfg: cfg, table: table, log: log, metrics: metrics,
		bufs:  newBuffers(),
		conns: map[net.Conn]*atomic.Int32{},
		h2:    &http2.Server{IdleTimeout: cfg.ClientIdleTimeout, MaxReadFrameSize: 1 << 20},
		h2base: &http.Server{
			ReadHeaderTimeout: cfg.ReadHeaderTimeout,
			MaxHeaderBytes:    cfg.MaxHeaderBytes,
		},
	}
	p.ctx, p.cancel = context.WithCancel(context.Background())
	p.backends = &backends{p: p, idle: map[string][]*backendConn{}}
	if cfg.AccessLog != nil {
		// Buffered: a write per request would cost as much as proxying it.
		p.logBuf = bufio.NewWriterSize(cfg.AccessLog, 64<<10)
	}
	// Registers the graceful GOAWAY hook: h2base.Shutdown drains HTTP/2 clients.
	if err := http2.ConfigureServer(p.h2base, p.h2); err != nil {
		return nil, fmt.Errorf("configure http/2: %w", err)
	}
	return p, nil
}

// Serve accepts plain HTTP/1.x connections on ln until it is closed.
func (p *Proxy) Serve(ln net.Listener) error {
	return p.accept(ln, func(c net.Conn, state *atomic.Int32) {
		p.serveH1(c, state, false)
	})
}

// ServeTLS accepts TLS connections on ln until it is closed, speaking
// HTTP/2 to clients that negotiate it and HTTP/1.1 to the others.
func (p *Proxy) ServeTLS(ln net.Listener, cfg *tls.Config) error {
	cfg = cfg.Clone()
	cfg.NextProtos = []string{"h2", "http/1.1"}
	return p.accept(ln, func(c net.Conn, state *atomic.Int32) {
		tc := tls.Server(rawNetConn{Conn: c, rw: newRawIO(c)}, cfg)
		ctx, cancel := context.WithTimeout(p.ctx, p.cfg.ReadHeaderTimeout)
		err := tc.HandshakeContext(ctx)
		cancel()
		if err != nil {
			tc.Close()
			return
		}
		if tc.ConnectionState().NegotiatedProtocol == "h2" {
			p.h2.ServeConn(tc, &http2.ServeConnOpts{Handler: p, BaseConfig: p.h2base})
			tc.Close()
			return
		}
		p.serveH1(tc, state, true)
	})
}

func (p *Proxy) accept(ln net.Listener, serve func(net.Conn, *atomic.Int32)) error {
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				// Out of descriptors: wait rather than spin.
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				time.Sleep(backoff)
				continue
			}
			return fmt.Errorf("accept on %s: %w", ln.Addr(), err)
		}
		backoff = 0
		state := new(atomic.Int32)
		p.mu.Lock()
		p.conns[c] = state
		p.wg.Add(1)
		p.mu.Unlock()
		go func() {
			defer p.wg.Done()
			defer func() {
				p.mu.Lock()
				delete(p.conns, c)
				p.mu.Unlock()
			}()
			serve(c, state)
		}()
	}
}

func (p *Proxy) serveH1(c net.Conn, state *atomic.Int32, isTLS bool) {
	rw := newRawIO(c)
	hc := &h1conn{p: p, conn: c, br: p.bufs.getReader(rw), bw: p.bufs.getWriter(rw), tls: isTLS, state: state,
		remote: c.RemoteAddr().String()}
	hc.serve()
}

// Shutdown stops taking requests: idle connections close now, busy ones
// after their current response; when ctx ends first, the rest are cut.
// The listeners must be closed by the caller.
func (p *Proxy) Shutdown(ctx context.Context) error {
	p.draining.Store(true)
	// h2base owns no connection: this only sends GOAWAY to HTTP/2 clients.
	p.h2base.Shutdown(ctx) //nolint:errcheck // nothing of its own to wait for
	done := make(chan struct{})
	go func() {
		p.wg.Wait()
		close(done)
	}()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	var err error
loop:
	for {
		p.mu.Lock()
		for c, st := range p.conns {
			if st != nil && st.Load() == connIdle {
				c.SetReadDeadline(time.Now())
			}
		}
		p.mu.Unlock()
		select {
		case <-done:
			break loop
		case <-ctx.Done():
			err = fmt.Errorf("drain client connections: %w", ctx.Err())
			p.cancel()
			p.mu.Lock()
			for c := range p.conns {
				c.Close()
			}
			p.mu.Unlock()
			<-done
			break loop
		case <-tick.C:
		}
	}
	p.cancel()
	p.backends.closeAll()
	p.FlushAccessLog()
	return err
}

// Draining reports whether Shutdown has begun.
func (p *Proxy) Draining() bool { return p.draining.Load() }

// Maintain closes expired idle endpoint connections and flushes the access
// log every half second until ctx is done.
func (p *Proxy) Maintain(ctx context.Context) {
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	lastSweep := time.Now()
	for {
		select {
		case <-ctx.Done():
			p.FlushAccessLog()
			return
		case now := <-t.C:
			p.FlushAccessLog()
			if now.Sub(lastSweep) >= p.cfg.BackendIdleTimeout/2 {
				p.backends.sweep(now)
				lastSweep = now
			}
		}
	}
}

// FlushAccessLog writes out buffered access log lines.
func (p *Proxy) FlushAccessLog() {
	if p.logBuf == nil {
		return
	}
	p.logMu.Lock()
	p.logBuf.Flush() //nolint:errcheck // a full disk must not fail requests
	p.logMu.Unlock()
}

// sink is where a response goes: an HTTP/1.x connection or net/http's
// ResponseWriter.
type sink interface {
	// head writes status and headers; length is the body length, -1 when
	// unknown (streamed); noBody when the status or method has none.
	head(status int, reason string, hs []header, length int64, noBody bool) error
	write(p []byte) (int, error)
	flush() error
	end() error
	sendContinue() error
	hijack() (net.Conn, *bufio.Reader, *bufio.Writer, bool)
	bytesWritten() int64
	headWritten() bool
	markClose()
	// clientGone reports whether the client hung up; it may cost a syscall,
	// so it is asked only after slow exchanges.
	clientGone() bool
}

// clientCheckAfter is how slow an exchange must be before the proxy checks
// that the client is still there.
const clientCheckAfter = time.Second

// outcome is what the access log and metrics record.
type outcome struct {
	status      int
	ep          *routetable.Endpoint
	clientGone  bool
	routerError string
}

func (p *Proxy) serve(r *request, s sink) {
	if r.requestID == "" {
		r.requestID = newRequestID(&r.idBuf)
	}
	if r.vcapRequestID == "" {
		r.vcapRequestID = r.requestID
	}
	out := p.route(r, s)
	p.finish(r, s, out)
}

func (p *Proxy) route(r *request, s sink) outcome {
	pool := p.table.Lookup(r.host, r.path)
	if pool == nil {
		return p.fail(r, s, http.StatusNotFound, "unknown_route",
			fmt.Sprintf("Requested route ('%s') does not exist.\n", routetable.NormalizeHost(r.host)))
	}
	var forced *routetable.Endpoint
	if r.appInstance != "" {
		guid, idx, ok := strings.Cut(r.appInstance, ":")
		n, err := strconv.ParseInt(idx, 10, 32)
		if !ok || guid == "" || err != nil || n < 0 {
			return p.fail(r, s, http.StatusBadRequest, "invalid_cf_app_instance_header",
				"X-CF-App-Instance: must be <process_guid>:<index>\n")
		}
		if forced = pool.ByProcessIndex(guid, int32(n)); forced == nil {
			return p.fail(r, s, http.StatusBadRequest, "unknown_route",
				fmt.Sprintf("Requested instance ('%d') with guid ('%s') does not exist for route ('%s')\n", n, guid, routetable.NormalizeHost(r.host)))
		}
	}
	if len(pool.Endpoints) == 0 {
		return p.fail(r, s, http.StatusServiceUnavailable, "no_endpoints", "No healthy endpoint.\n")
	}

	deadline := r.start.Add(p.cfg.RetryBudget)
	var triedBuf [10]*routetable.Endpoint
	tried := triedBuf[:0]
	for attempt := 0; attempt < p.cfg.MaxAttempts; attempt++ {
		ep := forced
		if ep == nil {
			ep = p.pick(pool, r, tried)
		}
		if ep == nil {
			break
		}
		tried = append(tried, ep)
		out, err := p.exchange(r, s, ep)
		if _, dialFailed := err.(*dialError); !dialFailed {
			return out
		}
		// Nothing reached this endpoint: skip it for a while, try another.
		ep.MarkSuspect(time.Now().Add(p.cfg.SuspectFor))
		p.metrics.endpointFailures.WithLabelValues("dial").Inc()
		p.log.Debug("endpoint refused connection", "host", strings.Clone(r.host), "endpoint", ep.Addr, "err", err)
		if forced != nil || time.Now().After(deadline) {
			break
		}
	}
	return p.fail(r, s, http.StatusServiceUnavailable, "endpoint_failure", "No healthy endpoint.\n")
}

// pick chooses an endpoint not tried yet, preferring the sticky instance
// and endpoints that are not suspect.
func (p *Proxy) pick(pool *routetable.Pool, r *request, tried []*routetable.Endpoint) *routetable.Endpoint {
	now := time.Now()
	isTried := func(e *routetable.Endpoint) bool {
		for _, t := range tried {
			if t == e {
				return true
			}
		}
		return false
	}
	if r.vcapID != "" {
		if e := pool.ByInstance(r.vcapID); e != nil && !e.Suspect(now) && !isTried(e) {
			return e
		}
	}
	eps := pool.Endpoints
	n := len(eps)
	start := int(pool.Next() % uint64(n))
	roundRobin := p.cfg.Balancing == RoundRobin
	switch pool.Balancing {
	case RoundRobin:
		roundRobin = true
	case LeastConnections:
		roundRobin = false
	}
	var best *routetable.Endpoint
	for i := 0; i < n; i++ {
		e := eps[(start+i)%n]
		if isTried(e) || e.Suspect(now) {
			continue
		}
		if roundRobin {
			return e
		}
		if best == nil || e.Active() < best.Active() {
			best = e
		}
	}
	if best != nil {
		return best
	}
	// Every untried endpoint is suspect: trying one beats failing outright.
	for i := 0; i < n; i++ {
		if e := eps[(start+i)%n]; !isTried(e) {
			return e
		}
	}
	return nil
}

// fail writes a response made by the router itself.
func (p *Proxy) fail(r *request, s sink, status int, code, body string) outcome {
	if s.headWritten() {
		s.markClose()
		return outcome{status: status, routerError: code}
	}
	hs := []header{
		{name: "Content-Type", value: "text/plain; charset=utf-8"},
		{name: "X-Cf-Routererror", value: code},
		// Refused requests were never given an id.
		{name: "X-Vcap-Request-Id", value: r.vcapRequestID, hop: r.vcapRequestID == ""},
	}
	if r.body != nil && !r.bodyDone() {
		// The unread body would be taken for the next request: say we close.
		s.markClose()
	}
	noBody := r.method == "HEAD"
	err := s.head(status, "", hs, int64(len(body)), noBody)
	if err == nil && !noBody {
		_, err = s.write([]byte(body))
	}
	if err == nil {
		err = s.end()
	}
	return outcome{status: status, routerError: code, clientGone: err != nil}
}

// refuse answers a request the front end could not accept, and closes.
func (p *Proxy) refuse(r *request, s sink, err error) {
	status, code := http.StatusBadRequest, "bad_request"
	switch {
	case errors.Is(err, errHeaderTooLarge):
		status, code = http.StatusRequestHeaderFieldsTooLarge, "header_too_large"
	case errors.Is(err, errBodyTooLarge):
		status, code = http.StatusRequestEntityTooLarge, "body_too_large"
	case errors.Is(err, errNotImplemented):
		status, code = http.StatusNotImplemented, "not_implemented"
	case errors.Is(err, errVersion):
		status, code = http.StatusHTTPVersionNotSupported, "version_not_supported"
	case errors.Is(err, errMethodNotAllowed):
		status, code = http.StatusMethodNotAllowed, "method_not_allowed"
	}
	s.markClose()
	if r.start.IsZero() {
		r.start = time.Now()
	}
	out := p.fail(r, s, status, code, http.StatusText(status)+"\n")
	p.finish(r, s, out)
}

// exchange relays the request to ep. A *dialError means nothing was sent.
func (p *Proxy) exchange(r *request, s sink, ep *routetable.Endpoint) (outcome, error) {
	ep.Acquire()
	defer ep.Release()
	bc, err := p.backends.get(r.ctx, ep.Addr)
	if err != nil {
		return outcome{}, err
	}
	out, stale := p.roundTrip(r, s, ep, bc)
	if stale {
		// The idle connection had been closed by the endpoint before our
		// request reached it; a fresh one is safe because nothing was read.
		if bc, err = p.backends.dial(r.ctx, ep.Addr); err != nil {
			return outcome{}, err
		}
		out, _ = p.roundTrip(r, s, ep, bc)
	}
	return out, nil
}

// roundTrip sends the request on bc and relays the response. stale is true
// when a reused connection turned out dead before any response byte and the
// request can be replayed (it has no body); bc is closed then.
func (p *Proxy) roundTrip(r *request, s sink, ep *routetable.Endpoint, bc *backendConn) (out outcome, stale bool) {
	out.ep = ep
	reusable := false
	defer func() {
		if reusable {
			p.backends.put(bc)
		} else {
			bc.close(p)
		}
	}()
	bc.conn.SetDeadline(time.Now().Add(p.cfg.ResponseHeaderTimeout))
	p.writeRequestHead(bc.bw, r)
	if r.body != nil {
		if r.expectContinue {
			if err := s.sendContinue(); err != nil {
				return outcome{status: 499, ep: ep, clientGone: true}, false
			}
		}
		if rerr, werr := p.copyRequestBody(bc.bw, r); rerr != nil || werr != nil {
			if errors.Is(rerr, errBodyTooLarge) {
				return p.fail(r, s, http.StatusRequestEntityTooLarge, "body_too_large", "Request body too large.\n"), false
			}
			if rerr != nil {
				s.markClose()
				return p.fail(r, s, http.StatusBadRequest, "bad_request_body", "Could not read request body.\n"), false
			}
			return p.backendFailed(r, s, ep, werr), false
		}
	}
	if err := bc.bw.Flush(); err != nil {
		if bc.reused && r.body == nil {
			return out, true
		}
		return p.backendFailed(r, s, ep, err), false
	}

	res := &bc.res
	var err error
	for {
		bc.buf, err = readResponseHead(bc.br, bc.buf, p.cfg.MaxHeaderBytes, res)
		if err != nil {
			// A reused connection that reads EOF before any byte was most
			// likely closed idle by the endpoint; but it may have died
			// processing the request, so only idempotent requests replay.
			if bc.reused && r.body == nil && len(bc.buf) == 0 && isConnDead(err) && idempotent(r.method) {
				return out, true
			}
			return p.backendFailed(r, s, ep, err), false
		}
		if res.status >= 200 || res.status == http.StatusSwitchingProtocols {
			break
		}
		// 100 Continue (already sent by us) and 103 Early Hints: skip.
	}
	if res.status == http.StatusSwitchingProtocols {
		if r.upgrade == "" {
			return p.backendFailed(r, s, ep, fmt.Errorf("unrequested upgrade: %w", errBackendProtocol)), false
		}
		return p.tunnel(r, s, ep, bc, res), false
	}

	if time.Since(r.start) > clientCheckAfter && s.clientGone() {
		// Nobody is waiting for this response: log 499 and drop it.
		return outcome{status: http.StatusOK, ep: ep, clientGone: true}, false
	}
	hs := p.responseHeaders(r, ep, res)
	noBody := bodyless(r.method, res.status)
	length := res.contentLen
	if noBody && r.method == "HEAD" && res.contentLen >= 0 {
		hs = append(hs, header{name: "Content-Length", value: strconv.FormatInt(res.contentLen, 10)})
	}
	out.status = res.status
	if err := s.head(res.status, res.reason, hs, length, noBody); err != nil {
		out.clientGone = true
		return out, false
	}
	if !noBody {
		if res.contentLen < 0 || int64(bc.br.Buffered()) < res.contentLen {
			// Still to be read: switch from the head timeout to the
			// pause timeout. A body already buffered needs no timer.
			bc.conn.SetReadDeadline(time.Now().Add(p.cfg.BackendReadTimeout))
		}
		var src io.Reader = bc.br
		switch {
		case res.chunked:
			src = httputil.NewChunkedReader(bc.br)
		case res.contentLen >= 0:
			bc.limited = io.LimitedReader{R: bc.br, N: res.contentLen}
			src = &bc.limited
		}
		stream := length < 0 || isEventStream(hs)
		buf := p.bufs.getBuf()
		last := time.Now()
		n, rerr, werr := copyBody(s, src, *buf, stream, func() {
			// Refresh the pause deadline at most once a second: it is a
			// timer operation, too dear per read.
			if now := time.Now(); now.Sub(last) > time.Second {
				last = now
				bc.conn.SetReadDeadline(now.Add(p.cfg.BackendReadTimeout))
			}
		})
		p.bufs.putBuf(buf)
		switch {
		case werr != nil:
			out.clientGone = true
			return out, false
		case rerr != nil || (res.contentLen >= 0 && n != res.contentLen):
			// The head is out: pass on what came, then cut the client
			// connection so it sees a truncated response, not a short one.
			p.metrics.endpointFailures.WithLabelValues("body").Inc()
			s.flush()
			s.markClose()
			return out, false
		}
		if res.chunked {
			if err := skipTrailer(bc.br); err != nil {
				s.markClose()
				return out, false
			}
		}
	}
	if err := s.end(); err != nil {
		out.clientGone = true
		// The response was read whole: the endpoint connection is fine.
	}
	reusable = !res.close && (noBody || res.chunked || res.contentLen >= 0)
	return out, false
}

// backendFailed maps a failure after the request was (maybe) sent: no retry.
func (p *Proxy) backendFailed(r *request, s sink, ep *routetable.Endpoint, err error) outcome {
	if isTimeout(err) {
		p.metrics.endpointFailures.WithLabelValues("timeout").Inc()
		out := p.fail(r, s, http.StatusGatewayTimeout, "endpoint_timeout", "Endpoint did not respond in time.\n")
		out.ep = ep
		return out
	}
	p.metrics.endpointFailures.WithLabelValues("protocol").Inc()
	p.log.Debug("endpoint failed", "host", strings.Clone(r.host), "endpoint", ep.Addr, "err", err)
	out := p.fail(r, s, http.StatusBadGateway, "endpoint_failure", "Endpoint failed.\n")
	out.ep = ep
	return out
}

func (p *Proxy) writeRequestHead(bw *bufio.Writer, r *request) {
	bw.WriteString(r.method)
	bw.WriteByte(' ')
	bw.WriteString(r.target)
	bw.WriteString(" HTTP/1.1\r\nHost: ")
	bw.WriteString(r.host)
	bw.WriteString("\r\n")
	for _, h := range r.headers {
		if h.hop {
			continue
		}
		bw.WriteString(h.name)
		bw.WriteString(": ")
		bw.WriteString(h.value)
		bw.WriteString("\r\n")
	}
	bw.WriteString("X-Forwarded-For: ")
	if r.xff != "" {
		bw.WriteString(r.xff)
		bw.WriteString(", ")
	}
	bw.WriteString(clientIP(r.remoteAddr))
	// A proto or host set by a load balancer in front is kept, as Cloud
	// Foundry's router does by default; the router sets them when absent.
	bw.WriteString("\r\nX-Forwarded-Proto: ")
	switch {
	case r.xfProto != "":
		bw.WriteString(r.xfProto)
	case r.tls:
		bw.WriteString("https")
	default:
		bw.WriteString("http")
	}
	bw.WriteString("\r\nX-Forwarded-Host: ")
	if r.xfHost != "" {
		bw.WriteString(r.xfHost)
	} else {
		bw.WriteString(r.host)
	}
	bw.WriteString("\r\nX-Request-Id: ")
	bw.WriteString(r.requestID)
	bw.WriteString("\r\nX-Vcap-Request-Id: ")
	bw.WriteString(r.vcapRequestID)
	bw.WriteString("\r\n")
	switch {
	case r.body == nil:
		if r.method == "POST" || r.method == "PUT" || r.method == "PATCH" {
			bw.WriteString("Content-Length: 0\r\n")
		}
	case r.contentLen >= 0:
		bw.WriteString("Content-Length: ")
		writeInt(bw, r.contentLen, 10)
		bw.WriteString("\r\n")
	default:
		bw.WriteString("Transfer-Encoding: chunked\r\n")
	}
	if r.upgrade != "" {
		bw.WriteString("Connection: Upgrade\r\nUpgrade: ")
		bw.WriteString(r.upgrade)
		bw.WriteString("\r\n")
	}
	bw.WriteString("\r\n")
}

// copyRequestBody sends the body, re-framed by the router: the endpoint
// sees exactly the bytes the router parsed, whatever the client sent.
func (p *Proxy) copyRequestBody(bw *bufio.Writer, r *request) (readErr, writeErr error) {
	buf := p.bufs.getBuf()
	defer p.bufs.putBuf(buf)
	chunked := r.contentLen < 0
	var sent int64
	for {
		n, err := r.body.Read(*buf)
		if n > 0 {
			sent += int64(n)
			var werr error
			if chunked {
				writeInt(bw, int64(n), 16)
				bw.WriteString("\r\n")
				bw.Write((*buf)[:n])
				_, werr = bw.WriteString("\r\n")
			} else {
				_, werr = bw.Write((*buf)[:n])
			}
			if werr != nil {
				return nil, werr
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return err, nil
		}
	}
	if chunked {
		if _, err := bw.WriteString("0\r\n\r\n"); err != nil {
			return nil, err
		}
	} else if sent != r.contentLen {
		return io.ErrUnexpectedEOF, nil
	}
	return nil, nil
}

func (p *Proxy) responseHeaders(r *request, ep *routetable.Endpoint, res *response) []header {
	hs := res.headers
	switch {
	case res.setsSession:
		hs = append(hs, header{name: "Set-Cookie", value: vcapCookieFor(ep.InstanceGUID, res.sessionCookie, r.tls)})
	case r.vcapID != "" && r.vcapID != ep.InstanceGUID && r.hasJSessionID:
		// The pinned instance is gone: pin the session to its new home.
		hs = append(hs, header{name: "Set-Cookie", value: vcapCookieFor(ep.InstanceGUID, "", r.tls)})
	}
	return hs
}

// vcapCookieFor builds the __VCAP_ID__ cookie with the lifetime of the
// app's JSESSIONID cookie, as Cloud Foundry does.
func vcapCookieFor(instanceGUID, session string, secure bool) string {
	c := &http.Cookie{Name: vcapCookie, Value: instanceGUID, Path: "/", HttpOnly: true, Secure: secure}
	if session != "" {
		if sc, err := http.ParseSetCookie(session); err == nil {
			c.MaxAge, c.Expires, c.SameSite = sc.MaxAge, sc.Expires, sc.SameSite
			c.Secure = c.Secure || sc.Secure
			c.Partitioned = sc.Partitioned
		}
	}
	return c.String()
}

func idempotent(method string) bool {
	switch method {
	case "GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE":
		return true
	}
	return false
}

func isEventStream(hs []header) bool {
	for _, h := range hs {
		if len(h.name) == 12 && strings.EqualFold(h.name, "Content-Type") {
			return strings.HasPrefix(h.value, "text/event-stream")
		}
	}
	return false
}

// tunnel relays an upgraded connection (WebSocket) both ways until either
// side closes.
func (p *Proxy) tunnel(r *request, s sink, ep *routetable.Endpoint, bc *backendConn, res *response) outcome {
	out := outcome{status: http.StatusSwitchingProtocols, ep: ep}
	cc, cbr, _, ok := s.hijack()
	if !ok {
		return p.fail(r, s, http.StatusBadGateway, "upgrade_unsupported", "Upgrade not supported on this connection.\n")
	}
	hs := append(res.headers, header{name: "Connection", value: "Upgrade"})
	if err := s.head(res.status, res.reason, hs, -1, true); err != nil || s.flush() != nil {
		cc.Close()
		out.clientGone = true
		return out
	}
	cc.SetDeadline(time.Time{})
	bc.conn.SetDeadline(time.Time{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		io.Copy(cc, bc.br) //nolint:errcheck // either side closing ends the tunnel
		cc.Close()
		bc.conn.Close()
	}()
	io.Copy(bc.conn, cbr) //nolint:errcheck // idem
	bc.conn.Close()
	cc.Close()
	<-done
	return out
}

func skipTrailer(br *bufio.Reader) error {
	total := 0
	for {
		line, err := br.ReadSlice('\n')
		if err != nil {
			return fmt.Errorf("read chunked trailer: %w", err)
		}
		total += len(line)
		if total > 8<<10 {
			return fmt.Errorf("chunked trailer over 8 KiB: %w", errBackendProtocol)
		}
		if len(line) == 1 || (len(line) == 2 && line[0] == '\r') {
			return nil
		}
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout() || errors.Is(err, os.ErrDeadlineExceeded)
}

// isConnDead reports the errors of a keep-alive connection the endpoint had
// already closed.
func isConnDead(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// newRequestID writes a random UUID (version 4 layout) into out and returns
// it as a string over out, so it lives as long as the request that holds
// out. math/rand is enough: the id must be unique, not secret.
func newRequestID(out *[36]byte) string {
	var b [16]byte
	a, c := rand.Uint64(), rand.Uint64()
	for i := 0; i < 8; i++ {
		b[i] = byte(a >> (8 * i))
		b[8+i] = byte(c >> (8 * i))
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	const hexd = "0123456789abcdef"
	j := 0
	for i, x := range b {
		if i == 4 || i == 6 || i == 8 || i == 10 {
			out[j] = '-'
			j++
		}
		out[j], out[j+1] = hexd[x>>4], hexd[x&0xf]
		j += 2
	}
	return unsafe.String(&out[0], len(out))
}

// finish writes the access log line and the metrics of one request.
func (p *Proxy) finish(r *request, s sink, out outcome) {
	d := time.Since(r.start)
	status := out.status
	if out.clientGone {
		status = 499
	}
	p.metrics.observe(status, d)
	if p.logBuf == nil {
		return
	}
	buf := p.bufs.getBuf()
	b := (*buf)[:0]
	b = append(b, routetable.NormalizeHost(r.host)...)
	b = append(b, " - ["...)
	b = r.start.UTC().AppendFormat(b, "2006-01-02T15:04:05.000Z")
	b = append(b, "] \""...)
	b = append(b, r.method...)
	b = append(b, ' ')
	b = appendSafe(b, r.target)
	if r.proto10 {
		b = append(b, " HTTP/1.0\" "...)
	} else {
		b = append(b, " HTTP/1.1\" "...)
	}
	b = strconv.AppendInt(b, int64(status), 10)
	b = append(b, ' ')
	b = strconv.AppendInt(b, s.bytesWritten(), 10)
	b = append(b, " \""...)
	b = appendSafe(b, r.referer)
	b = append(b, "\" \""...)
	b = appendSafe(b, r.userAgent)
	b = append(b, "\" \""...)
	b = append(b, r.remoteAddr...)
	b = append(b, "\" \""...)
	if out.ep != nil {
		b = append(b, out.ep.Addr...)
	} else {
		b = append(b, '-')
	}
	b = append(b, "\" x_forwarded_for:\""...)
	b = appendSafe(b, r.xff)
	b = append(b, "\" vcap_request_id:\""...)
	b = appendSafe(b, r.vcapRequestID)
	b = append(b, "\" response_time:"...)
	b = strconv.AppendFloat(b, d.Seconds(), 'f', 6, 64)
	if out.ep != nil {
		b = append(b, " app_id:\""...)
		b = append(b, out.ep.ProcessGUID...)
		b = append(b, "\" app_index:\""...)
		b = strconv.AppendInt(b, int64(out.ep.Index), 10)
		b = append(b, '"')
	}
	if out.routerError != "" {
		b = append(b, " x_cf_routererror:\""...)
		b = append(b, out.routerError...)
		b = append(b, '"')
	}
	b = append(b, '\n')
	p.logMu.Lock()
	p.logBuf.Write(b) //nolint:errcheck // a full disk must not fail requests
	p.logMu.Unlock()
	*buf = b[:0]
	p.bufs.putBuf(buf)
}

// appendSafe appends s with quotes and control characters escaped, so a
// client cannot forge log lines.
func appendSafe(b []byte, s string) []byte {
	if s == "" {
		return append(b, '-')
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '"' || c == '\\':
			b = append(b, '\\', c)
		case c < 0x20 || c == 0x7f:
			b = append(b, '\\', 'x', "0123456789abcdef"[c>>4], "0123456789abcdef"[c&0xf])
		default:
			b = append(b, c)
		}
	}
	return b
}
