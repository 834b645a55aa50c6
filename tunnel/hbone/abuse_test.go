package hbone_test

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/tunnel/hbone"
)

// stillServes checks the server answers a well-behaved client after an
// attack on another connection.
func stillServes(t *testing.T, ts *testServer) {
	t.Helper()
	tp := newPool(t, ts)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := tp.Connect(ctx, tp.Key, "10.0.0.1:8080", http.Header{"X-Echo": {"1"}})
	if err != nil {
		t.Fatalf("connect after attack: %v", err)
	}
	defer s.Close()
	if _, err := s.Write([]byte("ok?")); err != nil {
		t.Fatal(err)
	}
	s.CloseWrite()
	if got := readAllString(t, s); got != "ok?" {
		t.Fatalf("echo after attack = %q", got)
	}
}

// blockUntilCancelled never answers, like a handler still dialling
// upstream; it returns when the stream is reset.
var blockUntilCancelled = hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, rw hbone.Responder) {
	if req.Authority == "10.0.0.1:8080" && req.Header.Get("X-Echo") == "" {
		<-ctx.Done()
		return
	}
	echo(ctx, req, rw)
})

func TestLimitMaxConcurrentStreams(t *testing.T) {
	checkLeaks(t)
	ts := startServer(t, blockUntilCancelled, func(s *hbone.Server) { s.MaxConcurrentStreams = 10 })
	rc := dialRaw(t, ts)
	for id := uint32(1); id <= 19; id += 2 {
		rc.connect(id, false)
	}
	rc.connect(21, false)
	rc.expectReset(21, http2.ErrCodeRefusedStream)
	if n := ts.Stats.StreamsRefused.Load(); n != 1 {
		t.Errorf("StreamsRefused = %d, want 1", n)
	}
	// Closing one stream frees a slot.
	rc.fr.WriteRSTStream(1, http2.ErrCodeCancel)
	rc.ping()
	rc.connect(23, false)
	rc.ping()
	if n := ts.Stats.StreamsRefused.Load(); n != 1 {
		t.Errorf("StreamsRefused after a slot was freed = %d, want 1", n)
	}
	stillServes(t, ts)
}

func TestLimitHeaderListSize(t *testing.T) {
	checkLeaks(t)
	ts := startServer(t, echo)
	rc := dialRaw(t, ts)
	big := strings.Repeat("b", 20<<10) // over the 16 KiB default, within the block budget
	rc.fr.WriteHeaders(http2.HeadersFrameParam{
		StreamID:      1,
		BlockFragment: rc.block(":method", "CONNECT", ":authority", "10.0.0.1:8080", "baggage", big),
		EndHeaders:    true,
	})
	if code := rc.expectStatus(1); code != 431 {
		t.Fatalf("status %d, want 431", code)
	}
	if n := ts.Stats.HeaderListTooLarge.Load(); n != 1 {
		t.Errorf("HeaderListTooLarge = %d", n)
	}
	// The oversized block was still decoded: HPACK state is in step and
	// the connection keeps working.
	rc.connect(3, true)
	if code := rc.expectStatus(3); code != 200 {
		t.Fatalf("next request on the same connection: %d", code)
	}
	stillServes(t, ts)
}

func TestLimitContinuationFlood(t *testing.T) {
	for _, tc := range []struct {
		name string
		frag int // bytes per CONTINUATION
	}{
		{"many small frames", 1},
		{"large block", 16 << 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkLeaks(t)
			ts := startServer(t, echo)
			rc := dialRaw(t, ts)
			block := rc.block(":method", "CONNECT", ":authority", "10.0.0.1:8080")
			rc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block})
			go func() {
				// An endless header block: never END_HEADERS.
				frag := make([]byte, tc.frag)
				for i := 0; i < 100000; i++ {
					if rc.fr.WriteContinuation(1, false, frag) != nil {
						return
					}
				}
			}()
			rc.expectGoAway(http2.ErrCodeEnhanceYourCalm)
			if n := ts.Stats.ContinuationFloods.Load(); n != 1 {
				t.Errorf("ContinuationFloods = %d", n)
			}
			rc.tc.Close()
			stillServes(t, ts)
		})
	}
}

