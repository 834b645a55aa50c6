package proxy

import (
	"github.com/amber-mesh/amber/tunnel/authz"
	"github.com/amber-mesh/amber/tunnel/metrics"
	"github.com/amber-mesh/amber/tunnel/relay"
)

// tracked is a live proxied connection the proxy may have to close: on
// Close, or when a policy change revokes it.
type tracked struct {
	pair *relay.Pair
	// inbound connections are re-authorized when policies change.
	inbound bool
	authz   authz.Conn
	gen     uint64 // generation of the snapshot that authorized it (inbound)
}

func (t *tracked) close(err error) { t.pair.Close(err) }

func (t *tracked) closeErr() error { return t.pair.Err() }

// track adds t to the live connections, with a count of p.wg that
// relayEnd gives back, unless the proxy is closed.
func (p *Proxy) track(t *tracked) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.conns[t] = struct{}{}
	p.wg.Add(1)
	return true
}

func (p *Proxy) untrack(t *tracked) {
	p.mu.Lock()
	delete(p.conns, t)
	p.mu.Unlock()
}

// relay counts the connection open, tracks it and relays it (package
// relay) until both directions ended; relayEnd reports the connection
// when it ends. It returns at once, unless run: the caller's goroutine
// has nothing left to do and copies a direction itself until that parks
// or ends (relay.Pair.Run), which saves the start of another. An idle
// connection holds no goroutine when one side is an HBONE stream
// (ARCHITECTURE.md, "Idle connections hold no goroutine").
func (p *Proxy) relay(r *record, t *tracked, run bool) {
	mc := p.metrics.Open(r.labels())
	if !p.track(t) {
		t.close(ErrClosed)
		r.err = ErrClosed
		p.relayDone(r, mc)
		return
	}
	if t.inbound {
		p.recheckTracked(t)
	}
	done := relay.DoneFunc(func(res relay.Result) { p.relayEnd(r, t, mc, res) })
	if run {
		t.pair.Run(p.parker, done)
		return
	}
	t.pair.Start(p.parker, done)
}

// relayEnd reports a connection whose relay ended, then forgets it: a
// Drain that saw it leave has its access-log line.
func (p *Proxy) relayEnd(r *record, t *tracked, mc *metrics.Conn, res relay.Result) {
	defer p.wg.Done()
	// The relay is between the client (down, a) and the destination (b).
	r.recv, r.sent = res.AToB, res.BToA
	if res.Err != nil {
		r.err = res.Err
	}
	p.relayDone(r, mc)
	p.untrack(t)
}
