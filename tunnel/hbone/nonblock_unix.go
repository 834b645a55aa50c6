//go:build unix

package hbone

import (
	"net"
	"os"
	"syscall"
)

// rawConn returns nc's syscall.RawConn for tryWrite, or nil.
func rawConn(nc any) syscall.RawConn {
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return nil
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return raw
}

// tryWrite writes as much of p to raw's socket as it takes without
// blocking: 0 and no error when it is full. It is for goroutines that
// must never wait for a peer (the connection reader) or that hand the
// wait to another goroutine (inline writes).
func tryWrite(raw syscall.RawConn, p []byte) (int, error) {
	var n int
	var werr error
	err := raw.Write(func(fd uintptr) bool {
		for {
			n, werr = syscall.Write(int(fd), p)
			if werr != syscall.EINTR {
				return true // never park on the poller
			}
		}
	})
	switch {
	case err != nil:
		return 0, err
	case werr == syscall.EAGAIN:
		return 0, nil
	case werr != nil:
		return 0, &net.OpError{Op: "write", Net: "tcp", Err: os.NewSyscallError("write", werr)}
	}
	return max(n, 0), nil
}
