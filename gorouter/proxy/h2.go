package proxy

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// ServeHTTP serves requests that net/http parsed: HTTP/2 over TLS. HTTP/1.x
// never comes this way; it has its own stricter front end.
func (p *Proxy) ServeHTTP(w http.ResponseWriter, hr *http.Request) {
	r := &request{
		ctx:        hr.Context(),
		method:     hr.Method,
		target:     hr.RequestURI,
		host:       hr.Host,
		remoteAddr: hr.RemoteAddr,
		tls:        hr.TLS != nil,
		start:      time.Now(),
	}
	if r.target == "" || !strings.HasPrefix(r.target, "/") {
		r.target = hr.URL.RequestURI()
	}
	r.path, _, _ = strings.Cut(r.target, "?")
	for name, values := range hr.Header {
		for _, v := range values {
			if strings.EqualFold(name, "Content-Length") || strings.EqualFold(name, "Host") {
				continue
			}
			if r.classify(name, v) {
				r.headers = append(r.headers, header{name: name, value: v})
			}
		}
	}
	if r.connection != "" {
		markConnectionTokens(r.headers, r.connection)
	}
	r.upgrade = "" // HTTP/2 has no Upgrade; extended CONNECT is not offered
	s := &stdSink{w: w, rc: http.NewResponseController(w), done: hr.Context().Done()}
	if hr.Body != nil && hr.Body != http.NoBody {
		if hr.ContentLength > p.cfg.MaxBodyBytes {
			p.refuse(r, s, errBodyTooLarge)
			return
		}
		r.contentLen = hr.ContentLength
		r.body = &limitedBody{r: hr.Body, left: p.cfg.MaxBodyBytes}
	}
	p.serve(r, s)
}

// limitedBody fails with errBodyTooLarge past its limit.
type limitedBody struct {
	r    io.Reader
	left int64
}

func (l *limitedBody) Read(b []byte) (int, error) {
	n, err := l.r.Read(b)
	l.left -= int64(n)
	if l.left < 0 {
		return n, errBodyTooLarge
	}
	return n, err
}

// stdSink writes a response through net/http.
type stdSink struct {
	w     http.ResponseWriter
	rc    *http.ResponseController
	n     int64
	wrote bool
	done  <-chan struct{} // the request's context: closed when the client resets the stream
}

func (s *stdSink) head(status int, _ string, hs []header, length int64, noBody bool) error {
	s.wrote = true
	h := s.w.Header()
	for _, x := range hs {
		if !x.hop {
			// net/http keeps the map past this call (HTTP/2 encodes it on
			// another goroutine): copy out of the connection's buffer.
			name := strings.Clone(x.name)
			h[name] = append(h[name], strings.Clone(x.value))
		}
	}
	if length >= 0 && !noBody {
		h.Set("Content-Length", strconv.FormatInt(length, 10))
	}
	s.w.WriteHeader(status)
	return nil
}

func (s *stdSink) write(b []byte) (int, error) {
	n, err := s.w.Write(b)
	s.n += int64(n)
	return n, err
}

func (s *stdSink) flush() error        { return s.rc.Flush() }
func (s *stdSink) end() error          { return nil }
func (s *stdSink) sendContinue() error { return nil } // net/http sends it when the body is read
func (s *stdSink) hijack() (net.Conn, *bufio.Reader, *bufio.Writer, bool) {
	return nil, nil, nil, false
}
func (s *stdSink) bytesWritten() int64 { return s.n }
func (s *stdSink) headWritten() bool   { return s.wrote }
func (s *stdSink) markClose()          {}
func (s *stdSink) clientGone() bool {
	select {
	case <-s.done:
		return true
	default:
		return false
	}
}
