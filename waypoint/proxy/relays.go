package proxy

import (
	"bufio"
	"net"
	"syscall"
	"time"

	"github.com/amber-mesh/amber/tunnel/hbone"
	"github.com/amber-mesh/amber/tunnel/relay"
)

// This file hands connections to tunnel/relay, the ztunnel's byte copier:
// TCP chains and accepted HTTP/1 upgrades. Their downstream stream is
// detached from its handler first, so that an idle connection holds no
// goroutine (ARCHITECTURE.md, "Idle connections hold no goroutine").

// relayed is a live relay of the waypoint: closed by Close and, for a TCP
// chain, checked again when the configuration changes.
type relayed struct {
	pair *relay.Pair
	d    *downstream
	tcp  bool
}

// startRelay tracks r and starts its relay; done reports it once both
// directions ended. snap is the configuration r was admitted by: when
// another was installed meanwhile, a TCP chain's connection is checked
// against that one, which did not see it. up is the upstream connection
// as dialled, which tells whether the relay needs the Parker.
func (p *Proxy) startRelay(r *relayed, snap *snapshot, up net.Conn, done func(relay.Result)) {
	tracked := p.trackRelay(r)
	var pk *relay.Parker
	if !tracked {
		r.pair.Close(ErrClosed)
	} else {
		pk = p.parkerFor(up)
		if cur := p.snapshot(); r.tcp && cur != snap {
			p.recheck(r, cur)
		}
	}
	r.pair.Start(pk, relay.DoneFunc(func(res relay.Result) {
		if tracked {
			defer p.relayEnded(r)
		}
		done(res)
	}))
}

// trackRelay adds r to the live relays, with a count of p.relaysWG that
// relayEnded gives back, unless the proxy is closed.
func (p *Proxy) trackRelay(r *relayed) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.relays[r] = struct{}{}
	p.relaysWG.Add(1)
	return true
}

func (p *Proxy) relayEnded(r *relayed) {
	p.mu.Lock()
	delete(p.relays, r)
	p.mu.Unlock()
	p.relaysWG.Done()
}

// parkerFor returns the Parker for a tracked relay whose upstream is c:
// the one direction that parks reads a socket (an endpoint outside the
// mesh) into an HBONE stream, so a waypoint whose upstreams are all HBONE
// never opens one. Close waits for tracked relays before it closes the
// Parker, and opens none after.
func (p *Proxy) parkerFor(c net.Conn) *relay.Parker {
	if _, ok := c.(syscall.Conn); !ok {
		return nil
	}
	p.parkerOnce.Do(func() {
		pk, err := relay.NewParker()
		if err != nil {
			p.log.Warn("relays from sockets will keep their goroutines while idle", logKeyError, err)
			return
		}
		p.parker = pk
	})
	return p.parker
}

// relayConn is c as package relay takes it: with its own half-close, or
// one that closes it (what else can end a direction of a connection
// without one).
func relayConn(c net.Conn) relay.Conn {
	if rc, ok := c.(relay.Conn); ok {
		return rc
	}
	return noHalfClose{c}
}

type noHalfClose struct{ net.Conn }

func (c noHalfClose) CloseWrite() error { return c.Close() }

// readAhead is what br read beyond what its reader consumed: the client's
// bytes a sniffer peeked at, or sent behind an upgrade request.
func readAhead(br *bufio.Reader) []byte {
	if br == nil || br.Buffered() == 0 {
		return nil
	}
	b, _ := br.Peek(br.Buffered())
	return append([]byte(nil), b...)
}

// relayUpgrade relays an accepted HTTP/1 upgrade (WebSocket) between the
// inner connection and the upstream one until both sides end, and
// reports the request then. It returns whether the relay took the inner
// connection (its stream detached): false leaves it to the caller, which
// ends it.
func (p *Proxy) relayUpgrade(d *downstream, br *bufio.Reader, bw *bufio.Writer, up *upgrade) bool {
	x := up.x
	if err := bw.Flush(); err != nil {
		up.body.Close()
		x.err = err
		x.finish()
		return false
	}
	upConn, ahead := upgradedConn(up)
	s := d.stream
	if hs, ok := s.(*hbone.Stream); ok {
		hbone.Detach(hs)
	}
	pair := relay.NewPair(relay.Replay(s, readAhead(br)), relay.Replay(relayConn(upConn), ahead))
	stopTimers := x.handOver(pair)
	p.startRelay(&relayed{pair: pair, d: d}, nil, upConn, func(res relay.Result) {
		stopTimers()
		x.relayTimedOut(res.Err)
		x.w.bytes += res.BToA
		x.body.mu.Lock()
		x.body.n += res.AToB
		x.body.mu.Unlock()
		if res.Err != nil {
			x.err = res.Err
		}
		x.finish()
	})
	return true
}

// upgradedConn returns the upstream connection of an accepted upgrade
// and the bytes the HTTP transport read beyond the 101 (its reader's
// buffer, which the response body yields first). They are read with the
// connection's read deadline in the past, so that the body's reads stop
// at the connection once the buffer is empty; whatever the connection
// reports then (the deadline, or its end), the relay sees again.
func upgradedConn(up *upgrade) (net.Conn, []byte) {
	c := up.conn
	if cc, ok := c.(*countedConn); ok {
		c = cc.Conn
	}
	_ = c.SetReadDeadline(time.Unix(1, 0))
	var ahead []byte
	buf := make([]byte, 4<<10)
	for range 1 << 10 { // each read brings bytes or ends the loop
		n, err := up.body.Read(buf)
		ahead = append(ahead, buf[:n]...)
		if err != nil || n == 0 {
			break
		}
	}
	_ = c.SetReadDeadline(time.Time{})
	return c, ahead
}
