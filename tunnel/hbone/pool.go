package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"sync"
	"time"

	"golang.org/x/net/http2"
)

// Key selects the connections a stream may share: HBONE connections are
// pooled per source identity and address, destination identity and
// address, as ztunnel's WorkloadKey, so a connection's certificates and
// source fit every stream on it.
type Key struct {
	Src, Dst string // workload identities
	// SrcAddr is the address the connection leaves from (the source
	// pod's); zero leaves the choice to the host.
	SrcAddr netip.Addr
	Addr    netip.AddrPort // where to dial: the destination pod's or waypoint's IP:15008
}

// Pool opens CONNECT streams over pooled HTTP/2 connections.
type Pool struct {
	// Dial returns an established TLS connection for key with ALPN h2
	// negotiated; checking the peer's identity is its job. Required.
	Dial func(ctx context.Context, key Key) (net.Conn, error)
	// DialTimeout bounds one Dial. Zero means 10s. A dial is shared by
	// every Connect waiting for it, so it does not follow their contexts.
	DialTimeout time.Duration
	// MaxStreamsPerConn caps streams per connection, below the server's
	// SETTINGS_MAX_CONCURRENT_STREAMS. Zero means 100.
	MaxStreamsPerConn int
	// IdleTimeout closes a connection that has had no streams this long.
	// Zero means 5 minutes.
	IdleTimeout time.Duration
	// Settings are the HTTP/2 parameters. The zero value is ztunnel's.
	Settings Settings
	// Stats, if set, receives the pool's counters.
	Stats *Stats
	// Logger, if set, receives debug logs about failed connections.
	Logger *slog.Logger

	initOnce sync.Once
	ctx      context.Context // cancelled by Close; parent of dials
	cancel   context.CancelFunc
	stats    *Stats
	log      *slog.Logger
	dials    sync.WaitGroup

	mu     sync.Mutex // guards the fields below; taken before any conn's mu
	keys   map[Key]*poolKey
	all    map[*clientConn]struct{}
	closed bool
}

// poolKey holds the connections of one Key that take new streams.
type poolKey struct {
	conns []*clientConn
	dial  *dialCall // in flight, shared by every Connect that needs it
}

type dialCall struct {
	done chan struct{}
	err  error
}

// maxAttempts bounds how often Connect tries another connection after a
// stream the server did not process (REFUSED_STREAM, GOAWAY).
const maxAttempts = 3

func (p *Pool) init() {
	p.initOnce.Do(func() {
		p.ctx, p.cancel = context.WithCancel(context.Background())
		p.stats = p.Stats
		if p.stats == nil {
			p.stats = new(Stats)
		}
		p.log = p.Logger
		if p.log == nil {
			p.log = slog.New(slog.DiscardHandler)
		}
		p.keys = make(map[Key]*poolKey)
		p.all = make(map[*clientConn]struct{})
	})
}

func (p *Pool) maxStreams() int {
	if p.MaxStreamsPerConn > 0 {
		return p.MaxStreamsPerConn
	}
	return 100
}

func (p *Pool) idleTimeout() time.Duration {
	if p.IdleTimeout > 0 {
		return p.IdleTimeout
	}
	return 5 * time.Minute
}

func (p *Pool) dialTimeout() time.Duration {
	if p.DialTimeout > 0 {
		return p.DialTimeout
	}
	return 10 * time.Second
}

