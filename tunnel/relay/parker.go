package relay

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/amber-mesh/amber/tunnel/nonblock"
)

// idleAfter is how long a direction from a socket waits for it on its own
// goroutine before it hands the wait to the Parker, once bytes came more
// than once. Request/response traffic stays on the direct wait (the
// Parker adds a goroutine hand-off per wake-up); connections that really
// idle give their goroutine back soon, and with it its stack, which is
// most of what an idle connection costs (ARCHITECTURE.md, "Idle
// connections hold no goroutine").
const idleAfter = 100 * time.Millisecond

// idleFirst is the wait of a direction that has carried one burst only:
// a connection that exchanged its opening bytes and idles since (a
// pool's, a client that connects ahead) gives its goroutine back sooner,
// so that a burst of new connections does not hold a stack each for
// idleAfter — a process's RSS keeps the stacks' pages after the
// goroutines end (amber-bench's idle test: 3.8–4.3 KiB per idle
// connection over both ztunnels with idleAfter alone, 2.0–2.5 KiB with a
// 10 ms first wait).
const idleFirst = 10 * time.Millisecond

// Parker waits for many idle sockets with one goroutine: each parked
// socket is in an epoll set (EPOLLONESHOT), and the epoll descriptor
// itself waits in the runtime's poller. A socket that becomes readable
// gets its direction restarted on a new goroutine. One Parker serves any
// number of relays.
type Parker struct {
	epfd int
	file *os.File      // epfd, registered with the runtime's poller
	done chan struct{} // closed when run returns

	mu     sync.Mutex // guards the fields below
	parked map[int32]*pump
}

// NewParker returns a Parker and starts its goroutine, which ends once
// Close is called.
func NewParker() (*Parker, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	// Non-blocking, so that os.NewFile hands it to the runtime's poller.
	if err := unix.SetNonblock(epfd, true); err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("epoll nonblock: %w", err)
	}
	pk := &Parker{epfd: epfd, file: os.NewFile(uintptr(epfd), "amber-idle"), done: make(chan struct{}), parked: make(map[int32]*pump)}
	go pk.run()
	return pk, nil
}

// run dispatches readiness until Close.
func (pk *Parker) run() {
	defer close(pk.done)
	raw, err := pk.file.SyscallConn()
	if err != nil {
		return
	}
	events := make([]unix.EpollEvent, 128)
	_ = raw.Read(func(uintptr) bool {
		for {
			n, err := epollPoll(pk.epfd, events)
			if err == unix.EINTR {
				continue
			}
			for _, ev := range events[:max(n, 0)] {
				pk.mu.Lock()
				u := pk.parked[ev.Fd]
				delete(pk.parked, ev.Fd)
				pk.mu.Unlock()
				if u != nil {
					u.resume()
				}
			}
			if n < len(events) {
				return false // drained: wait for the next edge
			}
		}
	})
}

// epollPoll and epollCtl are unix.EpollWait (with a zero timeout: it
// never blocks) and unix.EpollCtl made without the runtime's syscall
// entry, which would wake the scheduler's monitor thread on every wake-up
// of a parked connection in an otherwise idle process (see package
// nonblock).
func epollPoll(epfd int, events []unix.EpollEvent) (int, error) {
	r, _, e := unix.RawSyscall6(unix.SYS_EPOLL_PWAIT, uintptr(epfd), uintptr(unsafe.Pointer(&events[0])), uintptr(len(events)), 0, 0, 0)
	if e != 0 {
		return -1, e
	}
	return int(r), nil
}

func epollCtl(epfd, op, fd int, ev *unix.EpollEvent) error {
	if _, _, e := unix.RawSyscall6(unix.SYS_EPOLL_CTL, uintptr(epfd), uintptr(op), uintptr(fd), uintptr(unsafe.Pointer(ev)), 0, 0); e != 0 {
		return e
	}
	return nil
}

// Close stops the Parker and waits for its goroutine. The relays using it
// must have ended: a socket still parked is never woken.
func (pk *Parker) Close() error {
	err := pk.file.Close()
	<-pk.done
	return err
}

// arm waits (once) for u's socket to become readable. u.mu is held.
func (pk *Parker) arm(u *pump) error {
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT, Fd: u.fd}
	pk.mu.Lock()
	defer pk.mu.Unlock()
	op := unix.EPOLL_CTL_MOD
	if !u.registered {
		op = unix.EPOLL_CTL_ADD
	}
	if err := epollCtl(pk.epfd, op, int(u.fd), &ev); err != nil {
		return err
	}
	u.registered = true
	pk.parked[u.fd] = u
	return nil
}

