// Package h2guard watches both directions of a server-side HTTP/2
// connection at the frame level and ends it when the client abuses the
// protocol in ways the HTTP/2 server (x/net/http2) only bounds silently:
// header blocks split into floods of CONTINUATION frames (CVE-2024-27316
// and relatives), streams reset before their response in bulk (rapid
// reset, CVE-2023-44487), header blocks left unfinished. Each ends the
// connection with a named cause, which the caller counts; the server
// library's own bounds stay in place behind it.
package h2guard

import (
	"encoding/binary"
	"errors"
	"net"
	"sync"
	"time"
)

// Causes passed to Conn.OnAbuse.
const (
	CauseContinuationFlood = "h2_continuation_flood"
	CauseHeaderBlockSize   = "h2_header_block_too_large"
	CauseRapidReset        = "h2_rapid_reset"
	CauseHeaderTimeout     = "h2_header_timeout"
)

// ErrAbuse is returned by Read once the guard ended the connection.
var ErrAbuse = errors.New("h2guard: connection ended for protocol abuse")

// Limits bound what a client may do. The zero value is the defaults.
type Limits struct {
	// MaxHeaderBlock bounds one header block (HEADERS plus CONTINUATION
	// payloads, HPACK-compressed) in bytes. Zero means 64 KiB.
	MaxHeaderBlock int
	// MaxContinuations bounds the CONTINUATION frames of one block. Zero
	// means 16: a block under MaxHeaderBlock never needs more with
	// frames of the 16 KiB minimum size, so more is a flood.
	MaxContinuations int
	// PrematureResets is how many streams the client may reset before
	// any response HEADERS while they are at least half of the streams
	// it opened. Zero means 100 (Envoy ends such a connection too, after
	// its premature_reset_total_stream_count of streams).
	PrematureResets int
	// HeaderTimeout bounds the time between a header block's first and
	// last frame. Zero means 10 s.
	HeaderTimeout time.Duration
}

func (l Limits) withDefaults() Limits {
	if l.MaxHeaderBlock <= 0 {
		l.MaxHeaderBlock = 64 << 10
	}
	if l.MaxContinuations <= 0 {
		l.MaxContinuations = 16
	}
	if l.PrematureResets <= 0 {
		l.PrematureResets = 100
	}
	if l.HeaderTimeout <= 0 {
		l.HeaderTimeout = 10 * time.Second
	}
	return l
}

// Frame types and flags (RFC 9113 §6).
const (
	frameData         = 0x0
	frameHeaders      = 0x1
	frameRSTStream    = 0x3
	frameContinuation = 0x9

	flagEndStream  = 0x1
	flagEndHeaders = 0x4
)

// clientPreface is what a client sends before its first frame
// (RFC 9113 §3.4).
const clientPreface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

// Conn wraps the server's side of an HTTP/2 connection. Hand it to the
// HTTP/2 server in place of the connection.
type Conn struct {
	net.Conn
	lim     Limits
	onAbuse func(cause string)
	onReset func(code uint32)

	in, out scanner

	mu         sync.Mutex      // guards the fields below
	open       map[uint32]bool // client streams without END_STREAM/RST from the server: true once response HEADERS went out
	lastStream uint32
	opened     int
	premature  int
	inBlock    bool
	blockBytes int
	conts      int
	timer      *time.Timer
	abused     bool
}

// Hooks are called as the guard sees events; either may be nil.
type Hooks struct {
	// OnAbuse is called once, with the cause, when the guard ends the
	// connection.
	OnAbuse func(cause string)
	// OnServerReset is called for each RST_STREAM the server sends, with
	// its error code: PROTOCOL_ERROR is a request the server refused as
	// malformed (RFC 9113 §8.1.1), which the server library counts
	// nowhere else.
	OnServerReset func(code uint32)
}

// New wraps c.
func New(c net.Conn, lim Limits, hooks Hooks) *Conn {
	g := &Conn{Conn: c, lim: lim.withDefaults(), onAbuse: hooks.OnAbuse, onReset: hooks.OnServerReset, open: map[uint32]bool{}}
	g.in.skip = len(clientPreface)
	return g
}

// Read reads from the client and checks its frames.
func (g *Conn) Read(p []byte) (int, error) {
	n, err := g.Conn.Read(p)
	if n > 0 {
		g.in.feed(p[:n], g.clientFrame)
	}
	g.mu.Lock()
	abused := g.abused
	g.mu.Unlock()
	if abused {
		return 0, ErrAbuse
	}
	return n, err
}

// Write writes to the client and notes which streams got a response.
func (g *Conn) Write(p []byte) (int, error) {
	g.out.feed(p, g.serverFrame)
	return g.Conn.Write(p)
}

