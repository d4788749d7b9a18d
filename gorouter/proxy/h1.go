package proxy

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
	"unsafe"
)

// h1conn serves one client connection speaking HTTP/1.x. It parses requests
// itself, strictly, because the router is the edge: anything ambiguous
// (Content-Length with Transfer-Encoding, bad header names, folded lines) is
// refused rather than normalized, so no backend can read a request
// differently from the router.
type h1conn struct {
	p      *Proxy
	conn   net.Conn
	br     *bufio.Reader
	bw     *bufio.Writer
	tls    bool
	remote string        // RemoteAddr().String() once per connection, not per request
	state  *atomic.Int32 // connIdle or connActive, read by the drainer

	hbuf []byte
	req  request
	body bodyReader

	// response state
	chunked    bool
	closeAfter bool
	wroteHead  bool
	respBytes  int64
	hijacked   bool
}

const (
	connActive int32 = iota
	connIdle
)

func (c *h1conn) serve() {
	defer func() {
		if !c.hijacked {
			c.conn.Close()
		}
		c.p.bufs.putReader(c.br)
		c.p.bufs.putWriter(c.bw)
	}()
	for {
		c.state.Store(connIdle)
		if c.p.draining.Load() {
			return
		}
		c.conn.SetReadDeadline(time.Now().Add(c.p.cfg.ClientIdleTimeout))
		if _, err := c.br.Peek(1); err != nil {
			return
		}
		c.state.Store(connActive)
		if !headBuffered(c.br) {
			// A slow client gets ReadHeaderTimeout for the rest of the head;
			// the usual head arrived whole and costs no extra timer update.
			c.conn.SetReadDeadline(time.Now().Add(c.p.cfg.ReadHeaderTimeout))
		}
		c.req.reset()
		c.chunked, c.closeAfter, c.wroteHead, c.respBytes = false, false, false, 0
		err := c.readRequest()
		if err != nil {
			if !errors.Is(err, io.EOF) && !isTimeout(err) {
				c.p.refuse(&c.req, c, err)
				c.bw.Flush()
			}
			return
		}
		if c.req.body != nil {
			// Bodies stream at the client's pace, bounded by the endpoint's
			// timeouts instead.
			c.conn.SetReadDeadline(time.Time{})
		}
		c.p.serve(&c.req, c)
		if c.hijacked {
			return
		}
		if c.closeAfter || c.req.wantClose || (c.req.proto10 && !c.req.keepAlive10) || !c.body.done() {
			return
		}
	}
}

