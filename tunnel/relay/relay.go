// Package relay copies bytes between two connections, both ways and
// passing each half-close on, until both directions ended, and holds no
// goroutine for a direction while it idles.
//
// A direction out of an HBONE stream is driven by its HBONE connection's
// reader (hbone.Forward); one from a socket into an HBONE stream parks
// its socket in a Parker's epoll set once idle; anything else, such as
// socket to socket (splice), copies on a goroutine of its own. Bytes a
// caller read ahead (Replay) go first; an idle timeout is a timer, not a
// goroutine. The package knows nothing of workloads, policy or telemetry:
// the caller gets the bytes each way and why the relay ended (ztunnel
// keeps its copy.rs apart from proxy/ the same way).
package relay

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/amber-mesh/amber/tunnel/hbone"
)

// ErrIdleTimeout ends a relay that moved no byte either way for its idle
// timeout (SetIdleTimeout).
var ErrIdleTimeout = errors.New("relay: idle timeout")

// Conn is a connection whose sending side can be ended on its own:
// *net.TCPConn, *hbone.Stream.
type Conn interface {
	net.Conn
	CloseWrite() error
}

// Result is how a relay ended.
type Result struct {
	// AToB and BToA are the bytes written to b and to a. For an HBONE
	// stream they are what its connection wrote to the peer: bytes it
	// accepted and then never wrote, because its connection failed or the
	// peer reset it first, do not count (hbone.Unsent). For a socket they
	// are what the kernel took.
	AToB, BToA int64
	// Err is why the relay ended early: the error Close was given first,
	// or else the first error of a direction. An endpoint ending its
	// connection its own way after it was established (a reset, see
	// peerEnded) is not one, as in Istio's ztunnel. Nil when both
	// directions ended with a half-close.
	Err error
}

// Pair is two connections relayed into each other. Create it with
// NewPair, then Start it; Close may be called before, during and after.
type Pair struct {
	a, b       Conn
	aBuf, bBuf []byte // read ahead from a and b (Replay): relayed first
	done       func(Result)
	left       atomic.Int32 // directions still running
	res        Result       // each count written by its direction; read once both ended

	// The idle timeout (SetIdleTimeout) and its timer, set by Start.
	idle      time.Duration
	idleTimer *IdleTimer

	mu     sync.Mutex // guards the fields below
	err    error      // the first error: Close's or a direction's
	closed bool
	pump   *pump // the direction that can park, once started
}

// NewPair returns the relay of a and b, not yet started. A connection
// from Replay has its bytes read ahead relayed first.
func NewPair(a, b Conn) *Pair {
	p := &Pair{}
	p.a, p.aBuf = unreplay(a)
	p.b, p.bBuf = unreplay(b)
	return p
}

// SetIdleTimeout makes the relay end with ErrIdleTimeout once no byte
// moved in either direction for d (tcp_proxy's idle_timeout); zero, the
// default, never. Call it before Start. A timer does the waiting, so an
// idle relay still holds no goroutine; noticing each byte costs the
// direction out of an HBONE stream its direct delivery to a socket, and a
// socket-to-socket direction its splice, so only relays that need it ask.
func (p *Pair) SetIdleTimeout(d time.Duration) {
	p.idle = d
}

// Start relays a and b in both directions and returns at once. A
// direction out of an HBONE stream is hbone.Forward's; one from a socket
// into an HBONE stream parks with pk when it idles, or runs on a
// goroutine of its own when pk is nil; the others run on a goroutine of
// their own. When both directions ended, a and b are closed and done is
// called once, on the goroutine of the direction that ended last.
func (p *Pair) Start(pk *Parker, done func(Result)) {
	p.start(pk, done, nil)
}

// Run is Start, except that a direction that would run on a goroutine of
// its own — a socket read into an HBONE stream, preferably, since it
// parks — runs on the calling goroutine instead, until it parks or ends;
// Run returns then. A caller with nothing left to do after starting the
// relay (an accept handler) thus becomes a direction's copier rather than
// starting one and exiting: one goroutine start fewer per connection, and
// with it often a thread woken to run it.
func (p *Pair) Run(pk *Parker, done func(Result)) {
	var run func()
	p.start(pk, done, &run)
	if run != nil {
		run()
	}
}

// start starts both directions; with inline set, the first one that needs
// a goroutine of its own is left in *inline for the caller to run.
func (p *Pair) start(pk *Parker, done func(Result), inline *func()) {
	p.done = done
	p.left.Store(2)
	if p.idle > 0 {
		p.idleTimer = NewIdleTimer(p.idle, func() { p.Close(ErrIdleTimeout) })
		p.idleTimer.Start()
	}
	// The direction into an HBONE stream (from a socket) is the one that
	// parks: offer it the caller's goroutine first.
	first, second := p.direction(pk, p.b, p.a, p.aBuf, &p.res.AToB), p.direction(pk, p.a, p.b, p.bBuf, &p.res.BToA)
	if _, ok := p.a.(*hbone.Stream); ok {
		first, second = second, first
	}
	for _, d := range []direction{first, second} {
		if d.run == nil {
			continue
		}
		if inline != nil && *inline == nil {
			*inline = d.run
			continue
		}
		go d.run()
	}
}

// direction is a direction set up by Pair.direction: run, when set, is
// what a goroutine of its own must run.
type direction struct{ run func() }

