//go:build unix

package hbone

import (
	"io"
	"syscall"
)

// readableFunc returns a function that blocks until r has data or an
// error to report, without a buffer, when r is a socket; nil otherwise.
// An idle tunnel spends its life waiting in ReadFrom: this way it waits
// holding no buffer at all.
func readableFunc(r io.Reader) func() {
	sc, ok := r.(syscall.Conn)
	if !ok {
		return nil
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return func() {
		// Errors are left for the Read that follows to report.
		_ = raw.Read(func(fd uintptr) bool {
			var b [1]byte
			_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
			return err != syscall.EAGAIN && err != syscall.EINTR
		})
	}
}
