// Package tproxy is a minimal transparent splice proxy: the stand-in for
// the ztunnel in datapath tests and the proxy both capture methods are
// measured with in the datapath benchmark. It accepts connections captured
// by amber's programs (bpf_sk_assign) or by nftables TPROXY, learns the
// original destination from the accepted socket's local address, dials it
// with the ztunnel's bypass mark and copies both ways with splice(2).
package tproxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"

	"github.com/amber-mesh/amber/bpf"
	"github.com/amber-mesh/amber/tunnel/sockopt"
)

// Options configures a Proxy. The zero value proxies in the caller's
// network namespace, from the proxy's own address.
type Options struct {
	// Do runs fn with the calling thread inside the network namespace the
	// proxy serves; every socket is created inside it. Nil means the
	// current namespace.
	Do func(fn func() error) error
	// PreserveSource makes upstream connections leave from the client's
	// address (IP_TRANSPARENT bind), as the ztunnel does towards
	// applications. Replies then come back through the capture's
	// established-socket lookup. Zero means the proxy's own address.
	PreserveSource bool
	// Ports of the outbound, inbound and HBONE listeners. Zero means
	// 15001, 15006 and 15008.
	Ports [3]int
	// Relay copies both ways between an accepted connection (down) and
	// its upstream (up) until both directions are done. Nil means Splice.
	Relay func(kind bpf.Listener, down, up *net.TCPConn)
}

// Event is one accepted connection.
type Event struct {
	Listener bpf.Listener
	Src      netip.AddrPort
	OrigDst  netip.AddrPort
	// UpstreamErr is set when dialing the original destination failed.
	UpstreamErr error
}

// Proxy is a running transparent proxy.
type Proxy struct {
	opts      Options
	listeners [3]*net.TCPListener
	wg        sync.WaitGroup

	mu     sync.Mutex // guards the fields below
	events []Event
	conns  map[net.Conn]struct{}
	closed bool
}

// Start opens the three transparent listeners (dual stack, MPTCP off) and
// serves them until Close.
func Start(opts Options) (*Proxy, error) {
	if opts.Do == nil {
		opts.Do = func(fn func() error) error { return fn() }
	}
	if opts.Relay == nil {
		opts.Relay = func(_ bpf.Listener, down, up *net.TCPConn) { Splice(down, up) }
	}
	if opts.Ports == [3]int{} {
		opts.Ports = [3]int{15001, 15006, 15008}
	}
	p := &Proxy{opts: opts, conns: map[net.Conn]struct{}{}}
	for i, port := range opts.Ports {
		var ln *net.TCPListener
		err := opts.Do(func() (err error) {
			ln, err = sockopt.Options{}.Listen(context.Background(), fmt.Sprintf("[::]:%d", port))
			return err
		})
		if err != nil {
			p.Close()
			return nil, err
		}
		p.listeners[i] = ln
	}
	for i, ln := range p.listeners {
		p.wg.Add(1)
		go p.acceptLoop(bpf.Listener(i), ln)
	}
	return p, nil
}

// Listener returns the socket of one listener, for registration in the
// capture's listener map.
func (p *Proxy) Listener(l bpf.Listener) *net.TCPListener { return p.listeners[l] }

// Register puts the three listeners into the listener map pinned under
// root, for both address families.
func (p *Proxy) Register(root string) error {
	ls, err := bpf.OpenListeners(root)
	if err != nil {
		return err
	}
	defer ls.Close()
	for i, ln := range p.listeners {
		for _, f := range []bpf.Family{bpf.IPv4, bpf.IPv6} {
			if err := ls.Register(bpf.Listener(i), f, ln); err != nil {
				return err
			}
		}
	}
	return nil
}

// Events returns the connections accepted so far.
func (p *Proxy) Events() []Event {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]Event(nil), p.events...)
}

// Close stops the listeners and every proxied connection.
func (p *Proxy) Close() error {
	p.mu.Lock()
	p.closed = true
	var errs []error
	for _, ln := range p.listeners {
		if ln != nil {
			errs = append(errs, ln.Close())
		}
	}
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
	return errors.Join(errs...)
}

func (p *Proxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		c.Close()
		return false
	}
	p.conns[c] = struct{}{}
	return true
}

func (p *Proxy) untrack(c net.Conn) {
	p.mu.Lock()
	delete(p.conns, c)
	p.mu.Unlock()
	c.Close()
}

func (p *Proxy) acceptLoop(kind bpf.Listener, ln *net.TCPListener) {
	defer p.wg.Done()
	for {
		c, err := ln.AcceptTCP()
		if err != nil {
			return
		}
		if !p.track(c) {
			return
		}
		p.wg.Add(1)
		go p.serve(kind, c)
	}
}

func (p *Proxy) serve(kind bpf.Listener, down *net.TCPConn) {
	defer p.wg.Done()
	defer p.untrack(down)
	ev := Event{
		Listener: kind,
		Src:      addrPort(down.RemoteAddr()),
		OrigDst:  addrPort(down.LocalAddr()),
	}
	var up net.Conn
	err := p.opts.Do(func() (err error) {
		var src netip.Addr
		if p.opts.PreserveSource {
			src = ev.Src.Addr()
		}
		up, err = sockopt.Options{}.Dial(context.Background(), ev.OrigDst, src)
		return err
	})
	ev.UpstreamErr = err
	p.mu.Lock()
	p.events = append(p.events, ev)
	p.mu.Unlock()
	if err != nil {
		return
	}
	if !p.track(up) {
		return
	}
	defer p.untrack(up)
	p.opts.Relay(kind, down, up.(*net.TCPConn))
}

// Splice copies both ways between two TCP connections with splice(2),
// passing each half-close on, and returns when both directions are done.
// A reset on either side resets the other (see Relay).
func Splice(a, b *net.TCPConn) {
	Relay(a, b, spliceCopy, spliceCopy)
}

func spliceCopy(dst, src *net.TCPConn) error {
	_, err := dst.ReadFrom(src)
	return err
}

// Relay copies a to b with aToB and b to a with bToA, each until its
// source's EOF, then shuts the destination's write side so its peer sees
// the same half-close; it returns when both directions are done. An error
// either way resets both connections (SO_LINGER 0), as a transparent
// proxy must: the peer sees what the client did, and no TIME_WAIT is left
// behind in the proxy for a connection its client aborted.
func Relay(a, b *net.TCPConn, aToB, bToA func(dst, src *net.TCPConn) error) {
	var once sync.Once
	abort := func() {
		once.Do(func() {
			a.SetLinger(0)
			b.SetLinger(0)
			a.Close()
			b.Close()
		})
	}
	half := func(dst, src *net.TCPConn, copyFn func(dst, src *net.TCPConn) error) {
		err := copyFn(dst, src)
		if err == nil {
			err = dst.CloseWrite()
		}
		if err != nil {
			abort()
		}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		half(b, a, aToB)
	}()
	half(a, b, bToA)
	<-done
}

func addrPort(a net.Addr) netip.AddrPort {
	ap := a.(*net.TCPAddr).AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}
