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
type rawIO struct {
	rc      syscall.RawConn
	p       []byte
	n       int
	errno   syscall.Errno
	readFn  func(fd uintptr) bool
	writeFn func(fd uintptr) bool
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
	r := &rawIO{rc: rc}
	// Built once: a closure per call would allocate per read and write.
	r.readFn = func(fd uintptr) bool { return r.do(syscall.SYS_READ, fd) }
	r.writeFn = func(fd uintptr) bool { return r.do(syscall.SYS_WRITE, fd) }
	return r
}

// do makes one read or write; false asks the netpoller to wait.
func (r *rawIO) do(trap, fd uintptr) bool {
	for {
		n, _, e := syscall.RawSyscall(trap, fd, uintptr(unsafe.Pointer(&r.p[0])), uintptr(len(r.p)))
		switch e {
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false
		}
		r.n, r.errno = int(n), e
		return true
	}
}

func (r *rawIO) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	r.p = p
	err := r.rc.Read(r.readFn)
	r.p = nil
	switch {
	case err != nil:
		return 0, err // deadline or closed connection
	case r.errno != 0:
		return 0, os.NewSyscallError("read", r.errno)
	case r.n == 0:
		return 0, io.EOF
	}
	return r.n, nil
}

func (r *rawIO) Write(p []byte) (int, error) {
	total := 0
	for total < len(p) {
		r.p = p[total:]
		err := r.rc.Write(r.writeFn)
		r.p = nil
		switch {
		case err != nil:
			return total, err
		case r.errno != 0:
			return total, os.NewSyscallError("write", r.errno)
		}
		total += r.n
	}
	return total, nil
}
