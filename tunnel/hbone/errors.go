package hbone

import (
	"errors"
	"fmt"
	"net/http"

	"golang.org/x/net/http2"
)

var (
	// ErrServerClosed is returned by Server.Serve after Shutdown or Close.
	ErrServerClosed = errors.New("hbone: server closed")
	// ErrPoolClosed is returned by Pool.Connect after Close.
	ErrPoolClosed = errors.New("hbone: pool closed")
	// ErrConnClosed reports that the HTTP/2 connection carrying a stream
	// went away without a more specific cause.
	ErrConnClosed = errors.New("hbone: connection closed")
	// ErrKeepaliveTimeout reports that a keepalive PING went unanswered and
	// the connection was closed.
	ErrKeepaliveTimeout = errors.New("hbone: keepalive ping timeout")
	// ErrWriteAfterCloseWrite is returned by writes after CloseWrite: the
	// stream's END_STREAM has been sent.
	ErrWriteAfterCloseWrite = errors.New("hbone: write after CloseWrite")
	// ErrAlreadyResponded is returned by a Responder used twice.
	ErrAlreadyResponded = errors.New("hbone: response already sent")
	// ErrBadAuthority reports a CONNECT :authority that is not an IP
	// address and port.
	ErrBadAuthority = errors.New("hbone: malformed authority")
)

// StatusError is returned by Pool.Connect when the server answers the
// CONNECT with a final status other than 200.
type StatusError struct {
	Code int
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("hbone: CONNECT rejected: %d %s", e.Code, http.StatusText(e.Code))
}

// StreamError reports a stream ended by RST_STREAM (RFC 9113 §6.4), sent by
// the peer (Remote) or by this side.
type StreamError struct {
	Code   http2.ErrCode
	Remote bool
}

func (e *StreamError) Error() string {
	if e.Remote {
		return "hbone: stream reset by peer: " + e.Code.String()
	}
	return "hbone: stream reset: " + e.Code.String()
}

// GoAwayError reports a connection shut down with GOAWAY (RFC 9113 §6.8),
// by the peer (Remote) or by this side after a protocol error.
type GoAwayError struct {
	Code         http2.ErrCode
	LastStreamID uint32
	Debug        string
	Remote       bool
}

func (e *GoAwayError) Error() string {
	who := "sent"
	if e.Remote {
		who = "received"
	}
	s := fmt.Sprintf("hbone: GOAWAY %s: %s (last stream %d)", who, e.Code, e.LastStreamID)
	if e.Debug != "" {
		s += ": " + e.Debug
	}
	return s
}

// connError is a connection error detected locally (RFC 9113 §5.4.1): the
// connection is answered with GOAWAY carrying code and closed.
type connError struct {
	code   http2.ErrCode
	reason string
}

func (e connError) Error() string {
	return fmt.Sprintf("hbone: connection error %s: %s", e.code, e.reason)
}

// retryableError marks a Connect failure that happened before the server
// processed the stream (REFUSED_STREAM, GOAWAY beyond the last stream, a
// connection that closed first), so the pool may try another connection
// (RFC 9113 §8.7).
type retryableError struct{ err error }

func (e retryableError) Error() string { return e.err.Error() }
func (e retryableError) Unwrap() error { return e.err }
