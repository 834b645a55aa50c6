package relay

import (
	"errors"
	"io"
	"syscall"

	"golang.org/x/net/http2"

	"github.com/amber-mesh/amber/tunnel/hbone"
)

// proxyCopy copies src to dst until EOF and passes the half-close on, so
// the peer reads EOF while the other direction keeps flowing (TCP
// half-close). An error other than EOF is returned so that the caller
// aborts both sides.
//
// ReadFrom is called directly: both ways have one (splice between TCP
// sockets, the stream's buffer-less wait), and io.Copy would reach it
// through src's WriteTo, adding frames under an idle connection's wait.
func proxyCopy(dst, src Conn) (int64, error) {
	var n int64
	var err error
	if rf, ok := dst.(io.ReaderFrom); ok {
		n, err = rf.ReadFrom(src)
	} else {
		n, err = io.Copy(dst, src)
	}
	if err != nil {
		return n, err
	}
	return n, dst.CloseWrite()
}

// peerEnded reports an error that only says an endpoint ended the
// connection its own way after it was established: a reset, a write to
// or a shutdown of a socket its peer already reset, the remote ztunnel
// cancelling the stream because its side did so. A TCP connection may
// end like that at any time; as in Istio's ztunnel, it is not a failure
// of the connection and Result does not report it as one. The other side
// is still torn down.
func peerEnded(err error) bool {
	var se *hbone.StreamError
	if errors.As(err, &se) {
		return se.Remote && (se.Code == http2.ErrCodeCancel || se.Code == http2.ErrCodeNo)
	}
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, syscall.ENOTCONN) || errors.Is(err, io.ErrUnexpectedEOF)
}

// unsent is hbone.Unsent for an HBONE stream, 0 for a socket.
func unsent(c Conn) int64 {
	if s, ok := c.(*hbone.Stream); ok {
		return hbone.Unsent(s)
	}
	return 0
}
