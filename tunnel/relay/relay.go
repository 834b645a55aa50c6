// Package relay copies bytes between two connections, both ways and
// passing each half-close on, until both directions ended, and holds no
// goroutine for a direction while it idles.
//
// A direction out of an HBONE stream is driven by its HBONE connection's
// reader (hbone.Forward); one from a socket into an HBONE stream parks
// its socket in a Parker's epoll set once idle; anything else, such as
// socket to socket (splice), copies on a goroutine of its own. The package
// knows nothing of workloads, policy or telemetry: the caller gets the
// bytes each way and why the relay ended (ztunnel keeps its copy.rs apart
// from proxy/ the same way).
package relay

import (
	"errors"
	"net"
	"sync"
	"sync/atomic"

	"github.com/amber-mesh/amber/tunnel/hbone"
)

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
	a, b Conn
	done func(Result)
	left atomic.Int32 // directions still running
	res  Result       // each count written by its direction; read once both ended

	mu     sync.Mutex // guards the fields below
	err    error      // the first error: Close's or a direction's
	closed bool
	pump   *pump // the direction that can park, once started
}

// NewPair returns the relay of a and b, not yet started.
func NewPair(a, b Conn) *Pair {
	return &Pair{a: a, b: b}
}

// Start relays a and b in both directions and returns at once. A
// direction out of an HBONE stream is hbone.Forward's; one from a socket
// into an HBONE stream parks with pk when it idles, or runs on a
// goroutine of its own when pk is nil; the others run on a goroutine of
// their own. When both directions ended, a and b are closed and done is
// called once, on the goroutine of the direction that ended last.
func (p *Pair) Start(pk *Parker, done func(Result)) {
	p.done = done
	p.left.Store(2)
	p.direction(pk, p.b, p.a, &p.res.AToB)
	p.direction(pk, p.a, p.b, &p.res.BToA)
}

// direction starts copying src to dst, counting into n.
func (p *Pair) direction(pk *Parker, dst, src Conn, n *int64) {
	end := func(k int64, err error) { p.end(n, k, err) }
	if s, ok := src.(*hbone.Stream); ok {
		hbone.Forward(s, dst, func(k int64, err error) {
			if err == nil {
				err = dst.CloseWrite() // passes the half-close on, as proxyCopy
			}
			end(k, err)
		})
		return
	}
	if _, ok := dst.(*hbone.Stream); ok && pk != nil {
		if u := newPump(pk, dst, src, end); u != nil {
			p.setPump(u)
			go u.run()
			return
		}
	}
	go copyLoop(dst, src, end)
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
