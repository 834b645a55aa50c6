// Package nonblock does socket I/O that never parks the calling goroutine
// on the runtime's poller: for goroutines that must not wait for one peer
// (an HTTP/2 connection's reader serves every stream) and for callers that
// wait for readiness their own way (an epoll set of idle sockets). Its
// ReadWait and WriteAll wait on the poller as net.Conn does, for the data
// path's other reads and writes.
//
// Every system call here is made raw (syscall.RawSyscall), without the
// runtime's syscall entry, which is harmless on a non-blocking socket and
// spares a context switch or more per burst of traffic: the entry wakes
// the runtime's monitor thread (sysmon) whenever it sleeps because the
// whole process was idle, and the monitor then polls every 20 µs until the
// process is idle again. Between the requests of request/response traffic
// a ztunnel is idle, so with net.Conn's reads and writes each request paid
// for that wake-up in both ztunnels: 13.2 context switches per request
// over the two, 5.3 with raw calls (amber-bench tunnel -profile, the
// latency phase; ARCHITECTURE.md, "System calls that do not wake the
// scheduler's monitor"). amber-ztunnel and amber-waypoint now also keep
// the monitor out of that sleep altogether (internal/cli.KeepMonitorAwake,
// for the accepts, dials and closes that still take the entry): the raw
// calls spare the data path the wake-up where that setting is turned
// off, and the entry's own bookkeeping everywhere.
package nonblock

import "errors"

// ErrWouldBlock is Read's error when the socket has nothing to read.
var ErrWouldBlock = errors.New("nonblock: no data")

// Reader reads its socket with Read: it never waits.
type Reader struct{ Raw RawConn }

func (r Reader) Read(p []byte) (int, error) { return Read(r.Raw, p) }