// direction sets up copying src to dst, counting into n: first what was
// read ahead from src, on a goroutine of its own (dst may not take it at
// once), then src its usual way.
func (p *Pair) direction(pk *Parker, dst, src Conn, ahead []byte, n *int64) direction {
	if len(ahead) == 0 {
		return p.copyDirection(pk, dst, src, 0, n)
	}
	return direction{run: func() {
		k, err := p.watch(dst).Write(ahead)
		if err != nil {
			p.end(n, int64(k), err)
			return
		}
		if d := p.copyDirection(pk, dst, src, int64(k), n); d.run != nil {
			d.run()
		}
	}}
}

// copyDirection sets up copying src to dst, counting into n after base.
// A direction out of an HBONE stream starts at once (it needs no
// goroutine); the others are returned for a goroutine to run.
func (p *Pair) copyDirection(pk *Parker, dst, src Conn, base int64, n *int64) direction {
	end := func(k int64, err error) { p.end(n, base+k, err) }
	if s, ok := src.(*hbone.Stream); ok {
		hbone.Forward(s, p.watch(dst), func(k int64, err error) {
			if err == nil {
				err = dst.CloseWrite() // passes the half-close on, as proxyCopy
			}
			end(k, err)
		})
		return direction{}
	}
	if _, ok := dst.(*hbone.Stream); ok && pk != nil {
		if u := newPump(pk, dst, src, end); u != nil {
			u.touch = p.touch()
			p.setPump(u)
			return direction{run: u.run}
		}
	}
	return direction{run: func() { copyLoop(dst, p.watchReads(src), end) }}
}

// copyLoop is a direction on a goroutine of its own for as long as the
// connection lives: its name is what a stack dump shows.
func copyLoop(dst, src Conn, end func(int64, error)) {
	end(proxyCopy(dst, src))
}

// end records a direction's result; an error aborts both sides. The last
// direction to end finishes the relay.
func (p *Pair) end(n *int64, k int64, err error) {
	*n = k
	if err != nil {
		p.Close(err)
	}
	if p.left.Add(-1) == 0 {
		p.finish()
	}
}

func (p *Pair) finish() {
	p.idleTimer.Stop()
	p.a.Close()
	p.b.Close()
	res := p.res
	// Bytes count once written to the peer: an HBONE stream accepts bytes
	// it then never writes when its connection fails or the peer resets
	// it first (a TCP socket's write is the kernel's).
	res.AToB -= unsent(p.b)
	res.BToA -= unsent(p.a)
	if err := p.Err(); err != nil && !errors.Is(err, net.ErrClosed) && !peerEnded(err) {
		res.Err = err
	}
	p.done(res)
}

// Close ends the relay with err, which Result reports unless a direction
// failed first: both connections are closed, which ends both directions.
// A parked direction leaves its Parker before its socket is closed.
func (p *Pair) Close(err error) {
	p.mu.Lock()
	if p.err == nil {
		p.err = err
	}
	p.closed = true
	u := p.pump
	p.mu.Unlock()
	if u != nil {
		u.stop() // before the sockets close: see Parker.disarm
	}
	p.a.Close()
	p.b.Close()
}

// Err returns the first error that ended or is ending the relay, Close's
// or a direction's, or nil.
func (p *Pair) Err() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

func (p *Pair) setPump(u *pump) {
	p.mu.Lock()
	p.pump = u
	closed := p.closed
	p.mu.Unlock()
	if closed {
		u.stop()
	}
}

// touch returns what a direction calls when bytes moved, nil without an
// idle timeout.
func (p *Pair) touch() func() {
	if p.idleTimer == nil {
		return nil
	}
	return p.idleTimer.Touch
}

// watch is dst for a direction's writes, noting each as activity when the
// relay has an idle timeout.
func (p *Pair) watch(dst Conn) io.Writer {
	touch := p.touch()
	if touch == nil {
		return dst
	}
	return touchWriter{w: dst, touch: touch}
}

// watchReads is src for a direction that reads it itself, noting each
// read as activity when the relay has an idle timeout.
func (p *Pair) watchReads(src Conn) Conn {
	touch := p.touch()
	if touch == nil {
		return src
	}
	return touchConn{Conn: src, touch: touch}
}

type touchWriter struct {
	w     io.Writer
	touch func()
}

func (t touchWriter) Write(b []byte) (int, error) {
	n, err := t.w.Write(b)
	if n > 0 {
		t.touch()
	}
	return n, err
}

// touchConn hides src's own ways of being copied (splice), so that every
// read goes through Read.
type touchConn struct {
	Conn
	touch func()
}

func (t touchConn) Read(b []byte) (int, error) {
	n, err := t.Conn.Read(b)
	if n > 0 {
		t.touch()
	}
	return n, err
}

// Replay returns c with buffered, bytes already read from it (a protocol
// sniffer's, or an HTTP reader's read-ahead), put back in front of what c
// delivers: reading it yields them first, and a Pair relays them before
// relaying c its usual way (which for an HBONE stream or a socket holds
// no goroutine while idle).
func Replay(c Conn, buffered []byte) Conn {
	if len(buffered) == 0 {
		return c
	}
	return &replayed{Conn: c, ahead: buffered}
}

type replayed struct {
	Conn
	ahead []byte
}

func (r *replayed) Read(b []byte) (int, error) {
	if len(r.ahead) > 0 {
		n := copy(b, r.ahead)
		r.ahead = r.ahead[n:]
		return n, nil
	}
	return r.Conn.Read(b)
}

// unreplay splits a connection from Replay into the connection and what
// is still to be replayed.
func unreplay(c Conn) (Conn, []byte) {
	if r, ok := c.(*replayed); ok {
		return r.Conn, r.ahead
	}
	return c, nil
}
