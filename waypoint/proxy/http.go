package proxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"time"

	"golang.org/x/net/http2"

	"github.com/amber-mesh/amber/waypoint/config"
	"github.com/amber-mesh/amber/waypoint/h2guard"
	"github.com/amber-mesh/amber/waypoint/http1"
)

const h2Preface = http2.ClientPreface

// maxDrainBody is how much of a request body the waypoint reads and
// discards after answering without reading it all (a local reply), to
// keep an HTTP/1 connection; a longer body closes the connection.
const maxDrainBody = 256 << 10

// dispatch returns the configuration and HTTP chain for d's next request:
// a request is served by the configuration current when it starts.
func (d *downstream) dispatch() (*snapshot, *config.Chain, error) {
	snap := d.p.snapshot()
	var ch *config.Chain
	switch {
	case snap == nil || snap.cfg == nil:
		return snap, nil, errNoConfig
	case d.gateway != "":
		// A gateway listener's one chain, by the listener's name.
		if g := snap.cfg.Gateways[d.gateway]; g != nil {
			ch = g.Chain
		}
	case snap.cfg.Dispatch == nil:
		return snap, nil, errNoConfig
	default:
		ch = snap.cfg.Dispatch.Lookup(d.in)
	}
	switch {
	case ch == nil:
		return snap, nil, errNoChain
	case ch.Err != nil:
		return snap, ch, ch.Err
	case ch.HTTP == nil:
		return snap, ch, errChainChanged
	}
	return snap, ch, nil
}

// httpChain is d's current HTTP chain, nil when there is none (the next
// request gets a 503).
func (d *downstream) httpChain() *config.HTTPChain {
	if _, ch, err := d.dispatch(); err == nil {
		return ch.HTTP
	}
	return nil
}

// headerTimeout is the chain's request_headers_timeout, else amber's.
func (p *Proxy) headerTimeout(h *config.HTTPChain) time.Duration {
	if h != nil && h.RequestHeadersTimeout > 0 {
		return h.RequestHeadersTimeout
	}
	return p.lim.HeaderTimeout
}

// idleDeadline is when an inner connection without a request in flight is
// closed: the chain's idle_timeout (Envoy's 1 h by default).
func idleDeadline(h *config.HTTPChain) time.Time {
	if h == nil || h.IdleTimeout <= 0 {
		return time.Time{}
	}
	return time.Now().Add(h.IdleTimeout)
}

// headerLimit is the bound on a request's header in bytes.
func (p *Proxy) headerLimit(h *config.HTTPChain) int {
	n := 60 << 10
	if h != nil && h.MaxRequestHeadersKB > 0 {
		n = int(h.MaxRequestHeadersKB) << 10
	}
	if l := p.lim.MaxRequestHeaderBytes; l > 0 && l < n {
		n = l
	}
	return n
}

// serveHTTP serves the inner connection of an HTTP chain: HTTP/2 when it
// starts with the client preface (prior knowledge; there is no TLS inside
// the tunnel to negotiate it), else HTTP/1. It reports whether an
// upgrade's relay took the connection over.
func (p *Proxy) serveHTTP(ctx context.Context, d *downstream, br *bufio.Reader) (relayed bool) {
	h := d.httpChain()
	if h != nil {
		stop := p.connectionDuration(d, h.MaxConnectionDuration)
		defer stop()
	}
	d.stream.SetReadDeadline(idleDeadline(h))
	if _, err := br.Peek(1); err != nil {
		return false
	}
	d.stream.SetReadDeadline(time.Now().Add(p.headerTimeout(h)))
	pre := []byte(h2Preface)
	for n := 1; n <= len(pre); n++ {
		b, err := br.Peek(n)
		if !bytes.HasPrefix(pre, b) {
			break
		}
		if len(b) == len(pre) {
			d.stream.SetReadDeadline(time.Time{})
			p.serveH2(ctx, d, br, h)
			return false
		}
		if err != nil {
			break
		}
	}
	return p.serveH1(ctx, d, br)
}

