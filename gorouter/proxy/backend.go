package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"
	"unsafe"
)

// backendConn is a keep-alive connection to one endpoint. The request
// goroutine writes the request and reads the response on it directly: no
// per-connection reader goroutine, no hand-off between goroutines, which is
// most of what a generic transport costs per request.
type backendConn struct {
	conn     net.Conn
	br       *bufio.Reader
	bw       *bufio.Writer
	addr     string
	reused   bool
	lastUsed time.Time
	buf      []byte // response head scratch
	res      response
	limited  io.LimitedReader
}

// rawNetConn is a net.Conn whose reads and writes go through newRawIO, for
// layers that need a net.Conn (TLS).
type rawNetConn struct {
	net.Conn
	rw io.ReadWriter
}

func (c rawNetConn) Read(p []byte) (int, error)  { return c.rw.Read(p) }
func (c rawNetConn) Write(p []byte) (int, error) { return c.rw.Write(p) }

// backends pools idle connections per endpoint address.
type backends struct {
	p      *Proxy
	mu     sync.Mutex
	idle   map[string][]*backendConn
	closed bool
}

// dialError marks a failure to connect: no byte of the request reached the
// endpoint, so another endpoint may be tried.
type dialError struct{ err error }

func (e *dialError) Error() string { return e.err.Error() }
func (e *dialError) Unwrap() error { return e.err }

func (b *backends) get(ctx context.Context, addr string) (*backendConn, error) {
	now := time.Now()
	b.mu.Lock()
	list := b.idle[addr]
	for len(list) > 0 {
		bc := list[len(list)-1]
		list[len(list)-1] = nil
		list = list[:len(list)-1]
		if now.Sub(bc.lastUsed) < b.p.cfg.BackendIdleTimeout {
			b.idle[addr] = list
			b.mu.Unlock()
			bc.reused = true
			return bc, nil
		}
		// LIFO: everything below is older still.
		for _, old := range list {
			old.close(b.p)
		}
		list = list[:0]
		bc.close(b.p)
	}
	b.idle[addr] = list
	b.mu.Unlock()
	return b.dial(ctx, addr)
}

func (b *backends) dial(ctx context.Context, addr string) (*backendConn, error) {
	d := net.Dialer{Timeout: b.p.cfg.DialTimeout, KeepAlive: 30 * time.Second}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, &dialError{fmt.Errorf("dial endpoint %s: %w", addr, err)}
	}
	rw := newRawIO(c)
	return &backendConn{conn: c, br: b.p.bufs.getReader(rw), bw: b.p.bufs.getWriter(rw), addr: addr}, nil
}

// put returns a connection whose last response was read completely.
func (b *backends) put(bc *backendConn) {
	// The connection keeps its last deadline while idle: nothing reads it
	// until the next request sets a new one.
	bc.lastUsed = time.Now()
	b.mu.Lock()
	list := b.idle[bc.addr]
	if len(list) >= b.p.cfg.MaxIdlePerEndpoint || b.closed {
		b.mu.Unlock()
		bc.close(b.p)
		return
	}
	b.idle[bc.addr] = append(list, bc)
	b.mu.Unlock()
}

// sweep closes idle connections older than the idle timeout and forgets
// addresses without connections, so removed endpoints cost nothing.
func (b *backends) sweep(now time.Time) {
	var old []*backendConn
	b.mu.Lock()
	for addr, list := range b.idle {
		keep := list[:0]
		for _, bc := range list {
			if now.Sub(bc.lastUsed) >= b.p.cfg.BackendIdleTimeout {
				old = append(old, bc)
			} else {
				keep = append(keep, bc)
			}
		}
		clear(list[len(keep):])
		if len(keep) == 0 {
			delete(b.idle, addr)
		} else {
			b.idle[addr] = keep
		}
	}
	b.mu.Unlock()
	for _, bc := range old {
		bc.close(b.p)
	}
}

func (b *backends) closeAll() {
	b.mu.Lock()
	all := b.idle
	b.idle = map[string][]*backendConn{}
	b.closed = true
	b.mu.Unlock()
	for _, list := range all {
		for _, bc := range list {
			bc.close(b.p)
		}
	}
}

func (bc *backendConn) close(p *Proxy) {
	bc.conn.Close()
	if bc.br != nil {
		p.bufs.putReader(bc.br)
		p.bufs.putWriter(bc.bw)
		bc.br, bc.bw = nil, nil
	}
}

// response is a parsed backend response head.
type response struct {
	status        int
	reason        string
	headers       []header
	contentLen    int64 // -1 unknown
	chunked       bool
	close         bool // backend will close after this response
	setsSession   bool // a Set-Cookie for JSESSIONID
	sessionCookie string
}

var errBackendProtocol = errors.New("malformed response from endpoint")