func TestLimitRapidReset(t *testing.T) {
	checkLeaks(t)
	var running, maxRunning atomic.Int64
	ts := startServer(t, hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, rw hbone.Responder) {
		n := running.Add(1)
		defer running.Add(-1)
		for m := maxRunning.Load(); n > m && !maxRunning.CompareAndSwap(m, n); m = maxRunning.Load() {
		}
		blockUntilCancelled(ctx, req, rw)
	}))
	rc := dialRaw(t, ts)
	go func() {
		block := rc.block(":method", "CONNECT", ":authority", "10.0.0.1:8080")
		for id := uint32(1); id < 20000; id += 2 {
			if rc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: block, EndHeaders: true}) != nil {
				return
			}
			if rc.fr.WriteRSTStream(id, http2.ErrCodeCancel) != nil {
				return
			}
		}
	}()
	rc.expectGoAway(http2.ErrCodeEnhanceYourCalm)
	if n := ts.Stats.RapidResets.Load(); n != 1 {
		t.Errorf("RapidResets = %d", n)
	}
	// Each reset cancels its handler; they never pile up beyond twice the
	// stream limit.
	if m := maxRunning.Load(); m > 200 {
		t.Errorf("%d handlers ran at once", m)
	}
	rc.tc.Close()
	stillServes(t, ts)
	testutil.Eventually(t, "handlers to return", func() bool { return running.Load() == 0 })
}

func TestLimitPingFlood(t *testing.T) {
	checkLeaks(t)
	ts := startServer(t, echo)
	rc := dialRaw(t, ts)
	go func() {
		for i := range 10000 {
			var d [8]byte
			binary.BigEndian.PutUint64(d[:], uint64(i))
			if rc.fr.WritePing(false, d) != nil {
				return
			}
		}
	}()
	rc.expectGoAway(http2.ErrCodeEnhanceYourCalm)
	if n := ts.Stats.PingFloods.Load(); n != 1 {
		t.Errorf("PingFloods = %d", n)
	}
	rc.tc.Close()
	stillServes(t, ts)
}

func TestLimitSettingsFlood(t *testing.T) {
	checkLeaks(t)
	t.Run("many frames", func(t *testing.T) {
		ts := startServer(t, echo)
		rc := dialRaw(t, ts)
		go func() {
			for range 10000 {
				if rc.fr.WriteSettings(http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: 1 << 20}) != nil {
					return
				}
			}
		}()
		rc.expectGoAway(http2.ErrCodeEnhanceYourCalm)
		if n := ts.Stats.SettingsFloods.Load(); n != 1 {
			t.Errorf("SettingsFloods = %d", n)
		}
		stillServes(t, ts)
	})
	t.Run("huge frame", func(t *testing.T) {
		ts := startServer(t, echo)
		rc := dialRaw(t, ts)
		settings := make([]http2.Setting, 10000)
		for i := range settings {
			settings[i] = http2.Setting{ID: 0x100, Val: uint32(i)}
		}
		go rc.fr.WriteSettings(settings...)
		rc.expectGoAway(http2.ErrCodeEnhanceYourCalm)
		if n := ts.Stats.SettingsFloods.Load(); n != 1 {
			t.Errorf("SettingsFloods = %d", n)
		}
	})
}