// readRequest parses the request head into c.req and prepares c.body.
func (c *h1conn) readRequest() error {
	c.hbuf = c.hbuf[:0]
	max := c.p.cfg.MaxHeaderBytes
	partial := false
	for {
		line, err := c.br.ReadSlice('\n')
		if len(c.hbuf)+len(line) > max {
			return errHeaderTooLarge
		}
		if err == bufio.ErrBufferFull {
			c.hbuf = append(c.hbuf, line...)
			partial = true
			continue
		}
		if err != nil {
			if len(c.hbuf) == 0 && len(line) == 0 {
				return io.EOF
			}
			return fmt.Errorf("read request head: %w", err)
		}
		blank := !partial && (len(line) == 1 || (len(line) == 2 && line[0] == '\r'))
		partial = false
		if blank {
			if len(c.hbuf) == 0 {
				continue // RFC 9112 2.2: ignore empty lines before the request line
			}
			break
		}
		c.hbuf = append(c.hbuf, line...)
	}
	// Every field is a substring of the head, which stays in c.hbuf until
	// the next request is read: no allocation (see request's lifetime).
	head := unsafe.String(unsafe.SliceData(c.hbuf), len(c.hbuf))
	r := &c.req
	r.ctx = c.p.ctx
	r.tls = c.tls
	r.start = time.Now()
	r.remoteAddr = c.remote

	line, rest := nextLine(head)
	method, rest1, ok1 := strings.Cut(line, " ")
	target, version, ok2 := strings.Cut(rest1, " ")
	if !ok1 || !ok2 || !validHeaderName(method) || target == "" || strings.ContainsAny(target, " \t") || !validHeaderValue(target) {
		return fmt.Errorf("request line %q: %w", line, errBadRequest)
	}
	switch version {
	case "HTTP/1.1":
	case "HTTP/1.0":
		r.proto10 = true
	default:
		if strings.HasPrefix(version, "HTTP/") {
			return errVersion
		}
		return fmt.Errorf("request line %q: %w", line, errBadRequest)
	}
	if method == "CONNECT" {
		return errMethodNotAllowed
	}
	r.method = method

	var hosts, contentLens int
	var cl int64 = -2
	var te string
	for {
		var hl string
		hl, rest = nextLine(rest)
		if hl == "" {
			break
		}
		if hl[0] == ' ' || hl[0] == '\t' {
			return fmt.Errorf("obsolete line folding: %w", errBadRequest)
		}
		name, value, ok := strings.Cut(hl, ":")
		if !ok || !validHeaderName(name) {
			return fmt.Errorf("header line %q: %w", hl, errBadRequest)
		}
		value = strings.Trim(value, " \t")
		if !validHeaderValue(value) {
			return fmt.Errorf("header %s: control character in value: %w", name, errBadRequest)
		}
		switch {
		case strings.EqualFold(name, "Host"):
			hosts++
			r.host = value
			continue
		case strings.EqualFold(name, "Content-Length"):
			contentLens++
			n, err := strconv.ParseInt(value, 10, 64)
			if err != nil || n < 0 || value[0] == '+' {
				return fmt.Errorf("content-length %q: %w", value, errBadRequest)
			}
			if cl >= 0 && cl != n {
				return fmt.Errorf("conflicting content-length: %w", errBadRequest)
			}
			cl = n
			continue
		case strings.EqualFold(name, "Transfer-Encoding"):
			if te != "" {
				te += ","
			}
			te += value
			continue
		}
		if r.classify(name, value) {
			r.headers = append(r.headers, header{name: name, value: value})
		}
	}
	if r.connection != "" {
		markConnectionTokens(r.headers, r.connection)
	}

	// Absolute-form carries the authority, which then wins over Host.
	if !strings.HasPrefix(target, "/") {
		switch {
		case target == "*" && method == "OPTIONS":
		case strings.HasPrefix(target, "http://") || strings.HasPrefix(target, "https://"):
			_, after, _ := strings.Cut(target, "://")
			authority, path, found := strings.Cut(after, "/")
			if authority == "" {
				return fmt.Errorf("request target %q: %w", target, errBadRequest)
			}
			r.host = authority
			target = "/" + path
			if !found {
				target = "/"
			}
		default:
			return fmt.Errorf("request target %q: %w", target, errBadRequest)
		}
	}
	r.target = target
	r.path, _, _ = strings.Cut(target, "?")
	if hosts > 1 || (hosts == 0 && !r.proto10 && r.host == "") {
		return fmt.Errorf("%d host headers: %w", hosts, errBadRequest)
	}

	// Framing: the router refuses every ambiguous combination.
	switch {
	case te != "" && contentLens > 0:
		return fmt.Errorf("both content-length and transfer-encoding: %w", errBadRequest)
	case te != "":
		if r.proto10 {
			return fmt.Errorf("transfer-encoding in HTTP/1.0: %w", errBadRequest)
		}
		if !strings.EqualFold(te, "chunked") {
			return fmt.Errorf("transfer-encoding %q: %w", te, errNotImplemented)
		}
		r.contentLen = -1
		c.body.reset(httputil.NewChunkedReader(c.br), c.br, -1, c.p.cfg.MaxBodyBytes)
		r.body = &c.body
	case cl > 0:
		if cl > c.p.cfg.MaxBodyBytes {
			return errBodyTooLarge
		}
		r.contentLen = cl
		c.body.reset(c.br, nil, cl, cl)
		r.body = &c.body
	default:
		r.contentLen = 0
		c.body.reset(nil, nil, 0, 0)
	}
	return nil
}

// headBuffered reports whether a whole request head is already buffered.
func headBuffered(br *bufio.Reader) bool {
	b, _ := br.Peek(br.Buffered())
	return bytes.Contains(b, []byte("\r\n\r\n")) || bytes.Contains(b, []byte("\n\n"))
}

// writeInt writes a non-negative n in base 10 or 16 without allocating
// (strconv.Append* into a stack buffer escapes through bufio.Writer.Write).
func writeInt(bw *bufio.Writer, n int64, base int64) {
	var digits [20]byte
	i := len(digits)
	for {
		i--
		digits[i] = "0123456789abcdef"[n%base]
		n /= base
		if n == 0 {
			break
		}
	}
	for ; i < len(digits); i++ {
		bw.WriteByte(digits[i])
	}
}

func nextLine(s string) (line, rest string) {
	line, rest, _ = strings.Cut(s, "\n")
	return strings.TrimSuffix(line, "\r"), rest
}

// bodyReader reads a request body, bounding its size and, for chunked
// bodies, consuming the trailer so the next request starts cleanly.
type bodyReader struct {
	r       io.Reader
	br      *bufio.Reader // set for chunked bodies: where the trailer is read
	left    int64         // bytes left for a Content-Length body; -1 chunked
	limit   int64
	read    int64
	eof     bool
	trailer bool
}

func (b *bodyReader) reset(r io.Reader, br *bufio.Reader, length, limit int64) {
	*b = bodyReader{r: r, br: br, left: length, limit: limit, eof: r == nil}
}

