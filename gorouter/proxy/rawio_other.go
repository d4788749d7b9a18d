//go:build !linux

package proxy

import (
	"io"
	"net"
)

// newRawIO is the connection itself where raw socket calls are not used.
func newRawIO(c net.Conn) io.ReadWriter { return c }
