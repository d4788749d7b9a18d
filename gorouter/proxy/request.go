package proxy

import (
	"context"
	"errors"
	"io"
	"strings"
	"time"
)

// header is one header field as received; hop marks fields that must not be
// forwarded (hop-by-hop, or named by the Connection header).
type header struct {
	name, value string
	hop         bool
}

// request is what the proxy core needs from a client request, filled by the
// HTTP/1.1 front end or by the net/http adapter (HTTP/2).
//
// Lifetime: on HTTP/1 its strings point into the connection's head buffer
// (no copy, no garbage per request), which the next request reuses. They
// must not outlive the request: whatever keeps one (an asynchronous log
// handler, a map handed to net/http) gets strings.Clone.
type request struct {
	ctx     context.Context // the client's (HTTP/2) or the proxy's (HTTP/1)
	method  string
	target  string // request-target forwarded as is (origin-form)
	path    string // target without query, for route matching
	host    string
	proto10 bool // client spoke HTTP/1.0
	headers []header

	contentLen int64     // body length; -1 when unknown (chunked)
	body       io.Reader // nil when there is no body

	remoteAddr string
	tls        bool
	start      time.Time

	// Fields the router itself interprets, picked out while parsing.
	connection     string // Connection header values, to strip the fields it names
	wantClose      bool
	keepAlive10    bool   // HTTP/1.0 client asked for keep-alive
	upgrade        string // "websocket" when the client asked to upgrade
	expectContinue bool
	xff            string
	xfProto        string
	xfHost         string
	requestID      string
	vcapRequestID  string
	vcapID         string // instance guid from the __VCAP_ID__ cookie
	hasJSessionID  bool
	appInstance    string // X-CF-App-Instance
	userAgent      string
	referer        string

	idBuf [36]byte // backs requestID when the router makes one
}

// bodyDone reports whether the body was read to its end.
func (r *request) bodyDone() bool {
	if b, ok := r.body.(*bodyReader); ok {
		return b.done()
	}
	return false
}

func (r *request) reset() {
	h := r.headers[:0]
	*r = request{headers: h}
}

// Errors the front end turns into a status before anything is proxied.
var (
	errBadRequest       = errors.New("bad request")
	errHeaderTooLarge   = errors.New("request header too large")
	errBodyTooLarge     = errors.New("request body too large")
	errNotImplemented   = errors.New("transfer-encoding not implemented")
	errVersion          = errors.New("http version not supported")
	errMethodNotAllowed = errors.New("method not allowed")
)

// classify picks out a header the router acts on. name is as received; the
// check is case-insensitive. It returns false when the header must not be
// forwarded.
func (r *request) classify(name, value string) (forward bool) {
	if len(name) > 20 {
		return true
	}
	var buf [20]byte
	lower := buf[:len(name)]
	for i := 0; i < len(name); i++ {
		c := name[i]
		if c >= 'A' && c <= 'Z' {
			c += 'a' - 'A'
		}
		lower[i] = c
	}
	switch string(lower) {
	case "connection", "proxy-connection":
		if r.connection == "" {
			r.connection = value
		} else {
			r.connection += "," + value
		}
		forEachToken(value, func(tok string) {
			switch {
			case strings.EqualFold(tok, "close"):
				r.wantClose = true
			case strings.EqualFold(tok, "keep-alive"):
				r.keepAlive10 = true
			}
		})
		return false
	case "keep-alive", "te", "trailer", "proxy-authorization", "proxy-authenticate":
		return false
	case "upgrade":
		if hasToken(value, "websocket") {
			r.upgrade = "websocket"
		}
		return false
	case "expect":
		if strings.EqualFold(strings.TrimSpace(value), "100-continue") {
			r.expectContinue = true
		}
		return false
	case "x-forwarded-for":
		if r.xff == "" {
			r.xff = value
		} else {
			r.xff += ", " + value
		}
		return false
	case "x-forwarded-proto":
		if r.xfProto == "" {
			r.xfProto = value
		}
		return false
	case "x-forwarded-host":
		if r.xfHost == "" {
			r.xfHost = value
		}
		return false
	case "x-request-id":
		r.requestID = value
		return false
	case "x-vcap-request-id":
		r.vcapRequestID = value
		return false
	case "x-cf-app-instance":
		r.appInstance = value
		return false
	case "cookie":
		r.scanCookies(value)
	case "user-agent":
		r.userAgent = value
	case "referer":
		r.referer = value
	}
	return true
}

func (r *request) scanCookies(v string) {
	for v != "" {
		var part string
		part, v, _ = strings.Cut(v, ";")
		part = strings.TrimSpace(part)
		name, val, _ := strings.Cut(part, "=")
		switch name {
		case vcapCookie:
			r.vcapID = strings.Trim(val, `"`)
		case sessionCookie:
			r.hasJSessionID = true
		}
	}
}

const (
	vcapCookie    = "__VCAP_ID__"
	sessionCookie = "JSESSIONID"
)

// forEachToken calls fn for each comma-separated token of a list header.
func forEachToken(v string, fn func(string)) {
	for v != "" {
		var tok string
		tok, v, _ = strings.Cut(v, ",")
		if tok = strings.TrimSpace(tok); tok != "" {
			fn(tok)
		}
	}
}

func hasToken(v, want string) bool {
	found := false
	forEachToken(v, func(tok string) {
		if strings.EqualFold(tok, want) {
			found = true
		}
	})
	return found
}

// markConnectionTokens marks headers named by Connection as hop-by-hop.
func markConnectionTokens(hs []header, connection string) {
	forEachToken(connection, func(tok string) {
		for i := range hs {
			if strings.EqualFold(hs[i].name, tok) {
				hs[i].hop = true
			}
		}
	})
}

// isTokenChar reports whether c may appear in a header name (RFC 9110 tchar).
func isTokenChar(c byte) bool {
	switch {
	case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		return true
	}
	return strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
}

func validHeaderName(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !isTokenChar(s[i]) {
			return false
		}
	}
	return true
}

// validHeaderValue refuses control characters, which is how CR/LF/NUL
// smuggling is stopped at the edge.
func validHeaderValue(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if (c < 0x20 && c != '\t') || c == 0x7f {
			return false
		}
	}
	return true
}

func clientIP(remoteAddr string) string {
	if i := strings.LastIndexByte(remoteAddr, ':'); i >= 0 {
		return strings.Trim(remoteAddr[:i], "[]")
	}
	return remoteAddr
}