// Close stops the header timer and closes the connection.
func (g *Conn) Close() error {
	g.mu.Lock()
	if g.timer != nil {
		g.timer.Stop()
	}
	g.mu.Unlock()
	return g.Conn.Close()
}

// abuse ends the connection; g.mu is held.
func (g *Conn) abuse(cause string) {
	if g.abused {
		return
	}
	g.abused = true
	if g.timer != nil {
		g.timer.Stop()
	}
	// Closing makes the server's reader fail at once, whatever it is
	// blocked in; Read returns ErrAbuse from now on.
	go g.Conn.Close()
	if g.onAbuse != nil {
		go g.onAbuse(cause)
	}
}

func (g *Conn) clientFrame(h frameHeader, payload []byte) {
	g.mu.Lock()
	defer g.mu.Unlock()
	switch h.typ {
	case frameHeaders:
		if h.stream > g.lastStream {
			g.lastStream = h.stream
			g.opened++
			g.open[h.stream] = false
		}
		if h.flags&flagEndHeaders == 0 {
			g.inBlock, g.blockBytes, g.conts = true, int(h.length), 0
			g.timer = time.AfterFunc(g.lim.HeaderTimeout, func() {
				g.mu.Lock()
				defer g.mu.Unlock()
				if g.inBlock {
					g.abuse(CauseHeaderTimeout)
				}
			})
		} else if int(h.length) > g.lim.MaxHeaderBlock {
			g.abuse(CauseHeaderBlockSize)
		}
	case frameContinuation:
		g.conts++
		g.blockBytes += int(h.length)
		switch {
		case g.blockBytes > g.lim.MaxHeaderBlock:
			g.abuse(CauseHeaderBlockSize)
		case g.conts > g.lim.MaxContinuations:
			g.abuse(CauseContinuationFlood)
		case h.flags&flagEndHeaders != 0:
			g.inBlock = false
			if g.timer != nil {
				g.timer.Stop()
				g.timer = nil
			}
		}
	case frameRSTStream:
		responded, ok := g.open[h.stream]
		delete(g.open, h.stream)
		if ok && !responded {
			g.premature++
			if g.premature >= g.lim.PrematureResets && 2*g.premature >= g.opened {
				g.abuse(CauseRapidReset)
			}
		}
	}
}

func (g *Conn) serverFrame(h frameHeader, payload []byte) {
	g.mu.Lock()
	defer g.mu.Unlock()
	switch h.typ {
	case frameHeaders:
		if _, ok := g.open[h.stream]; ok {
			g.open[h.stream] = true
		}
		if h.flags&flagEndStream != 0 {
			delete(g.open, h.stream)
		}
	case frameData:
		if h.flags&flagEndStream != 0 {
			delete(g.open, h.stream)
		}
	case frameRSTStream:
		delete(g.open, h.stream)
		if len(payload) >= 4 && g.onReset != nil {
			g.onReset(binary.BigEndian.Uint32(payload))
		}
	}
}

type frameHeader struct {
	length uint32
	typ    uint8
	flags  uint8
	stream uint32
}

// scanner finds frame boundaries in one direction's byte stream, however
// it is split into reads and writes, and hands each frame's header and
// first bytes of payload (up to 8, enough for RST_STREAM and GOAWAY
// codes) to a callback.
type scanner struct {
	skip    int // bytes to pass over first (the client preface)
	hdr     [9]byte
	nhdr    int
	cur     frameHeader
	left    int // payload bytes of cur still to come
	payload [8]byte
	npay    int
	inFrame bool
}

func (s *scanner) feed(p []byte, frame func(frameHeader, []byte)) {
	for len(p) > 0 {
		if s.skip > 0 {
			n := min(s.skip, len(p))
			s.skip -= n
			p = p[n:]
			continue
		}
		if !s.inFrame {
			n := copy(s.hdr[s.nhdr:], p)
			s.nhdr += n
			p = p[n:]
			if s.nhdr < len(s.hdr) {
				return
			}
			s.nhdr = 0
			s.cur = frameHeader{
				length: uint32(s.hdr[0])<<16 | uint32(s.hdr[1])<<8 | uint32(s.hdr[2]),
				typ:    s.hdr[3],
				flags:  s.hdr[4],
				stream: binary.BigEndian.Uint32(s.hdr[5:9]) & 0x7fffffff,
			}
			s.left, s.npay, s.inFrame = int(s.cur.length), 0, true
		}
		n := min(s.left, len(p))
		if s.npay < len(s.payload) {
			s.npay += copy(s.payload[s.npay:], p[:n])
		}
		s.left -= n
		p = p[n:]
		if s.left == 0 {
			s.inFrame = false
			frame(s.cur, s.payload[:min(s.npay, int(s.cur.length))])
		}
	}
}
