// Package nonblock does socket I/O that never parks the calling goroutine
// on the runtime's poller: for goroutines that must not wait for one peer
// (an HTTP/2 connection's reader serves every stream) and for callers that
// wait for readiness their own way (an epoll set of idle sockets).
package nonblock

import "errors"

// ErrWouldBlock is Read's error when the socket has nothing to read.
var ErrWouldBlock = errors.New("nonblock: no data")

// Reader reads its socket with Read: it never waits.
type Reader struct{ Raw RawConn }

func (r Reader) Read(p []byte) (int, error) { return Read(r.Raw, p) }
