//go:build unix

package nonblock

import (
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"unsafe"
)

// RawConn is a socket's syscall.RawConn.
type RawConn = syscall.RawConn

// Raw returns c's syscall.RawConn, or nil when c is not a socket.
func Raw(c any) RawConn {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return raw
}

// Write writes as much of p to raw's socket as it takes without blocking:
// 0 and no error when its buffer is full.
func Write(raw RawConn, p []byte) (int, error) { return writeSock(raw, false, p) }

// Read reads what raw's socket holds without waiting: ErrWouldBlock when
// it holds nothing, io.EOF at its end.
func Read(raw RawConn, p []byte) (int, error) { return readSock(raw, false, p) }

// ReadWait reads into p from raw's socket, waiting on the poller for
// input as net.Conn's Read does, its read deadline included: io.EOF at
// the socket's end.
func ReadWait(raw RawConn, p []byte) (int, error) { return readSock(raw, true, p) }

// WriteAll writes all of p to raw's socket, waiting on the poller for
// room as net.Conn's Write does, its write deadline included.
func WriteAll(raw RawConn, p []byte) (int, error) { return writeSock(raw, true, p) }

func readSock(raw RawConn, wait bool, p []byte) (int, error) {
	n, errno, err := do(raw, false, wait, p)
	switch {
	case err != nil:
		return 0, err
	case errno == syscall.EAGAIN:
		return 0, ErrWouldBlock // without wait only
	case errno != nil:
		return 0, &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", errno)}
	case n == 0 && len(p) > 0:
		return 0, io.EOF
	}
	return n, nil
}

func writeSock(raw RawConn, wait bool, p []byte) (int, error) {
	n, errno, err := do(raw, true, wait, p)
	switch {
	case err != nil:
		return n, err
	case errno == syscall.EAGAIN:
		return n, nil // without wait only: the socket is full
	case errno != nil:
		return n, &net.OpError{Op: "write", Net: "tcp", Err: os.NewSyscallError("write", errno)}
	case wait && n < len(p):
		return n, io.ErrShortWrite // a socket takes a byte or says EAGAIN: not seen
	}
	return n, nil
}

// do runs a read or write of p on raw's descriptor through raw.Read or
// raw.Write: errno is the call's result, err the RawConn's. Without wait
// it makes one call (EINTR aside) and never parks on the poller; with
// wait it parks while the socket has no input (read) or no room (write).
//
// The call's state lives in a pooled op whose callback is bound once: a
// closure handed to RawConn escapes, and with it the variables it
// captures, several allocations per call on the data path otherwise.
func do(raw RawConn, write, wait bool, p []byte) (n int, errno, err error) {
	o := opPool.Get().(*op)
	o.p, o.write, o.wait = p, write, wait
	if write {
		err = raw.Write(o.fn)
	} else {
		err = raw.Read(o.fn)
	}
	n, errno = o.n, o.errno
	*o = op{fn: o.fn}
	opPool.Put(o)
	return n, errno, err
}

// op is one call of do.
type op struct {
	fn    func(uintptr) bool // o.run, bound when the op is made
	p     []byte             // what is left to read into or write
	write bool
	wait  bool // return false on EAGAIN: the RawConn waits on the poller and calls again
	n     int
	errno error
}

var opPool = sync.Pool{New: func() any {
	o := new(op)
	o.fn = o.run
	return o
}}

// run is o's RawConn callback: one read, or writes until p is written or
// the socket is full.
func (o *op) run(fd uintptr) bool {
	nr := uintptr(syscall.SYS_READ)
	if o.write {
		nr = syscall.SYS_WRITE
	}
	for {
		r, _, e := syscall.RawSyscall(nr, fd, uintptr(unsafe.Pointer(unsafe.SliceData(o.p))), uintptr(len(o.p)))
		switch {
		case e == syscall.EINTR:
			continue
		case e == syscall.EAGAIN && o.wait:
			return false
		case e != 0:
			o.errno = e
			return true
		}
		o.n += int(r)
		if o.wait && o.write && r > 0 && int(r) < len(o.p) {
			o.p = o.p[r:]
			continue
		}
		return true
	}
}

// WaitReadable blocks until raw's socket has input or an error to report
// (its end included), holding no buffer: the read that follows reports
// what there is. The socket's read deadline applies
// (os.ErrDeadlineExceeded).
func WaitReadable(raw RawConn) error {
	return raw.Read(hasInput)
}

// WaitReadableOrWoken is WaitReadable for a caller that reads next and
// takes ErrWouldBlock as a reason to wait again: it looks for input once,
// as WaitReadable does (readiness from before the call is not kept for
// the wait), then trusts the poller's wake-up rather than looking again.
// That saves one system call per wait; a wake-up with nothing to read
// costs the caller one empty read.
func WaitReadableOrWoken(raw RawConn) error {
	w := waitPool.Get().(*waiter)
	err := raw.Read(w.fn)
	w.waited = false
	waitPool.Put(w)
	return err
}

// waiter is one call of WaitReadableOrWoken, pooled as op is: its
// callback is bound once.
type waiter struct {
	fn     func(uintptr) bool // w.run
	waited bool
}

var waitPool = sync.Pool{New: func() any {
	w := new(waiter)
	w.fn = w.run
	return w
}}

func (w *waiter) run(fd uintptr) bool {
	if w.waited {
		return true
	}
	w.waited = true
	return hasInput(fd)
}

// hasInput is a syscall.RawConn.Read callback: done once the socket has
// a byte or an error to report.
func hasInput(fd uintptr) bool {
	var b [1]byte
	_, _, err := syscall.RawSyscall6(syscall.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&b[0])), 1, syscall.MSG_PEEK|syscall.MSG_DONTWAIT, 0, 0)
	return err != syscall.EAGAIN && err != syscall.EINTR
}