// Frames that carry nothing and cost a frame's work each (CVE-2019-9518
// and relatives) end the connection once over their budget.
func TestLimitEmptyFrameFloods(t *testing.T) {
	for _, tc := range []struct {
		name  string
		send  func(rc *rawClient) error
		count func(*hbone.Stats) uint64
	}{
		{"empty DATA", func(rc *rawClient) error { return rc.fr.WriteData(1, false, nil) },
			func(s *hbone.Stats) uint64 { return s.EmptyFrameFloods.Load() }},
		{"padding-only DATA", func(rc *rawClient) error { return rc.fr.WriteDataPadded(1, false, nil, make([]byte, 3)) },
			func(s *hbone.Stats) uint64 { return s.EmptyFrameFloods.Load() }},
		{"stream WINDOW_UPDATE", func(rc *rawClient) error { return rc.fr.WriteWindowUpdate(1, 1) },
			func(s *hbone.Stats) uint64 { return s.WindowUpdateFloods.Load() }},
		{"connection WINDOW_UPDATE", func(rc *rawClient) error { return rc.fr.WriteWindowUpdate(0, 1) },
			func(s *hbone.Stats) uint64 { return s.WindowUpdateFloods.Load() }},
		{"PRIORITY", func(rc *rawClient) error { return rc.fr.WritePriority(3, http2.PriorityParam{Weight: 1}) },
			func(s *hbone.Stats) uint64 { return s.PriorityFloods.Load() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkLeaks(t)
			ts := startServer(t, blockUntilCancelled)
			rc := dialRaw(t, ts)
			rc.connect(1, false)
			go func() {
				for range 10000 {
					if tc.send(rc) != nil {
						return
					}
				}
			}()
			rc.expectGoAway(http2.ErrCodeEnhanceYourCalm)
			if n := tc.count(ts.Stats); n != 1 {
				t.Errorf("flood counted %d times, want 1", n)
			}
			rc.tc.Close()
			stillServes(t, ts)
		})
	}
}

// WINDOW_UPDATEs that return window our DATA used are not a flood, however
// many: a peer may return each frame's window twice (stream and
// connection) as it reads.
func TestWindowUpdatesForOurData(t *testing.T) {
	checkLeaks(t)
	ts := startServer(t, echo)
	rc := dialRaw(t, ts)
	rc.fr.WriteHeaders(http2.HeadersFrameParam{
		StreamID: 1, BlockFragment: rc.block(":method", "CONNECT", ":authority", "10.0.0.1:8080", "x-echo", "1"), EndHeaders: true,
	})
	if code := rc.expectStatus(1); code != 200 {
		t.Fatalf("status %d", code)
	}
	const frames, size = 300, 1000
	updates := 0
	for range frames {
		rc.fr.WriteData(1, false, make([]byte, size))
		// Read the echo and return its window in two pieces, on the
		// stream and on the connection.
		for echoed := 0; echoed < size; {
			f := rc.next(func(f http2.Frame) bool {
				_, data := f.(*http2.DataFrame)
				_, ga := f.(*http2.GoAwayFrame)
				return data || ga
			})
			d, ok := f.(*http2.DataFrame)
			if !ok {
				t.Fatalf("after %d WINDOW_UPDATEs: %v", updates, f)
			}
			n := uint32(len(d.Data()))
			echoed += int(n)
			for _, id := range []uint32{1, 0} {
				if n > 1 {
					rc.fr.WriteWindowUpdate(id, n/2)
					updates++
				}
				rc.fr.WriteWindowUpdate(id, n-n/2)
				updates++
			}
		}
	}
	rc.ping()
	if n := ts.Stats.WindowUpdateFloods.Load(); n != 0 {
		t.Errorf("WindowUpdateFloods = %d after %d WINDOW_UPDATEs", n, updates)
	}
}

func TestLimitStreamErrorFlood(t *testing.T) {
	checkLeaks(t)
	ts := startServer(t, echo)
	rc := dialRaw(t, ts)
	go func() {
		// Each bad request costs the server a 400.
		for id := uint32(1); id < 20000; id += 2 {
			err := rc.fr.WriteHeaders(http2.HeadersFrameParam{
				StreamID:      id,
				BlockFragment: rc.block(":method", "GET", ":authority", "10.0.0.1:8080"),
				EndHeaders:    true, EndStream: true,
			})
			if err != nil {
				return
			}
		}
	}()
	rc.expectGoAway(http2.ErrCodeEnhanceYourCalm)
	if n := ts.Stats.StreamErrorFloods.Load(); n != 1 {
		t.Errorf("StreamErrorFloods = %d", n)
	}
	stillServes(t, ts)
}

