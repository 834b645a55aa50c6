package hbone_test

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"strconv"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// rawListener is a loopback listener with the server TLS configuration
// for hand-written HTTP/2 servers.
func rawListener(t *testing.T) (net.Listener, *tls.Config) {
	t.Helper()
	stls, _ := mustTLS(t)
	stls.NextProtos = []string{"h2"}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln, stls
}

// newRawServer completes the TLS handshake and the server side of the
// HTTP/2 preface on tc, returning a Framer for hand-written frames.
func newRawServer(t *testing.T, tc *tls.Conn) *http2.Framer {
	if tc.Handshake() != nil {
		return nil
	}
	var p [len(http2.ClientPreface)]byte
	if _, err := io.ReadFull(tc, p[:]); err != nil || string(p[:]) != http2.ClientPreface {
		return nil
	}
	fr := http2.NewFramer(tc, tc)
	if fr.WriteSettings() != nil {
		return nil
	}
	return fr
}

// rawClient speaks hand-written HTTP/2 to a Server, to send what a
// well-behaved client never would.
type rawClient struct {
	t    *testing.T
	tc   *tls.Conn
	fr   *http2.Framer
	enc  *hpack.Encoder
	hbuf bytes.Buffer
}

func dialRaw(t *testing.T, ts *testServer) *rawClient {
	t.Helper()
	return dialRawWith(t, ts, &net.Dialer{})
}

// dialRawWith is dialRaw with the dialler's socket options.
func dialRawWith(t *testing.T, ts *testServer, d *net.Dialer) *rawClient {
	t.Helper()
	_, ctls := mustTLS(t)
	tc, err := tls.DialWithDialer(d, "tcp", ts.Addr.String(), ctls)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tc.Close() })
	rc := &rawClient{t: t, tc: tc}
	rc.fr = http2.NewFramer(tc, tc)
	rc.fr.AllowIllegalWrites = true
	rc.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	rc.fr.MaxHeaderListSize = 1 << 20
	rc.enc = hpack.NewEncoder(&rc.hbuf)
	if _, err := io.WriteString(tc, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	if err := rc.fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	return rc
}

// block HPACK-encodes name/value pairs.
func (rc *rawClient) block(kv ...string) []byte {
	rc.hbuf.Reset()
	for i := 0; i < len(kv); i += 2 {
		rc.enc.WriteField(hpack.HeaderField{Name: kv[i], Value: kv[i+1]})
	}
	return bytes.Clone(rc.hbuf.Bytes())
}

// connect sends a valid CONNECT on stream id.
func (rc *rawClient) connect(id uint32, endStream bool) {
	rc.t.Helper()
	err := rc.fr.WriteHeaders(http2.HeadersFrameParam{
		StreamID:      id,
		BlockFragment: rc.block(":method", "CONNECT", ":authority", "10.0.0.1:8080"),
		EndHeaders:    true,
		EndStream:     endStream,
	})
	if err != nil {
		rc.t.Fatal(err)
	}
}

// next reads frames until one match returns true for; it returns that
// frame or nil if the connection ended first. It writes nothing (not even
// SETTINGS ACKs, which the server does not wait for), so another goroutine
// may write meanwhile.
func (rc *rawClient) next(match func(http2.Frame) bool) http2.Frame {
	rc.t.Helper()
	rc.tc.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		f, err := rc.fr.ReadFrame()
		if err != nil {
			var se http2.StreamError
			if errors.As(err, &se) {
				continue
			}
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) && !isReset(err) {
				rc.t.Fatalf("read frame: %v", err)
			}
			return nil
		}
		if match(f) {
			return f
		}
	}
}

func isReset(err error) bool {
	var oe *net.OpError
	return errors.As(err, &oe)
}

// expectGoAway waits for GOAWAY with code.
func (rc *rawClient) expectGoAway(code http2.ErrCode) {
	rc.t.Helper()
	f := rc.next(func(f http2.Frame) bool { _, ok := f.(*http2.GoAwayFrame); return ok })
	if f == nil {
		rc.t.Fatalf("connection closed without GOAWAY %v", code)
	}
	if ga := f.(*http2.GoAwayFrame); ga.ErrCode != code {
		rc.t.Fatalf("GOAWAY %v (%q), want %v", ga.ErrCode, ga.DebugData(), code)
	}
}

// expectReset waits for RST_STREAM on id with code.
func (rc *rawClient) expectReset(id uint32, code http2.ErrCode) {
	rc.t.Helper()
	f := rc.next(func(f http2.Frame) bool {
		switch f := f.(type) {
		case *http2.RSTStreamFrame:
			return f.StreamID == id
		case *http2.GoAwayFrame:
			return true
		}
		return false
	})
	rst, ok := f.(*http2.RSTStreamFrame)
	if !ok || rst.ErrCode != code {
		rc.t.Fatalf("got %v, want RST_STREAM %v on stream %d", f, code, id)
	}
}

// expectStatus waits for the response on id and returns its :status.
func (rc *rawClient) expectStatus(id uint32) int {
	rc.t.Helper()
	f := rc.next(func(f http2.Frame) bool {
		switch f := f.(type) {
		case *http2.MetaHeadersFrame:
			return f.StreamID == id
		case *http2.RSTStreamFrame:
			return f.StreamID == id
		case *http2.GoAwayFrame:
			return true
		}
		return false
	})
	mh, ok := f.(*http2.MetaHeadersFrame)
	if !ok {
		rc.t.Fatalf("got %v, want a response on stream %d", f, id)
	}
	code, _ := strconv.Atoi(mh.PseudoValue("status"))
	return code
}

// ping round-trips a PING: proof the server processed everything before.
func (rc *rawClient) ping() {
	rc.t.Helper()
	data := [8]byte{'s', 'y', 'n', 'c'}
	if err := rc.fr.WritePing(false, data); err != nil {
		rc.t.Fatal(err)
	}
	f := rc.next(func(f http2.Frame) bool {
		p, ok := f.(*http2.PingFrame)
		_, ga := f.(*http2.GoAwayFrame)
		return ga || ok && p.IsAck() && p.Data == data
	})
	if _, ok := f.(*http2.PingFrame); !ok {
		rc.t.Fatalf("no PING ACK: %v", f)
	}
}

// smallReceiveBuffer is a dialler whose sockets have a receive buffer of n
// bytes, so that a client that stops reading stalls the server at once.
func smallReceiveBuffer(n int) *net.Dialer {
	return &net.Dialer{Control: func(network, address string, c syscall.RawConn) error {
		return c.Control(func(fd uintptr) {
			syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, n)
		})
	}}
}