// Connect opens a CONNECT stream to authority (see FormatAuthority) over
// a connection for key, dialling one if none has room. hdr adds request
// header fields (forwarded, baggage, traceparent, ...). It returns once the
// server answered 200; any other status is a *StatusError.
func (p *Pool) Connect(ctx context.Context, key Key, authority string, hdr http.Header) (*Stream, error) {
	p.init()
	fields, size, err := requestFields(authority, hdr)
	if err != nil {
		return nil, fmt.Errorf("hbone: connect %s: %w", authority, err)
	}
	for attempt := 1; ; attempt++ {
		c, err := p.getConn(ctx, key)
		if err != nil {
			return nil, fmt.Errorf("hbone: connect %s via %s: %w", authority, key.Addr, err)
		}
		s, err := c.connect(ctx, fields, size)
		if err == nil {
			return s, nil
		}
		var re retryableError
		if errors.As(err, &re) {
			if attempt < maxAttempts && ctx.Err() == nil {
				p.stats.Retries.Add(1)
				continue
			}
			err = re.err
		}
		return nil, fmt.Errorf("hbone: connect %s via %s: %w", authority, key.Addr, err)
	}
}

// getConn returns a connection for key with a stream slot reserved.
func (p *Pool) getConn(ctx context.Context, key Key) (*clientConn, error) {
	p.mu.Lock()
	for {
		if p.closed {
			p.mu.Unlock()
			return nil, ErrPoolClosed
		}
		pk := p.keys[key]
		if pk == nil {
			pk = &poolKey{}
			p.keys[key] = pk
		}
		for _, c := range pk.conns {
			if c.tryReserve(p.maxStreams()) {
				p.mu.Unlock()
				return c, nil
			}
		}
		d := pk.dial
		if d == nil {
			d = &dialCall{done: make(chan struct{})}
			pk.dial = d
			p.dials.Add(1)
			go p.dialConn(key, pk, d)
		}
		p.mu.Unlock()
		select {
		case <-d.done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		if d.err != nil {
			return nil, d.err
		}
		p.mu.Lock()
	}
}

// dialConn dials a connection for key on behalf of every Connect waiting.
func (p *Pool) dialConn(key Key, pk *poolKey, d *dialCall) {
	defer p.dials.Done()
	p.stats.Dials.Add(1)
	ctx, cancel := context.WithTimeout(p.ctx, p.dialTimeout())
	nc, err := p.Dial(ctx, key)
	cancel()
	if err == nil {
		if tc, ok := nc.(*tls.Conn); ok && tc.ConnectionState().NegotiatedProtocol != http2.NextProtoTLS {
			_ = nc.Close()
			err = errors.New("ALPN did not negotiate h2")
		}
	}
	var c *clientConn
	if err != nil {
		p.stats.DialErrors.Add(1)
		err = fmt.Errorf("dial: %w", err)
	} else {
		c = newClientConn(nc, p, key)
		c.start()
	}
	p.mu.Lock()
	pk.dial = nil
	if c != nil {
		switch {
		case p.closed:
			err = ErrPoolClosed
		case c.isClosed():
			err = retryableError{ErrConnClosed}
		default:
			pk.conns = append(pk.conns, c)
			p.all[c] = struct{}{}
		}
	}
	d.err = err
	close(d.done)
	p.mu.Unlock()
	if c != nil && err != nil {
		c.teardown(err)
	}
}

// remove stops handing out c, once it took a GOAWAY or closed.
func (p *Pool) remove(c *clientConn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.removeLocked(c)
}

func (p *Pool) removeLocked(c *clientConn) {
	if pk := p.keys[c.key]; pk != nil {
		if i := slices.Index(pk.conns, c); i >= 0 {
			pk.conns = slices.Delete(pk.conns, i, i+1)
		}
		if len(pk.conns) == 0 && pk.dial == nil {
			delete(p.keys, c.key)
		}
	}
	if c.isClosed() {
		delete(p.all, c)
	}
}

// Close closes every connection; their streams fail with ErrPoolClosed.
func (p *Pool) Close() error {
	p.init()
	p.mu.Lock()
	p.closed = true
	conns := make([]*clientConn, 0, len(p.all))
	for c := range p.all {
		conns = append(conns, c)
	}
	clear(p.keys)
	p.mu.Unlock()
	p.cancel()
	for _, c := range conns {
		c.teardown(ErrPoolClosed)
	}
	for _, c := range conns {
		<-c.readDone
		<-c.writeDone
	}
	p.dials.Wait()
	return nil
}