// A client that makes the server queue replies and never reads them is
// cut off instead of growing the server's buffers.
func TestLimitControlFlood(t *testing.T) {
	checkLeaks(t)
	ts := startServer(t, blockUntilCancelled, func(s *hbone.Server) { s.MaxConcurrentStreams = 1 })
	// A tiny receive buffer: the server's socket fills at once.
	rc := dialRawWith(t, ts, smallReceiveBuffer(4096))
	rc.connect(1, false) // takes the only slot; every further stream is refused
	rc.tc.SetWriteDeadline(time.Now().Add(20 * time.Second))
	for id := uint32(3); ; id += 2 {
		if rc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: rc.block(":method", "CONNECT", ":authority", "10.0.0.1:8080"), EndHeaders: true}) != nil {
			break // the server hung up
		}
		if id > 1<<24 {
			t.Fatal("server kept queueing refusals")
		}
	}
	testutil.Eventually(t, "control flood detected", func() bool { return ts.Stats.ControlFloods.Load() == 1 })
	stillServes(t, ts)
}

func TestLimitHandshakeTimeout(t *testing.T) {
	checkLeaks(t)
	ts := startServer(t, echo, func(s *hbone.Server) { s.HandshakeTimeout = time.Second })
	// Slowloris: connect, say nothing. The hello budget (never more than
	// HandshakeTimeout) resets it.
	silent, err := net.Dial("tcp", ts.Addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	// Complete TLS, never send the HTTP/2 preface.
	_, ctls := mustTLS(t)
	mute, err := tls.Dial("tcp", ts.Addr.String(), ctls)
	if err != nil {
		t.Fatal(err)
	}
	defer mute.Close()
	start := time.Now()
	silent.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := silent.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("silent connection: %v, want reset by server", err)
	}
	mute.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.Copy(io.Discard, mute); err != nil {
		t.Fatalf("TLS connection without preface: %v, want closed by server", err)
	}
	if d := time.Since(start); d > 4*time.Second {
		t.Errorf("cut off after %v", d)
	}
	testutil.Eventually(t, "timeouts counted", func() bool { return ts.Stats.HandshakeTimeouts.Load() == 1 && ts.Stats.HelloTimeouts.Load() == 1 })
	stillServes(t, ts)
}

// A connection that sends nothing is reset after HelloTimeout, long
// before HandshakeTimeout; a client that speaks is not hurried.
func TestLimitHelloTimeout(t *testing.T) {
	checkLeaks(t)
	ts := startServer(t, echo, func(s *hbone.Server) { s.HelloTimeout = 100 * time.Millisecond; s.HandshakeTimeout = time.Minute })
	silent, err := net.Dial("tcp", ts.Addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	// Well before HandshakeTimeout: only the hello budget can end it.
	silent.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := silent.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("silent connection: %v, want reset by server", err)
	}
	if n := ts.Stats.HelloTimeouts.Load(); n != 1 {
		t.Errorf("HelloTimeouts = %d, want 1", n)
	}
	if n := ts.Stats.HandshakeTimeouts.Load(); n != 0 {
		t.Errorf("HandshakeTimeouts = %d, want 0", n)
	}
	stillServes(t, ts)
}

// dialFrom opens a TCP connection to ts from the loopback address src.
func dialFrom(t *testing.T, ts *testServer, src string) *net.TCPConn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	c, err := d.Dial("tcp", ts.Addr.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// expectReset connects from src and checks that the server resets the
// connection at once, before any byte (the reset may even beat the
// dialler's check of its connect).
func expectReset(t *testing.T, ts *testServer, src string) {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	c, err := d.Dial("tcp", ts.Addr.String())
	if err == nil {
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = c.Read(make([]byte, 1))
	}
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("connection over the bound: %v, want reset by the server", err)
	}
}

// servesFrom checks that a client at src ("": the pool's default) gets a
// working tunnel.
func servesFrom(t *testing.T, ts *testServer, src string) {
	t.Helper()
	if err := serves(t, ts, src); err != nil {
		t.Fatal(err)
	}
}

func serves(t *testing.T, ts *testServer, src string) error {
	tp := newPool(t, ts)
	tp.src = src
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := tp.Connect(ctx, tp.Key, "10.0.0.1:8080", http.Header{"X-Echo": {"1"}})
	if err != nil {
		return fmt.Errorf("connect from %q: %w", src, err)
	}
	defer s.Close()
	s.Write([]byte("hi"))
	s.CloseWrite()
	if got := readAllString(t, s); got != "hi" {
		return fmt.Errorf("echo from %q = %q", src, got)
	}
	return nil
}

