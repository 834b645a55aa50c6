package meshbed

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"
)

// forwardDialTimeout bounds connecting to the target; a stopped target
// refuses at once, so this only matters for one that hangs.
const forwardDialTimeout = 5 * time.Second

// Forwarder relays TCP connections accepted inside a node's or a pod's
// namespace to a target address in the test process's own network
// namespace.
//
// It stands in for the Service through which a node (or a waypoint pod)
// reaches istiod in a cluster: the test's istiod listens on the host's loopback, which a node
// namespace cannot route to, and the only interfaces a test may use are
// its own or loopback. The test process is in both namespaces at once (a
// listener in the node, a dialer in its own), so the relay needs no new
// interface, route or NAT rule. Bytes pass unchanged: TLS stays end to end
// between the ztunnel and istiod, and the ztunnel verifies istiod's
// certificate itself.
//
// Like a Service whose pod was replaced, SetTarget sends new connections
// to another endpoint while established ones keep their old one until it
// closes them.
type Forwarder struct {
	// Addr is where the forwarder listens, inside the namespace.
	Addr netip.AddrPort

	ln net.Listener
	wg sync.WaitGroup

	mu     sync.Mutex // guards the fields below
	target string
	conns  map[net.Conn]struct{}
	closed bool
}

// Netns is a testbed node or pod: a network namespace to listen in.
type Netns interface {
	Listen(network, address string) (net.Listener, error)
}

// Forward listens on listen (host:port, an IP literal) inside n's
// namespace and relays every connection to target, dialled from the test
// process's namespace. An empty target refuses connections (accepts and
// closes them) until SetTarget sets one.
func Forward(n Netns, listen, target string) (*Forwarder, error) {
	ln, err := n.Listen("tcp", listen)
	if err != nil {
		return nil, fmt.Errorf("forwarder on %s: %w", listen, err)
	}
	f := &Forwarder{
		Addr:   ln.Addr().(*net.TCPAddr).AddrPort(),
		ln:     ln,
		target: target,
		conns:  make(map[net.Conn]struct{}),
	}
	f.wg.Add(1)
	go f.acceptLoop()
	return f, nil
}

// MustForward is Forward for tests: it fails tb on error and closes the
// forwarder, with every relayed connection, when the test ends.
func MustForward(tb testing.TB, n Netns, listen, target string) *Forwarder {
	tb.Helper()
	f, err := Forward(n, listen, target)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := f.Close(); err != nil {
			tb.Errorf("forwarder on %s: %v", listen, err)
		}
	})
	return f
}

// SetTarget sends the connections accepted from now on to target; an
// empty target refuses them.
func (f *Forwarder) SetTarget(target string) {
	f.mu.Lock()
	f.target = target
	f.mu.Unlock()
}

// Close stops listening, closes every relayed connection and waits for
// the relays to end.
func (f *Forwarder) Close() error {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return nil
	}
	f.closed = true
	err := f.ln.Close()
	for c := range f.conns {
		c.Close()
	}
	f.mu.Unlock()
	f.wg.Wait()
	if errors.Is(err, net.ErrClosed) {
		err = nil
	}
	return err
}

func (f *Forwarder) acceptLoop() {
	defer f.wg.Done()
	for {
		down, err := f.ln.Accept()
		if err != nil {
			return
		}
		f.mu.Lock()
		target := f.target
		f.mu.Unlock()
		if target == "" || !f.track(down) {
			down.Close()
			continue
		}
		f.wg.Add(1)
		go f.relay(down, target)
	}
}

// track registers c so that Close closes it; false when already closed.
func (f *Forwarder) track(c net.Conn) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return false
	}
	f.conns[c] = struct{}{}
	return true
}

func (f *Forwarder) untrack(c net.Conn) {
	f.mu.Lock()
	delete(f.conns, c)
	f.mu.Unlock()
	c.Close()
}

// relay connects down to target and copies both ways. An end-of-stream is
// passed on as a half-close, so either side may finish first; an error in
// either direction closes both.
func (f *Forwarder) relay(down net.Conn, target string) {
	defer f.wg.Done()
	defer f.untrack(down)
	ctx, cancel := context.WithTimeout(context.Background(), forwardDialTimeout)
	up, err := (&net.Dialer{}).DialContext(ctx, "tcp", target)
	cancel()
	if err != nil {
		// The client sees its connection closed, as it would see a
		// refused one behind a Service without a ready endpoint.
		return
	}
	if !f.track(up) {
		up.Close()
		return
	}
	defer f.untrack(up)
	done := make(chan struct{}, 2)
	go forwardCopy(up, down, done)
	go forwardCopy(down, up, done)
	<-done
	<-done
}

// forwardCopy copies src to dst; at end of stream it half-closes dst, on
// an error it closes both.
func forwardCopy(dst, src net.Conn, done chan<- struct{}) {
	defer func() { done <- struct{}{} }()
	if _, err := io.Copy(dst, src); err != nil {
		dst.Close()
		src.Close()
		return
	}
	if cw, ok := dst.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	} else {
		dst.Close()
	}
}
