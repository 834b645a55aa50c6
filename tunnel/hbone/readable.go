package hbone

import (
	"io"
	"net"

	"github.com/amber-mesh/amber/tunnel/nonblock"
)

// readableFunc returns a function that blocks until r has data or an
// error to report, without a buffer, when r is a socket; nil otherwise.
// An idle tunnel spends its life waiting in ReadFrom: this way it waits
// holding no buffer at all.
func readableFunc(r io.Reader) func() {
	raw := nonblock.Raw(r)
	if raw == nil {
		return nil
	}
	return func() {
		// Errors are left for the Read that follows to report.
		_ = nonblock.WaitReadable(raw)
	}
}

// awaitInput blocks until nc has input or an error to report (its end
// included), holding no buffer. It returns os.ErrDeadlineExceeded when
// nc's read deadline passes first, and nil at once when nc is not a
// socket.
func awaitInput(nc net.Conn) error {
	raw := nonblock.Raw(nc)
	if raw == nil {
		return nil
	}
	return nonblock.WaitReadable(raw)
}