// One address cannot hold more than MaxHandshakesPerSource connections
// in their handshake; the excess is reset at once, and other addresses
// are served meanwhile.
func TestLimitHandshakesPerSource(t *testing.T) {
	checkLeaks(t)
	ts := startServer(t, echo, func(s *hbone.Server) { s.MaxHandshakesPerSource = 4 })
	var held []*net.TCPConn
	for range 4 {
		held = append(held, dialFrom(t, ts, "127.0.0.7"))
	}
	expectReset(t, ts, "127.0.0.7")
	if n := ts.Stats.HandshakesRefusedPerSource.Load(); n != 1 {
		t.Errorf("HandshakesRefusedPerSource = %d, want 1", n)
	}
	servesFrom(t, ts, "127.0.0.8")
	// Authenticated connections hold no slot: another one from the
	// server's default source works too, and so do the slots it had.
	servesFrom(t, ts, "")
	servesFrom(t, ts, "")
	for _, c := range held {
		c.Close()
	}
	// Once the silent ones are gone, the address is served again.
	testutil.Eventually(t, "the address's slots", func() bool { return serves(t, ts, "127.0.0.7") == nil })
	if n := ts.Stats.HandshakesRefused.Load(); n != 0 {
		t.Errorf("HandshakesRefused = %d, want 0", n)
	}
}

// All sources together cannot hold more than MaxHandshakes connections in
// their handshake.
func TestLimitHandshakes(t *testing.T) {
	checkLeaks(t)
	ts := startServer(t, echo, func(s *hbone.Server) { s.MaxHandshakes = 3; s.MaxHandshakesPerSource = -1 })
	var held []*net.TCPConn
	for _, src := range []string{"127.0.0.11", "127.0.0.12", "127.0.0.12"} {
		held = append(held, dialFrom(t, ts, src))
	}
	expectReset(t, ts, "127.0.0.13")
	if n := ts.Stats.HandshakesRefused.Load(); n != 1 {
		t.Errorf("HandshakesRefused = %d, want 1", n)
	}
	held[0].Close()
	// The freed slot is taken by a client that completes its handshake,
	// and given back: authenticated connections do not count.
	testutil.Eventually(t, "the closed connection's slot", func() bool { return serves(t, ts, "127.0.0.14") == nil })
	servesFrom(t, ts, "127.0.0.15")
	servesFrom(t, ts, "127.0.0.16")
}

func TestTLSRequired(t *testing.T) {
	checkLeaks(t)
	ts := startServer(t, echo)
	// A client without a certificate fails the mutual-TLS handshake.
	_, ctls := mustTLS(t)
	ctls.Certificates = nil
	c, err := tls.Dial("tcp", ts.Addr.String(), ctls)
	if err == nil {
		_, err = c.Read(make([]byte, 1))
		c.Close()
	}
	if err == nil {
		t.Fatal("handshake without client certificate succeeded")
	}
	// ALPN other than h2.
	_, ctls = mustTLS(t)
	ctls.NextProtos = []string{"http/1.1"}
	if c, err := tls.Dial("tcp", ts.Addr.String(), ctls); err == nil {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Error("connection without h2 stayed open")
		}
		c.Close()
	}
	testutil.Eventually(t, "handshake errors counted", func() bool { return ts.Stats.HandshakeErrors.Load() == 2 })
}