// serveH1 serves HTTP/1 requests one after the other until one of the
// two sides closes, a response cannot keep the connection, the
// connection is idle for the chain's idle timeout, or an upgrade's relay
// takes it over (true).
func (p *Proxy) serveH1(ctx context.Context, d *downstream, br *bufio.Reader) bool {
	bw := bufio.NewWriterSize(d.stream, 4<<10)
	for first := true; ; first = false {
		h := d.httpChain()
		if !first {
			// The idle deadline first: drain, once it sees the connection
			// idle, replaces it with an immediate one.
			d.stream.SetReadDeadline(idleDeadline(h))
			if d.setIdle(true) {
				return false
			}
			_, err := br.Peek(1)
			d.setIdle(false)
			if err != nil {
				return false
			}
			d.stream.SetReadDeadline(time.Now().Add(p.headerTimeout(h)))
		}
		start := time.Now()
		req, err := http1.ReadRequest(br, http1.Limits{MaxHeaderBytes: p.headerLimit(h), MaxHeaders: maxHeaders(h)})
		if err != nil {
			p.h1Refuse(d, bw, err, start)
			return false
		}
		d.stream.SetReadDeadline(time.Time{})
		req.RemoteAddr = d.peerAddr.String()
		req = req.WithContext(ctx)
		w := http1.NewResponseWriter(bw, req, d.isDraining() || p.isDraining())
		up := p.serveRequest(d, w, req, start)
		if up != nil {
			return p.relayUpgrade(d, br, bw, up)
		}
		if err := w.Finish(); err != nil || !w.KeepAlive() {
			return false
		}
		if !http1.Complete(req.Body) {
			// Answered before reading the whole body: read what is left
			// (bounded) so the next request starts where it should.
			io.CopyN(io.Discard, req.Body, maxDrainBody)
			if !http1.Complete(req.Body) {
				return false
			}
		}
	}
}

func maxHeaders(h *config.HTTPChain) int {
	if h != nil && h.MaxHeadersCount > 0 {
		return int(h.MaxHeadersCount)
	}
	return 100
}

// h1Refuse answers a request the HTTP/1 reader refused, as Envoy's codec
// does (the status text as body, the connection closed), or a header read
// that timed out (408 "request header timeout"), and reports it. Any other
// read error means the client went away: nothing to answer.
func (p *Proxy) h1Refuse(d *downstream, bw *bufio.Writer, err error, start time.Time) {
	var he *http1.Error
	var status int
	var cause, body string
	switch {
	case errors.As(err, &he):
		status, cause, body = he.Status, he.Cause, http.StatusText(he.Status)
	case errors.Is(err, os.ErrDeadlineExceeded):
		status, cause, body = http.StatusRequestTimeout, causeHeaderTimeout, "request header timeout"
	default:
		return
	}
	x := p.newExchange(d, nil, &http.Request{Method: "-", Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1, Header: http.Header{}, Body: http.NoBody}, start)
	x.err = err
	x.flags |= flagDPE
	x.closeConn = true
	x.cause = cause
	req := &http.Request{Method: http.MethodGet, ProtoMajor: 1, ProtoMinor: 1, Close: true}
	w := http1.NewResponseWriter(bw, req, true)
	x.w = newTracker(w)
	if _, ch, derr := d.dispatch(); derr == nil {
		x.setChain(ch)
	}
	x.localReply(status, body, nil)
	w.Finish()
	x.finish()
}

// serveH2 serves the inner connection with x/net/http2 behind the guard.
func (p *Proxy) serveH2(ctx context.Context, d *downstream, br *bufio.Reader, h *config.HTTPChain) {
	lim := p.lim.H2
	if lim.MaxHeaderBlock <= 0 {
		lim.MaxHeaderBlock = p.headerLimit(h)
	}
	g := h2guard.New(&bufferedConn{Conn: d.stream, r: br}, lim, h2guard.Hooks{
		OnAbuse: p.counts.refuse,
		OnServerReset: func(code uint32) {
			if http2.ErrCode(code) == http2.ErrCodeProtocol {
				p.counts.refuse(causeH2Malformed)
			}
		},
	})
	// The server's decoded-header bound sits above the waypoint's own
	// (checked per request, which counts and answers 431), so that what
	// x/net answers itself is only the grossly oversized.
	base := &http.Server{MaxHeaderBytes: 4 * p.headerLimit(h)}
	if h != nil {
		base.IdleTimeout = h.IdleTimeout
	}
	// A server per inner connection, so that a drain of this connection
	// alone (max_connection_duration) can end it gracefully: base's
	// Shutdown runs the server's GOAWAY on its one connection, which
	// closes once its streams are done.
	srv := &http2.Server{
		// The outer HBONE connection carries 100 streams; an inner
		// connection gets the same bound.
		MaxConcurrentStreams: 100,
		CountError:           p.counts.h2Error,
	}
	if err := http2.ConfigureServer(base, srv); err != nil {
		p.log.Error("inner HTTP/2 server", logKeyError, err)
		return
	}
	d.setGoAway(func() { _ = base.Shutdown(context.Background()) })
	srv.ServeConn(g, &http2.ServeConnOpts{
		Context:    ctx,
		BaseConfig: base,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			p.serveRequest(d, w, r, time.Now())
		}),
	})
}

// bufferedConn reads through the reader that already holds the
// connection's first bytes.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }
