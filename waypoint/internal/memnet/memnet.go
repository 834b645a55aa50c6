// Package memnet is an in-memory network for tests in a testing/synctest
// bubble: a goroutine waiting on a socket is not durably blocked, so a
// bubble's clock cannot advance past it, where one waiting on these
// connections is. Connections are buffered (TLS 1.3 writes session tickets
// while the client writes its first bytes; an unbuffered pipe such as
// net.Pipe deadlocks there), half-closable and honour deadlines.
package memnet

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"
)

// bufSize bounds the bytes in flight one way; a writer waits beyond it.
const bufSize = 256 << 10

// Network maps addresses to listeners. The zero value is usable.
type Network struct {
	mu        sync.Mutex // guards the fields below
	listeners map[netip.AddrPort]*Listener
	port      uint16 // the last ephemeral port handed out
}

// Listen returns a listener on addr; a zero port picks a free one.
func (n *Network) Listen(addr netip.AddrPort) (*Listener, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.listeners == nil {
		n.listeners = map[netip.AddrPort]*Listener{}
	}
	if addr.Port() == 0 {
		addr = netip.AddrPortFrom(addr.Addr(), n.ephemeral())
	}
	if _, ok := n.listeners[addr]; ok {
		return nil, fmt.Errorf("memnet: listen %s: address in use", addr)
	}
	l := &Listener{n: n, addr: addr, conns: make(chan net.Conn, 16), done: make(chan struct{})}
	n.listeners[addr] = l
	return l, nil
}

func (n *Network) ephemeral() uint16 {
	n.port++
	return 32768 + n.port%28000
}

// Dial connects from an ephemeral port of src to the listener on dst.
func (n *Network) Dial(ctx context.Context, src netip.Addr, dst netip.AddrPort) (net.Conn, error) {
	n.mu.Lock()
	l := n.listeners[dst]
	from := netip.AddrPortFrom(src, n.ephemeral())
	n.mu.Unlock()
	if l == nil {
		return nil, &net.OpError{Op: "dial", Net: "tcp", Addr: net.TCPAddrFromAddrPort(dst), Err: errors.New("connection refused")}
	}
	c, s := Pipe(from, dst)
	select {
	case l.conns <- s:
		return c, nil
	case <-l.done:
		return nil, &net.OpError{Op: "dial", Net: "tcp", Addr: net.TCPAddrFromAddrPort(dst), Err: errors.New("connection refused")}
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Listener is a net.Listener of a Network.
type Listener struct {
	n     *Network
	addr  netip.AddrPort
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

// Accept waits for the next connection.
func (l *Listener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

// Close stops accepting; connections not yet accepted are closed.
func (l *Listener) Close() error {
	l.once.Do(func() {
		close(l.done)
		l.n.mu.Lock()
		delete(l.n.listeners, l.addr)
		l.n.mu.Unlock()
		for {
			select {
			case c := <-l.conns:
				c.Close()
			default:
				return
			}
		}
	})
	return nil
}

// Addr is the listener's address.
func (l *Listener) Addr() net.Addr { return net.TCPAddrFromAddrPort(l.addr) }

// AddrPort is the listener's address.
func (l *Listener) AddrPort() netip.AddrPort { return l.addr }

// Pipe returns both ends of a connection from a to b.
func Pipe(a, b netip.AddrPort) (*Conn, *Conn) {
	ab, ba := newHalf(), newHalf()
	return &Conn{r: ba, w: ab, local: a, remote: b}, &Conn{r: ab, w: ba, local: b, remote: a}
}

// half is one direction of a connection.
type half struct {
	mu        sync.Mutex // guards the fields below
	cond      *sync.Cond // signalled on every change
	buf       []byte
	eof       bool // the writer closed: reads drain buf, then io.EOF
	gone      bool // the reader closed: writes fail
	rDeadline deadline
	wDeadline deadline
}

type deadline struct {
	at time.Time
	t  *time.Timer
}

func newHalf() *half {
	h := &half{}
	h.cond = sync.NewCond(&h.mu)
	return h
}

// set arms d for at, waking waiters when it passes; h.mu is held.
func (h *half) set(d *deadline, at time.Time) {
	if d.t != nil {
		d.t.Stop()
		d.t = nil
	}
	d.at = at
	if !at.IsZero() {
		d.t = time.AfterFunc(time.Until(at), func() {
			h.mu.Lock()
			h.cond.Broadcast()
			h.mu.Unlock()
		})
	}
	h.cond.Broadcast()
}

func passed(d deadline) bool { return !d.at.IsZero() && !time.Now().Before(d.at) }

// Conn is one end of a connection. It implements net.Conn and CloseWrite.
type Conn struct {
	r, w          *half
	local, remote netip.AddrPort
	closeOnce     sync.Once
}

// Read reads what the peer wrote.
func (c *Conn) Read(p []byte) (int, error) {
	h := c.r
	h.mu.Lock()
	defer h.mu.Unlock()
	for {
		switch {
		case h.gone:
			return 0, net.ErrClosed
		case len(h.buf) > 0:
			n := copy(p, h.buf)
			h.buf = h.buf[n:]
			h.cond.Broadcast()
			return n, nil
		case h.eof:
			return 0, io.EOF
		case passed(h.rDeadline):
			return 0, os.ErrDeadlineExceeded
		}
		h.cond.Wait()
	}
}

// Write writes to the peer, waiting while its buffer is full.
func (c *Conn) Write(p []byte) (int, error) {
	h := c.w
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for n < len(p) {
		switch {
		case h.eof:
			return n, net.ErrClosed
		case h.gone:
			return n, errors.New("memnet: broken pipe")
		case passed(h.wDeadline):
			return n, os.ErrDeadlineExceeded
		case len(h.buf) < bufSize:
			k := min(len(p)-n, bufSize-len(h.buf))
			h.buf = append(h.buf, p[n:n+k]...)
			n += k
			h.cond.Broadcast()
			continue
		}
		h.cond.Wait()
	}
	return n, nil
}

// CloseWrite ends the direction to the peer: it reads io.EOF once it has
// read what was written.
func (c *Conn) CloseWrite() error {
	h := c.w
	h.mu.Lock()
	defer h.mu.Unlock()
	h.eof = true
	h.cond.Broadcast()
	return nil
}

// Close ends both directions.
func (c *Conn) Close() error {
	c.closeOnce.Do(func() {
		c.CloseWrite()
		h := c.r
		h.mu.Lock()
		h.gone = true
		h.buf = nil
		h.set(&h.rDeadline, time.Time{})
		h.cond.Broadcast()
		h.mu.Unlock()
		w := c.w
		w.mu.Lock()
		w.set(&w.wDeadline, time.Time{})
		w.mu.Unlock()
	})
	return nil
}

func (c *Conn) LocalAddr() net.Addr  { return net.TCPAddrFromAddrPort(c.local) }
func (c *Conn) RemoteAddr() net.Addr { return net.TCPAddrFromAddrPort(c.remote) }

func (c *Conn) SetDeadline(t time.Time) error {
	c.SetReadDeadline(t)
	return c.SetWriteDeadline(t)
}

func (c *Conn) SetReadDeadline(t time.Time) error {
	c.r.mu.Lock()
	defer c.r.mu.Unlock()
	c.r.set(&c.r.rDeadline, t)
	return nil
}

func (c *Conn) SetWriteDeadline(t time.Time) error {
	c.w.mu.Lock()
	defer c.w.mu.Unlock()
	c.w.set(&c.w.wDeadline, t)
	return nil
}