// disarm removes u's socket from the set, which must happen before the
// socket is closed: its descriptor may be reused. u.mu is held.
func (pk *Parker) disarm(u *pump) {
	if !u.registered {
		return
	}
	pk.mu.Lock()
	if pk.parked[u.fd] == u {
		delete(pk.parked, u.fd)
	}
	_ = epollCtl(pk.epfd, unix.EPOLL_CTL_DEL, int(u.fd), nil)
	pk.mu.Unlock()
	u.registered = false
}

// pump copies a socket into an HBONE stream without keeping a goroutine
// while the socket is idle: when nothing arrived for idleAfter (or
// idleFirst) it parks
// with the Parker and its goroutine ends; readiness starts a new one. It
// is a part of its Pair (Pair.pump), and copies the direction h.
type pump struct {
	h   *half // the direction it copies; nil while the Pair has none
	raw syscall.RawConn
	pk  *Parker
	fd  int32

	mu         sync.Mutex // guards the three fields below
	parked     bool       // waiting with the Parker, no goroutine running
	stopped    bool       // the sockets are being closed: never park again
	registered bool       // fd is in the Parker's epoll set

	// bursts counts reads that brought bytes, up to 2: from the second on
	// the direction waits idleAfter, not idleFirst. The running
	// goroutine's; last, where it fits the Pair's padding.
	bursts uint8
}

// init prepares u to copy h (whose destination takes ReadFrom), and
// reports whether it can: h's source must be a socket it can wait for
// without a goroutine. u.pk is set.
func (u *pump) init(h *half) bool {
	_, ok := h.dst().(io.ReaderFrom)
	sc, ok2 := h.src().(syscall.Conn)
	if u.pk == nil || !ok || !ok2 {
		return false
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	fd := -1
	_ = raw.Control(func(f uintptr) { fd = int(f) })
	if fd < 0 {
		return false
	}
	u.raw, u.fd = raw, int32(fd)
	return true
}

// run copies until the source has nothing to read for its wait, then
// parks; or until EOF or an error, which end the copy.
func (u *pump) run() {
	rf := u.h.dst().(io.ReaderFrom)
	// Made once per run: an interface made of a struct allocates, and
	// this loop turns once per request on a busy connection.
	var src io.Reader = &nonblock.Reader{Raw: u.raw}
	if it := u.h.p.idleTimer; it != nil {
		src = &touchReader{r: src, touch: it}
	}
	for {
		n, err := rf.ReadFrom(src)
		u.h.n += n
		if n > 0 && u.bursts < 2 {
			// ReadFrom reads until the socket is empty: bytes in a later
			// call came after a wait, or woke the pump from the Parker.
			u.bursts++
		}
		if !errors.Is(err, nonblock.ErrWouldBlock) {
			u.finish(err)
			return
		}
		if u.waitReadable() {
			continue
		}
		if u.park() {
			return
		}
	}
}

// waitReadable waits up to idleAfter (idleFirst while only one burst
// came) on this goroutine for data or an error (which the next read
// reports). A wake-up is not checked: the read that follows does, and a
// read that finds nothing comes back here.
func (u *pump) waitReadable() bool {
	src := u.h.src()
	_ = src.SetReadDeadline(time.Now().Add(u.wait()))
	err := nonblock.WaitReadableOrWoken(u.raw)
	_ = src.SetReadDeadline(time.Time{})
	return !errors.Is(err, os.ErrDeadlineExceeded)
}

// wait is how long the direction waits on its goroutine before parking.
func (u *pump) wait() time.Duration {
	if u.bursts > 1 {
		return idleAfter
	}
	return idleFirst
}

// park hands the wait to the Parker; false means the pump must go on
// (stopped, or the Parker failed), so the next read reports the outcome.
func (u *pump) park() bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.stopped || u.pk.arm(u) != nil {
		return false
	}
	u.parked = true
	return true
}

// resume restarts a parked pump on a new goroutine.
func (u *pump) resume() {
	u.mu.Lock()
	start := u.parked
	u.parked = false
	u.mu.Unlock()
	if start {
		go u.run()
	}
}

// stop is called before the sockets are closed: the pump leaves the
// Parker and, if it was parked, runs to read the close.
func (u *pump) stop() {
	u.mu.Lock()
	u.stopped = true
	u.pk.disarm(u)
	start := u.parked
	u.parked = false
	u.mu.Unlock()
	if start {
		go u.run()
	}
}

func (u *pump) finish(err error) {
	u.mu.Lock()
	u.stopped = true
	u.pk.disarm(u)
	u.mu.Unlock()
	if err == nil {
		err = u.h.dst().CloseWrite() // passes the half-close on, as proxyCopy
	}
	u.h.end(err)
}

type touchReader struct {
	r     io.Reader
	touch *IdleTimer
}

func (t touchReader) Read(b []byte) (int, error) {
	n, err := t.r.Read(b)
	if n > 0 {
		t.touch.Touch()
	}
	return n, err
}
