package proxy

import (
	"github.com/amber-mesh/amber/tunnel/authz"
	"github.com/amber-mesh/amber/tunnel/metrics"
	"github.com/amber-mesh/amber/tunnel/relay"
	"github.com/amber-mesh/amber/xds/state"
)

// conn is a connection the proxy serves: what its access-log line and
// metrics say, and once it is relayed, the relay the proxy may have to
// close (on Close, or when a policy change revokes it). An idle
// connection holds it for as long as it lives, so it is one object: the
// relay reports to it (RelayDone) and an inbound connection's policy
// re-check rebuilds what it evaluates from the record (authzConn).
type conn struct {
	record
	p    *Proxy
	pair *relay.Pair
	mc   metrics.Conn
}

func (c *conn) close(err error) { c.pair.Close(err) }

func (c *conn) closeErr() error { return c.pair.Err() }

// authzConn is what policy evaluates for the inbound connection c to the
// local workload w: the same when it is admitted and when it is checked
// again.
func (c *conn) authzConn(w *state.Workload) authz.Conn {
	ac := authz.Conn{SrcIP: c.src.Addr(), DstIP: c.dst.Addr(), DstPort: c.dst.Port(), DstWorkload: authzWorkload(w)}
	if id := c.srcID(); !id.IsZero() {
		ac.SrcIdentity = id.String()
	}
	return ac
}

// track adds c to the live connections, with a count of p.wg that
// RelayDone gives back, unless the proxy is closed.
func (p *Proxy) track(c *conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.conns[c] = struct{}{}
	p.wg.Add(1)
	return true
}

func (p *Proxy) untrack(c *conn) {
	p.mu.Lock()
	delete(p.conns, c)
	p.mu.Unlock()
}

// relay counts the connection open, tracks it and relays it (package
// relay) until both directions ended; RelayDone reports the connection
// when it ends. An inbound connection was authorized by the snapshot of
// generation gen. relay returns at once, unless run: the caller's
// goroutine has nothing left to do and copies a direction itself until
// that parks or ends (relay.Pair.Run), which saves the start of another.
// An idle connection holds no goroutine when one side is an HBONE stream
// (ARCHITECTURE.md, "Idle connections hold no goroutine").
func (p *Proxy) relay(c *conn, gen uint64, run bool) {
	p.metrics.Open(&c.mc, c.labels())
	if !p.track(c) {
		c.close(ErrClosed)
		c.err = ErrClosed
		p.relayDone(c, 0, 0)
		return
	}
	if c.inbound {
		p.recheckTracked(c, gen)
	}
	if run {
		c.pair.Run(p.parker, c)
		return
	}
	c.pair.Start(p.parker, c)
}

// RelayDone reports a connection whose relay ended, then forgets it: a
// Drain that saw it leave has its access-log line.
func (c *conn) RelayDone(res relay.Result) {
	p := c.p
	defer p.wg.Done()
	if res.Err != nil {
		c.err = res.Err
	}
	// The relay is between the client (down, a) and the destination (b).
	p.relayDone(c, res.BToA, res.AToB)
	p.untrack(c)
}
