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

// Done is told how a relay ended.
type Done interface {
	RelayDone(Result)
}

// DoneFunc adapts a function to Done.
type DoneFunc func(Result)

func (f DoneFunc) RelayDone(r Result) { f(r) }

// Pair is two connections relayed into each other. Create it with
// NewPair, then Start it; Close may be called before, during and after.
//
// An idle relay holds nothing but its Pair (and its connections): each
// direction's state, including the pump of the one that can park, is a
// part of it, and each direction reports to the Pair itself, so setting
// them up allocates no closure.
type Pair struct {
	a, b      Conn
	ahead     *[2][]byte // read ahead from a and b (Replay), relayed first; nil when neither was
	done      Done
	ab, ba    half       // a to b, b to a
	idleTimer *IdleTimer // SetIdleTimeout's; nil without

	// The fields are in the order that leaves no padding: the Pair is
	// 176 bytes, a size class of Go's allocator.
	err    error      // the first error: Close's or a direction's; guarded by mu
	mu     sync.Mutex // guards err, closed and pump.h
	closed bool
	left   atomic.Int32 // directions still running
	pump   pump         // the direction that can park, once it has one (pump.h set)
}

// half is a direction of a Pair: its source copied into its destination.
type half struct {
	p *Pair
	n int64 // bytes written to the destination; read once both directions ended
}

func (h *half) aToB() bool { return h == &h.p.ab }

func (h *half) src() Conn {
	if h.aToB() {
		return h.p.a
	}
	return h.p.b
}

func (h *half) dst() Conn {
	if h.aToB() {
		return h.p.b
	}
	return h.p.a
}

// readAhead is what was read ahead from the source, to be relayed first.
func (h *half) readAhead() []byte {
	if h.p.ahead == nil {
		return nil
	}
	if h.aToB() {
		return h.p.ahead[0]
	}
	return h.p.ahead[1]
}

// NewPair returns the relay of a and b, not yet started. A connection
// from Replay has its bytes read ahead relayed first.
func NewPair(a, b Conn) *Pair {
	p := &Pair{}
	p.ab.p, p.ba.p = p, p
	var aBuf, bBuf []byte
	p.a, aBuf = unreplay(a)
	p.b, bBuf = unreplay(b)
	if aBuf != nil || bBuf != nil {
		p.ahead = &[2][]byte{aBuf, bBuf}
	}
	return p
}

// SetIdleTimeout makes the relay end with ErrIdleTimeout once no byte
// moved in either direction for d (tcp_proxy's idle_timeout); zero, the
// default, never. Call it before Start. A timer does the waiting, so an
// idle relay still holds no goroutine; noticing each byte costs the
// direction out of an HBONE stream its direct delivery to a socket, and a
// socket-to-socket direction its splice, so only relays that need it ask.
func (p *Pair) SetIdleTimeout(d time.Duration) {
	p.idleTimer = nil
	if d > 0 {
		p.idleTimer = NewIdleTimer(d, func() { p.Close(ErrIdleTimeout) })
	}
}

// Start relays a and b in both directions and returns at once. A
// direction out of an HBONE stream is hbone.Forward's; one from a socket
// into an HBONE stream parks with pk when it idles, or runs on a
// goroutine of its own when pk is nil; the others run on a goroutine of
// their own. When both directions ended, a and b are closed and done is
// told once, on the goroutine of the direction that ended last.
func (p *Pair) Start(pk *Parker, done Done) {
	p.start(pk, done, false)
}

// Run is Start, except that a direction that would run on a goroutine of
// its own — a socket read into an HBONE stream, preferably, since it
// parks — runs on the calling goroutine instead, until it parks or ends;
// Run returns then. A caller with nothing left to do after starting the
// relay (an accept handler) thus becomes a direction's copier rather than
// starting one and exiting: one goroutine start fewer per connection, and
// with it often a thread woken to run it.
func (p *Pair) Run(pk *Parker, done Done) {
	if h := p.start(pk, done, true); h != nil {
		h.run()
	}
}

// start starts both directions; with inline set, the first one that needs
// a goroutine of its own is returned for the caller to run instead.
func (p *Pair) start(pk *Parker, done Done, inline bool) *half {
	p.done = done
	p.pump.pk = pk
	p.left.Store(2)
	p.idleTimer.Start()
	// The direction into an HBONE stream (from a socket) is the one that
	// parks: offer it the caller's goroutine first.
	first, second := &p.ab, &p.ba
	if _, ok := p.a.(*hbone.Stream); ok {
		first, second = second, first
	}
	// A direction with bytes read ahead writes them on a goroutine of
	// its own (dst may not take them at once), and is set up after.
	runFirst := len(first.readAhead()) > 0 || first.setup()
	runSecond := len(second.readAhead()) > 0 || second.setup()
	var mine *half
	for _, h := range [2]*half{first, second} {
		if h == first && !runFirst || h == second && !runSecond {
			continue
		}
		if inline && mine == nil {
			mine = h
			continue
		}
		go h.run()
	}
	return mine
}

// setup sets up copying h's source to its destination and reports
// whether that needs a goroutine (run). A direction out of an HBONE
// stream starts at once: it needs none.
func (h *half) setup() bool {
	if s, ok := h.src().(*hbone.Stream); ok {
		hbone.Forward(s, h.p.watch(h.dst()), h)
		return false
	}
	if _, ok := h.dst().(*hbone.Stream); ok && h.p.pump.pk != nil && h.p.pump.init(h) {
		h.p.setPump(h)
	}
	return true
}

// run is a direction on a goroutine: first what was read ahead from its
// source, then its source its usual way.
func (h *half) run() {
	if ahead := h.readAhead(); len(ahead) > 0 {
		k, err := h.p.watch(h.dst()).Write(ahead)
		h.n = int64(k)
		if err != nil {
			h.end(err)
			return
		}
		if !h.setup() {
			return
		}
	}
	if h.p.pump.h == h {
		h.p.pump.run()
		return
	}
	copyLoop(h)
}

// ForwardDone ends a direction out of an HBONE stream (hbone.Forward).
func (h *half) ForwardDone(k int64, err error) {
	if err == nil {
		err = h.dst().CloseWrite() // passes the half-close on, as proxyCopy
	}
	h.n += k
	h.end(err)
}

// copyLoop is a direction on a goroutine of its own for as long as the
// connection lives: its name is what a stack dump shows.
func copyLoop(h *half) {
	k, err := proxyCopy(h.dst(), h.p.watchReads(h.src()))
	h.n += k
	h.end(err)
}

// end records that a direction ended; an error aborts both sides. The
// last direction to end finishes the relay.
func (h *half) end(err error) {
	p := h.p
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
	// Bytes count once written to the peer: an HBONE stream accepts bytes
	// it then never writes when its connection fails or the peer resets
	// it first (a TCP socket's write is the kernel's).
	res := Result{AToB: p.ab.n - unsent(p.b), BToA: p.ba.n - unsent(p.a)}
	if err := p.Err(); err != nil && !errors.Is(err, net.ErrClosed) && !peerEnded(err) {
		res.Err = err
	}
	p.done.RelayDone(res)
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
	pumped := p.pump.h != nil
	p.mu.Unlock()
	if pumped {
		p.pump.stop() // before the sockets close: see Parker.disarm
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

// setPump makes h the direction p.pump copies.
func (p *Pair) setPump(h *half) {
	p.mu.Lock()
	p.pump.h = h
	closed := p.closed
	p.mu.Unlock()
	if closed {
		p.pump.stop()
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