// readResponseHead parses a response head into res; its strings point into
// the returned buffer and are valid until the buffer is reused.
func readResponseHead(br *bufio.Reader, buf []byte, maxBytes int, res *response) ([]byte, error) {
	buf = buf[:0]
	partial := false
	for {
		line, err := br.ReadSlice('\n')
		if len(buf)+len(line) > maxBytes {
			return buf, fmt.Errorf("response head over %d bytes: %w", maxBytes, errBackendProtocol)
		}
		if err == bufio.ErrBufferFull {
			buf = append(buf, line...)
			partial = true
			continue
		}
		if err != nil {
			if len(buf) == 0 && len(line) == 0 {
				return buf, err
			}
			return buf, fmt.Errorf("read response head: %w", errors.Join(err, errBackendProtocol))
		}
		blank := !partial && (len(line) == 1 || (len(line) == 2 && line[0] == '\r'))
		partial = false
		if blank {
			if len(buf) == 0 {
				continue
			}
			break
		}
		buf = append(buf, line...)
	}
	// The fields are substrings of buf, which the connection keeps until its
	// next response: no allocation; the response is relayed before then.
	head := unsafe.String(unsafe.SliceData(buf), len(buf))
	line, rest := nextLine(head)
	version, after, ok := strings.Cut(line, " ")
	if !ok || !strings.HasPrefix(version, "HTTP/1.") || len(after) < 3 {
		return buf, fmt.Errorf("status line %q: %w", line, errBackendProtocol)
	}
	code, reason, _ := strings.Cut(after, " ")
	st, err := strconv.Atoi(code)
	if err != nil || len(code) != 3 || st < 100 {
		return buf, fmt.Errorf("status line %q: %w", line, errBackendProtocol)
	}
	*res = response{status: st, reason: reason, headers: res.headers[:0], contentLen: -1, close: version == "HTTP/1.0"}
	keepAlive := false
	var connection string
	cls := 0
	for {
		var hl string
		hl, rest = nextLine(rest)
		if hl == "" {
			break
		}
		name, value, ok := strings.Cut(hl, ":")
		if !ok || !validHeaderName(name) {
			return buf, fmt.Errorf("response header %q: %w", hl, errBackendProtocol)
		}
		value = strings.Trim(value, " \t")
		hop := false
		switch len(name) {
		case 2:
			hop = strings.EqualFold(name, "TE")
		case 7:
			if strings.EqualFold(name, "Upgrade") {
				hop = st != 101
			} else {
				hop = strings.EqualFold(name, "Trailer")
			}
		case 10:
			if strings.EqualFold(name, "Connection") {
				hop = true
				connection = value
				forEachToken(value, func(tok string) {
					if strings.EqualFold(tok, "close") {
						res.close = true
					} else if strings.EqualFold(tok, "keep-alive") {
						keepAlive = true
					}
				})
			} else if strings.EqualFold(name, "Keep-Alive") {
				hop = true
			} else if strings.EqualFold(name, "Set-Cookie") && strings.HasPrefix(value, sessionCookie+"=") {
				res.setsSession = true
				res.sessionCookie = value
			}
		case 14:
			if strings.EqualFold(name, "Content-Length") {
				n, err := strconv.ParseInt(value, 10, 64)
				if err != nil || n < 0 || (cls > 0 && n != res.contentLen) {
					return buf, fmt.Errorf("content-length %q: %w", value, errBackendProtocol)
				}
				cls++
				res.contentLen = n
				hop = true
			}
		case 17:
			if strings.EqualFold(name, "Transfer-Encoding") {
				hop = true
				if !strings.EqualFold(value, "chunked") {
					return buf, fmt.Errorf("transfer-encoding %q: %w", value, errBackendProtocol)
				}
				res.chunked = true
			}
		case 16, 18:
			hop = strings.EqualFold(name, "Proxy-Connection") || strings.EqualFold(name, "Proxy-Authenticate")
		}
		res.headers = append(res.headers, header{name: name, value: value, hop: hop})
	}
	if res.chunked {
		res.contentLen = -1
	}
	if version == "HTTP/1.0" && keepAlive {
		res.close = false
	}
	if connection != "" && st != 101 {
		// On a 101 Connection names Upgrade, which must reach the client.
		markConnectionTokens(res.headers, connection)
	}
	return buf, nil
}

// bodyless reports whether a response to method with status has no body
// whatever its headers say (RFC 9112 6.3).
func bodyless(method string, status int) bool {
	return method == "HEAD" || status/100 == 1 || status == 204 || status == 304
}

// copyBuffer copies src to dst with buf, returning whether the error came
// from writing (the client) or reading (the endpoint).
func copyBody(dst sink, src io.Reader, buf []byte, flush bool, onRead func()) (n int64, readErr, writeErr error) {
	for {
		nr, er := src.Read(buf)
		if nr > 0 {
			if onRead != nil {
				onRead()
			}
			nw, ew := dst.write(buf[:nr])
			n += int64(nw)
			if ew != nil {
				return n, nil, ew
			}
			if flush {
				if ew := dst.flush(); ew != nil {
					return n, nil, ew
				}
			}
		}
		if er == io.EOF {
			return n, nil, nil
		}
		if er != nil {
			return n, er, nil
		}
	}
}