func (b *bodyReader) done() bool { return b.eof }

func (b *bodyReader) Read(p []byte) (int, error) {
	if b.eof {
		return 0, io.EOF
	}
	if b.left >= 0 {
		if b.left == 0 {
			b.eof = true
			return 0, io.EOF
		}
		if int64(len(p)) > b.left {
			p = p[:b.left]
		}
		n, err := b.r.Read(p)
		b.left -= int64(n)
		if b.left == 0 {
			b.eof = true
			err = nil
			if n == 0 {
				err = io.EOF
			}
		} else if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return n, err
	}
	n, err := b.r.Read(p)
	b.read += int64(n)
	if b.read > b.limit {
		return n, errBodyTooLarge
	}
	if err == io.EOF {
		if terr := b.readTrailer(); terr != nil {
			return n, terr
		}
		b.eof = true
	}
	return n, err
}

// readTrailer skips trailer fields: they are not forwarded, but must be
// consumed to find the next request.
func (b *bodyReader) readTrailer() error {
	total := 0
	for {
		line, err := b.br.ReadSlice('\n')
		if err != nil {
			return fmt.Errorf("read chunked trailer: %w", err)
		}
		total += len(line)
		if total > 8<<10 {
			return fmt.Errorf("chunked trailer: %w", errHeaderTooLarge)
		}
		if len(line) == 1 || (len(line) == 2 && line[0] == '\r') {
			return nil
		}
	}
}

// --- sink: writing the response to an HTTP/1.x client ---

func (c *h1conn) head(status int, reason string, hs []header, length int64, noBody bool) error {
	c.wroteHead = true
	bw := c.bw
	if c.req.proto10 {
		bw.WriteString("HTTP/1.0 ")
	} else {
		bw.WriteString("HTTP/1.1 ")
	}
	writeInt(bw, int64(status), 10)
	bw.WriteByte(' ')
	if reason == "" {
		reason = http.StatusText(status)
	}
	bw.WriteString(reason)
	bw.WriteString("\r\n")
	for _, h := range hs {
		if h.hop {
			continue
		}
		bw.WriteString(h.name)
		bw.WriteString(": ")
		bw.WriteString(h.value)
		bw.WriteString("\r\n")
	}
	switch {
	case status == http.StatusSwitchingProtocols:
	case noBody:
	case length >= 0:
		bw.WriteString("Content-Length: ")
		writeInt(bw, length, 10)
		bw.WriteString("\r\n")
	case !c.req.proto10:
		c.chunked = true
		bw.WriteString("Transfer-Encoding: chunked\r\n")
	default:
		c.closeAfter = true
	}
	if c.p.draining.Load() {
		c.closeAfter = true
	}
	switch {
	case status == http.StatusSwitchingProtocols:
	case c.closeAfter || c.req.wantClose || (c.req.proto10 && !c.req.keepAlive10):
		bw.WriteString("Connection: close\r\n")
	case c.req.proto10:
		bw.WriteString("Connection: keep-alive\r\n")
	}
	_, err := bw.WriteString("\r\n")
	return err
}

func (c *h1conn) write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	c.respBytes += int64(len(p))
	if !c.chunked {
		return c.bw.Write(p)
	}
	writeInt(c.bw, int64(len(p)), 16)
	c.bw.WriteString("\r\n")
	n, err := c.bw.Write(p)
	if err != nil {
		return n, err
	}
	_, err = c.bw.WriteString("\r\n")
	return n, err
}

func (c *h1conn) end() error {
	if c.chunked {
		c.bw.WriteString("0\r\n\r\n")
	}
	return c.bw.Flush()
}

func (c *h1conn) flush() error { return c.bw.Flush() }

func (c *h1conn) sendContinue() error {
	if c.req.proto10 {
		return nil
	}
	c.bw.WriteString("HTTP/1.1 100 Continue\r\n\r\n")
	return c.bw.Flush()
}

func (c *h1conn) hijack() (net.Conn, *bufio.Reader, *bufio.Writer, bool) {
	c.hijacked = true
	return c.conn, c.br, c.bw, true
}

func (c *h1conn) markClose() { c.closeAfter = true }

// clientGone peeks with a 1 ms deadline: a closed client reads EOF at once.
// (A deadline already past would fail before trying the read.)
func (c *h1conn) clientGone() bool {
	if c.req.body != nil && !c.body.done() || c.br.Buffered() > 0 {
		return false
	}
	c.conn.SetReadDeadline(time.Now().Add(time.Millisecond))
	_, err := c.br.Peek(1)
	return err != nil && !isTimeout(err)
}

func (c *h1conn) bytesWritten() int64 { return c.respBytes }

func (c *h1conn) headWritten() bool { return c.wroteHead }