// TestProtocolErrors sends what RFC 9113 forbids and checks the error
// code of the answer; the server must keep serving afterwards.
func TestProtocolErrors(t *testing.T) {
	checkLeaks(t)
	type want struct {
		goAway http2.ErrCode // connection error
		rst    uint32        // else stream error on this stream
		code   http2.ErrCode
		status int // else this response status
	}
	conn := func(code http2.ErrCode) want { return want{goAway: code, rst: 0, code: 0xff} }
	rst := func(id uint32, code http2.ErrCode) want { return want{rst: id, code: code} }
	status := func(s int) want { return want{status: s} }
	data := func(rc *rawClient, id uint32, n int, end bool) {
		rc.fr.WriteData(id, end, make([]byte, n))
	}
	hdrs := func(rc *rawClient, id uint32, kv ...string) {
		rc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: rc.block(kv...), EndHeaders: true})
	}
	small := func(s *hbone.Server) {
		s.Settings = hbone.Settings{StreamWindow: 64 << 10, ConnWindow: 100 << 10}
	}
	for _, tc := range []struct {
		name string
		srv  func(*hbone.Server)
		send func(rc *rawClient)
		want want
	}{
		{"DATA on idle stream", nil, func(rc *rawClient) { data(rc, 1, 1, false) }, conn(http2.ErrCodeProtocol)},
		{"HEADERS on even stream", nil, func(rc *rawClient) { rc.connect(2, false) }, conn(http2.ErrCodeProtocol)},
		{"HEADERS on lower stream id", nil, func(rc *rawClient) { rc.connect(5, false); rc.connect(3, false) }, conn(http2.ErrCodeProtocol)},
		{"WINDOW_UPDATE on idle stream", nil, func(rc *rawClient) { rc.fr.WriteWindowUpdate(9, 1) }, conn(http2.ErrCodeProtocol)},
		{"RST_STREAM on idle stream", nil, func(rc *rawClient) { rc.fr.WriteRSTStream(9, http2.ErrCodeCancel) }, conn(http2.ErrCodeProtocol)},
		{"connection window overflow", nil, func(rc *rawClient) { rc.fr.WriteWindowUpdate(0, 1<<31-1) }, conn(http2.ErrCodeFlowControl)},
		{"stream window overflow", nil, func(rc *rawClient) { rc.connect(1, false); rc.fr.WriteWindowUpdate(1, 1<<31-1) }, rst(1, http2.ErrCodeFlowControl)},
		{"zero window increment", nil, func(rc *rawClient) { rc.connect(1, false); rc.fr.WriteWindowUpdate(1, 0) }, rst(1, http2.ErrCodeProtocol)},
		{"zero connection window increment", nil, func(rc *rawClient) { rc.fr.WriteWindowUpdate(0, 0) }, conn(http2.ErrCodeProtocol)},
		{"stream window exceeded", small, func(rc *rawClient) { rc.connect(1, false); data(rc, 1, 65<<10, false) }, rst(1, http2.ErrCodeFlowControl)},
		{"connection window exceeded", small, func(rc *rawClient) {
			rc.connect(1, false)
			rc.connect(3, false)
			data(rc, 1, 60<<10, false)
			data(rc, 3, 60<<10, false)
		}, conn(http2.ErrCodeFlowControl)},
		{"padding longer than payload", nil, func(rc *rawClient) {
			rc.connect(1, false)
			rc.fr.WriteRawFrame(http2.FrameData, http2.FlagDataPadded, 1, []byte{5, 'a'})
		}, conn(http2.ErrCodeProtocol)},
		{"DATA after END_STREAM", nil, func(rc *rawClient) { rc.connect(1, true); data(rc, 1, 1, false) }, rst(1, http2.ErrCodeStreamClosed)},
		{"frame over max frame size", nil, func(rc *rawClient) {
			rc.connect(1, false)
			hdr := []byte{0x10, 0, 1, 0, 0, 0, 0, 0, 1} // 1 MiB + 1
			rc.tc.Write(hdr)
		}, conn(http2.ErrCodeFrameSize)},
		{"PING on a stream", nil, func(rc *rawClient) { rc.fr.WriteRawFrame(http2.FramePing, 0, 1, make([]byte, 8)) }, conn(http2.ErrCodeProtocol)},
		{"short PING", nil, func(rc *rawClient) { rc.fr.WriteRawFrame(http2.FramePing, 0, 0, make([]byte, 7)) }, conn(http2.ErrCodeFrameSize)},
		{"SETTINGS window too big", nil, func(rc *rawClient) {
			rc.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 31})
		}, conn(http2.ErrCodeFlowControl)},
		{"SETTINGS bad frame size", nil, func(rc *rawClient) {
			rc.fr.WriteSettings(http2.Setting{ID: http2.SettingMaxFrameSize, Val: 100})
		}, conn(http2.ErrCodeProtocol)},
		{"SETTINGS bad push", nil, func(rc *rawClient) {
			rc.fr.WriteSettings(http2.Setting{ID: http2.SettingEnablePush, Val: 2})
		}, conn(http2.ErrCodeProtocol)},
		{"SETTINGS ACK with payload", nil, func(rc *rawClient) {
			rc.fr.WriteRawFrame(http2.FrameSettings, http2.FlagSettingsAck, 0, make([]byte, 6))
		}, conn(http2.ErrCodeFrameSize)},
		{"CONTINUATION without HEADERS", nil, func(rc *rawClient) { rc.fr.WriteContinuation(1, true, nil) }, conn(http2.ErrCodeProtocol)},
		{"HEADERS interrupted", nil, func(rc *rawClient) {
			rc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: rc.block(":method", "CONNECT")})
			rc.fr.WritePing(false, [8]byte{})
		}, conn(http2.ErrCodeProtocol)},
		{"PUSH_PROMISE from client", nil, func(rc *rawClient) {
			rc.connect(1, false)
			rc.fr.WritePushPromise(http2.PushPromiseParam{StreamID: 1, PromiseID: 2, BlockFragment: []byte{0x82}, EndHeaders: true})
		}, conn(http2.ErrCodeProtocol)},
		{"bad HPACK", nil, func(rc *rawClient) {
			rc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, EndHeaders: true})
		}, conn(http2.ErrCodeCompression)},
		{"GET", nil, func(rc *rawClient) {
			hdrs(rc, 1, ":method", "GET", ":scheme", "https", ":path", "/", ":authority", "10.0.0.1:80")
		}, status(400)},
		{"CONNECT without authority", nil, func(rc *rawClient) { hdrs(rc, 1, ":method", "CONNECT") }, status(400)},
		{"CONNECT with path", nil, func(rc *rawClient) {
			hdrs(rc, 1, ":method", "CONNECT", ":authority", "10.0.0.1:8080", ":path", "/")
		}, status(400)},
		{"CONNECT with scheme", nil, func(rc *rawClient) {
			hdrs(rc, 1, ":method", "CONNECT", ":authority", "10.0.0.1:8080", ":scheme", "https")
		}, status(400)},
		{"extended CONNECT", nil, func(rc *rawClient) {
			hdrs(rc, 1, ":method", "CONNECT", ":protocol", "websocket", ":authority", "10.0.0.1:8080")
		}, status(400)},
		{"host name authority", nil, func(rc *rawClient) { hdrs(rc, 1, ":method", "CONNECT", ":authority", "example.com:80") }, status(400)},
		{"unbracketed IPv6", nil, func(rc *rawClient) { hdrs(rc, 1, ":method", "CONNECT", ":authority", "fd00::1:80") }, status(400)},
		{"uppercase header", nil, func(rc *rawClient) {
			hdrs(rc, 1, ":method", "CONNECT", ":authority", "10.0.0.1:8080", "Baggage", "x")
		}, rst(1, http2.ErrCodeProtocol)},
		{"pseudo after regular", nil, func(rc *rawClient) {
			hdrs(rc, 1, ":method", "CONNECT", "baggage", "x", ":authority", "10.0.0.1:8080")
		}, rst(1, http2.ErrCodeProtocol)},
		{"unknown pseudo", nil, func(rc *rawClient) {
			hdrs(rc, 1, ":method", "CONNECT", ":authority", "10.0.0.1:8080", ":foo", "x")
		}, rst(1, http2.ErrCodeProtocol)},
		{"response pseudo in request", nil, func(rc *rawClient) {
			hdrs(rc, 1, ":method", "CONNECT", ":authority", "10.0.0.1:8080", ":status", "200")
		}, rst(1, http2.ErrCodeProtocol)},
		{"duplicate pseudo", nil, func(rc *rawClient) {
			hdrs(rc, 1, ":method", "CONNECT", ":method", "CONNECT", ":authority", "10.0.0.1:8080")
		}, rst(1, http2.ErrCodeProtocol)},
		{"connection header", nil, func(rc *rawClient) {
			hdrs(rc, 1, ":method", "CONNECT", ":authority", "10.0.0.1:8080", "connection", "close")
		}, rst(1, http2.ErrCodeProtocol)},
		{"header value with newline", nil, func(rc *rawClient) {
			hdrs(rc, 1, ":method", "CONNECT", ":authority", "10.0.0.1:8080", "baggage", "a\nb")
		}, rst(1, http2.ErrCodeProtocol)},
		{"stream depends on itself", nil, func(rc *rawClient) {
			rc.connect(1, false)
			rc.fr.WritePriority(1, http2.PriorityParam{StreamDep: 1})
		}, rst(1, http2.ErrCodeProtocol)},
		{"trailers without END_STREAM", nil, func(rc *rawClient) {
			rc.connect(1, false)
			hdrs(rc, 1, "x-trailer", "1")
		}, rst(1, http2.ErrCodeProtocol)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var mods []func(*hbone.Server)
			if tc.srv != nil {
				mods = append(mods, tc.srv)
			}
			ts := startServer(t, blockUntilCancelled, mods...)
			rc := dialRaw(t, ts)
			tc.send(rc)
			switch w := tc.want; {
			case w.code == 0xff:
				rc.expectGoAway(w.goAway)
			case w.status != 0:
				if got := rc.expectStatus(1); got != w.status {
					t.Fatalf("status %d, want %d", got, w.status)
				}
			default:
				rc.expectReset(w.rst, w.code)
			}
			if tc.want.code != 0xff {
				// Only the stream failed: the connection still works.
				rc.fr.WriteHeaders(http2.HeadersFrameParam{
					StreamID:      101,
					BlockFragment: rc.block(":method", "CONNECT", ":authority", "10.0.0.2:80", "x-echo", "1"),
					EndHeaders:    true,
				})
				if got := rc.expectStatus(101); got != 200 {
					t.Fatalf("next stream on the connection: %d", got)
				}
			}
			stillServes(t, ts)
		})
	}
}

