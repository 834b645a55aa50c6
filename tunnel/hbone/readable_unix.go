//go:build unix

package hbone

import (
	"io"
	"net"
	"syscall"
)

// readableFunc returns a function that blocks until r has data or an
// error to report, without a buffer, when r is a socket; nil otherwise.
// An idle tunnel spends its life waiting in ReadFrom: this way it waits
// holding no buffer at all.
func readableFunc(r io.Reader) func() {
	raw := rawConn(r)
	if raw == nil {
		return nil
	}
	return func() {
		// Errors are left for the Read that follows to report.
		_ = raw.Read(hasInput)
	}
}

// awaitInput blocks until nc has input or an error to report (its end
// included), holding no buffer. It returns os.ErrDeadlineExceeded when
// nc's read deadline passes first, and nil at once when nc is not a
// socket.
func awaitInput(nc net.Conn) error {
	raw := rawConn(nc)
	if raw == nil {
		return nil
	}
	return raw.Read(hasInput)
}

// hasInput is a syscall.RawConn.Read callback: done once the socket has
// a byte or an error to report.
func hasInput(fd uintptr) bool {
	var b [1]byte
	_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
	return err != syscall.EAGAIN && err != syscall.EINTR
}
