//go:build linux

package proxy

import (
	"io"
	"net"
	"os"
	"syscall"
	"unsafe"
)

// rawIO reads and writes a TCP socket with raw system calls through its
// RawConn: still non-blocking and parked on the netpoller when the socket
// is not ready, but without telling the scheduler a system call is under
// way. On a busy core the ordinary path costs more than the I/O: a read or
// write preempted by the process it woke (the backend shares the core)
// looks blocked to sysmon, which hands the P to another thread, and the
// threads then take turns on the same core (measured with strace: a
// nanosleep or futex per request). Non-blocking socket calls never block,
// so keeping the P is right.
//
// Reads and writes may run at once (TLS, HTTP/2, tunnels): each direction
// has its own state.
type rawIO struct {
	rc syscall.RawConn
	r  rawOp
	w  rawOp
}

// rawOp is one direction's call: its buffer, result, and a callback built
// once, since a closure per call would allocate per read and write.
type rawOp struct {
	trap  uintptr
	p     []byte
	n     int
	errno syscall.Errno
	fn    func(fd uintptr) bool
}

// newRawIO returns raw I/O for a TCP connection, or c itself otherwise.
func newRawIO(c net.Conn) io.ReadWriter {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return c
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return c
	}
	x := &rawIO{rc: rc}
	x.r.init(syscall.SYS_READ)
	x.w.init(syscall.SYS_WRITE)
	return x
}

func (o *rawOp) init(trap uintptr) {
	o.trap = trap
	o.fn = o.do
}

// do makes one read or write; false asks the netpoller to wait.
func (o *rawOp) do(fd uintptr) bool {
	for {
		n, _, e := syscall.RawSyscall(o.trap, fd, uintptr(unsafe.Pointer(&o.p[0])), uintptr(len(o.p)))
		switch e {
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false
		}
		o.n, o.errno = int(n), e
		return true
	}
}

func (x *rawIO) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	x.r.p = p
	err := x.rc.Read(x.r.fn)
	x.r.p = nil
	switch {
	case err != nil:
		return 0, err // deadline or closed connection
	case x.r.errno != 0:
		return 0, os.NewSyscallError("read", x.r.errno)
	case x.r.n == 0:
		return 0, io.EOF
	}
	return x.r.n, nil
}

func (x *rawIO) Write(p []byte) (int, error) {
	total := 0
	for total < len(p) {
		x.w.p = p[total:]
		err := x.rc.Write(x.w.fn)
		x.w.p = nil
		switch {
		case err != nil:
			return total, err
		case x.w.errno != 0:
			return total, os.NewSyscallError("write", x.w.errno)
		case x.w.n <= 0:
			return total, io.ErrShortWrite // a socket never does this; do not spin if it did
		}
		total += x.w.n
	}
	return total, nil
}