// Frames the server must ignore.
func TestProtocolIgnored(t *testing.T) {
	checkLeaks(t)
	ts := startServer(t, echo)
	rc := dialRaw(t, ts)
	rc.fr.WriteRawFrame(0x42, 0xff, 0, []byte("unknown frame type"))
	rc.fr.WritePriority(7, http2.PriorityParam{StreamDep: 3, Weight: 9}) // idle stream: allowed
	rc.fr.WriteRawFrame(http2.FrameGoAway, 0, 0, append(make([]byte, 8), make([]byte, 1000)...))
	rc.connect(1, false)
	if got := rc.expectStatus(1); got != 200 {
		t.Fatalf("status %d", got)
	}
	// Padded DATA is delivered without its padding.
	rc.fr.WriteDataPadded(1, true, []byte("hi"), make([]byte, 10))
	f := rc.next(func(f http2.Frame) bool { d, ok := f.(*http2.DataFrame); return ok && len(d.Data()) > 0 })
	if d, _ := f.(*http2.DataFrame); d == nil || string(d.Data()) != "hi" {
		t.Fatalf("echoed %v", f)
	}
	if ts.Stats.ProtocolErrors.Load() != 0 {
		t.Errorf("ProtocolErrors = %d", ts.Stats.ProtocolErrors.Load())
	}
}

func TestBadPreface(t *testing.T) {
	checkLeaks(t)
	ts := startServer(t, echo)
	_, ctls := mustTLS(t)
	for _, preface := range []string{"GET / HTTP/1.1\r\nHost: x\r\n\r\n", http2.ClientPreface} {
		tc, err := tls.Dial("tcp", ts.Addr.String(), ctls)
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(tc, preface)
		fr := http2.NewFramer(tc, tc)
		if preface == http2.ClientPreface {
			fr.WritePing(false, [8]byte{}) // the first frame must be SETTINGS
		}
		rc := &rawClient{t: t, tc: tc, fr: fr}
		rc.expectGoAway(http2.ErrCodeProtocol)
		tc.Close()
	}
}
