package relay

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"testing"
	"testing/synctest"
	"time"
	"unsafe"

	"github.com/amber-mesh/amber/internal/tcptest"
	"github.com/amber-mesh/amber/tunnel/hbone"
)

func startPair(t *testing.T, a, b Conn, pk *Parker) (*Pair, chan Result) {
	t.Helper()
	res := make(chan Result, 1)
	p := NewPair(a, b)
	p.Start(pk, DoneFunc(func(r Result) { res <- r }))
	return p, res
}

func result(t *testing.T, res chan Result) Result {
	t.Helper()
	select {
	case r := <-res:
		return r
	case <-time.After(5 * time.Second):
		t.Fatal("relay did not end")
		return Result{}
	}
}

// exchange writes to c and reads the answer back from peer, and the other
// way round, then half-closes c and checks that peer reads EOF while peer's
// direction still flows, then half-closes peer.
func exchange(t *testing.T, c, peer Conn) {
	t.Helper()
	roundTrip(t, c, peer, "ping")
	roundTrip(t, peer, c, "pong")
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	peer.SetReadDeadline(time.Now().Add(5 * time.Second))
	if rest, err := io.ReadAll(peer); err != nil || len(rest) != 0 {
		t.Fatalf("after the half-close read %q, %v; want EOF", rest, err)
	}
	roundTrip(t, peer, c, "after the half-close")
	if err := peer.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if rest, err := io.ReadAll(c); err != nil || len(rest) != 0 {
		t.Fatalf("after both half-closes read %q, %v; want EOF", rest, err)
	}
}

func roundTrip(t *testing.T, from, to Conn, msg string) {
	t.Helper()
	if _, err := from.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(msg))
	to.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(to, buf); err != nil || string(buf) != msg {
		t.Fatalf("read %q, %v; want %q", buf, err, msg)
	}
}

// TestPairSockets relays two TCP connections: bytes and half-closes pass
// both ways, and the counts come back.
func TestPairSockets(t *testing.T) {
	client, a := tcptest.Pair(t)
	b, server := tcptest.Pair(t)
	_, res := startPair(t, a, b, mustParker(t))
	exchange(t, client, server)
	if r := result(t, res); r.Err != nil || r.AToB != 4 || r.BToA != 4+20 {
		t.Errorf("result %+v; want 4 and 24 bytes, no error", r)
	}
}

// TestPairClose: Close ends a live relay, or one not yet started, with
// its error; the endpoints see their connections end.
func TestPairClose(t *testing.T) {
	errRevoked := errors.New("revoked")
	for _, started := range []bool{true, false} {
		client, a := tcptest.Pair(t)
		b, server := tcptest.Pair(t)
		p := NewPair(a, b)
		res := make(chan Result, 1)
		if started {
			p.Start(nil, DoneFunc(func(r Result) { res <- r }))
			roundTrip(t, client, server, "x")
		}
		p.Close(errRevoked)
		if !started {
			p.Start(nil, DoneFunc(func(r Result) { res <- r }))
		}
		if r := result(t, res); !errors.Is(r.Err, errRevoked) {
			t.Errorf("started %v: result %+v, want the Close error", started, r)
		}
		for _, c := range []net.Conn{client, server} {
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadAll(c); err != nil {
				t.Errorf("started %v: endpoint of a closed relay: %v, want EOF", started, err)
			}
		}
	}
}

// hbonePool serves h on a loopback listener, HTTP/2 without TLS
// (Server.ServeConn takes any established connection), and returns a Pool
// dialling it.
func hbonePool(t *testing.T, h hbone.HandlerFunc) (*hbone.Pool, hbone.Key) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &hbone.Server{Handler: h}
	tcptest.Serve(t, ln, func(c net.Conn) { srv.ServeConn(context.Background(), c) })
	pool := &hbone.Pool{Dial: func(ctx context.Context, _ hbone.Key) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", ln.Addr().String())
	}}
	t.Cleanup(func() {
		pool.Close()
		srv.Close()
	})
	return pool, hbone.Key{Addr: netip.MustParseAddrPort(ln.Addr().String())}
}

func connect(t *testing.T, pool *hbone.Pool, key hbone.Key) *hbone.Stream {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := pool.Connect(ctx, key, "10.0.0.1:80", nil)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestPairStreams relays an HBONE stream, as a server handler that
// returns at once, to a socket (parked when idle) and to another HBONE
// stream (a waypoint's chain): bytes and half-closes pass both ways.
func TestPairStreams(t *testing.T) {
	pk := mustParker(t)
	for _, tc := range []struct {
		name     string
		upstream func(t *testing.T) (up, peer Conn)
	}{
		{"socket", func(t *testing.T) (Conn, Conn) {
			up, peer := tcptest.Pair(t)
			return up, peer
		}},
		{"stream", func(t *testing.T) (Conn, Conn) {
			peers := make(chan *hbone.Stream, 1)
			pool, key := hbonePool(t, func(_ context.Context, _ *hbone.Request, rw hbone.Responder) {
				s, err := rw.Accept()
				if err != nil {
					return
				}
				hbone.Detach(s)
				peers <- s
			})
			up := connect(t, pool, key)
			return up, <-peers
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up, peer := tc.upstream(t)
			defer peer.Close()
			res := make(chan Result, 1)
			pool, key := hbonePool(t, func(_ context.Context, _ *hbone.Request, rw hbone.Responder) {
				s, err := rw.Accept()
				if err != nil {
					return
				}
				hbone.Detach(s)
				NewPair(s, up).Start(pk, DoneFunc(func(r Result) { res <- r }))
			})
			client := connect(t, pool, key)
			defer client.Close()
			exchange(t, client, peer)
			if r := result(t, res); r.Err != nil || r.AToB != 4 || r.BToA != 4+20 {
				t.Errorf("result %+v; want 4 and 24 bytes, no error", r)
			}
		})
	}
}

// TestPairReplay: bytes read ahead from either side (Replay) reach the
// other side first, then the connections are relayed their usual way;
// with an idle timeout (long enough never to fire here) the same holds
// through the paths that notice activity.
func TestPairReplay(t *testing.T) {
	pk := mustParker(t)
	for _, idle := range []time.Duration{0, time.Hour} {
		for _, kind := range []string{"socket", "stream"} {
			t.Run(fmt.Sprintf("%s/idle=%v", kind, idle), func(t *testing.T) {
				var up, peer Conn
				if kind == "socket" {
					up, peer = tcptest.Pair(t)
				} else {
					peers := make(chan *hbone.Stream, 1)
					pool, key := hbonePool(t, func(_ context.Context, _ *hbone.Request, rw hbone.Responder) {
						s, err := rw.Accept()
						if err != nil {
							return
						}
						hbone.Detach(s)
						peers <- s
					})
					up = connect(t, pool, key)
					peer = <-peers
				}
				defer peer.Close()
				res := make(chan Result, 1)
				pool, key := hbonePool(t, func(_ context.Context, _ *hbone.Request, rw hbone.Responder) {
					s, err := rw.Accept()
					if err != nil {
						return
					}
					hbone.Detach(s)
					p := NewPair(Replay(s, []byte("sniffed:")), Replay(up, []byte("buffered:")))
					p.SetIdleTimeout(idle)
					p.Start(pk, DoneFunc(func(r Result) { res <- r }))
				})
				client := connect(t, pool, key)
				defer client.Close()
				buf := make([]byte, len("buffered:"))
				if _, err := io.ReadFull(client, buf); err != nil || string(buf) != "buffered:" {
					t.Fatalf("client read %q, %v; want the upstream's read-ahead first", buf, err)
				}
				buf = make([]byte, len("sniffed:"))
				if _, err := io.ReadFull(peer, buf); err != nil || string(buf) != "sniffed:" {
					t.Fatalf("upstream read %q, %v; want the client's read-ahead first", buf, err)
				}
				exchange(t, client, peer)
				if r := result(t, res); r.Err != nil || r.AToB != 8+4 || r.BToA != 9+4+20 {
					t.Errorf("result %+v; want 12 and 33 bytes, no error", r)
				}
			})
		}
	}
}

// memConn is one end of an in-memory connection with half-close, which
// a synctest bubble can wait on (a socket's wait is not durable).
type memConn struct {
	r *io.PipeReader
	w *io.PipeWriter
}

func memPair() (a, b *memConn) {
	ar, bw := io.Pipe()
	br, aw := io.Pipe()
	return &memConn{r: ar, w: aw}, &memConn{r: br, w: bw}
}

func (c *memConn) Read(p []byte) (int, error)       { return c.r.Read(p) }
func (c *memConn) Write(p []byte) (int, error)      { return c.w.Write(p) }
func (c *memConn) CloseWrite() error                { return c.w.Close() }
func (c *memConn) Close() error                     { c.r.Close(); return c.w.Close() }
func (c *memConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (c *memConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (c *memConn) SetDeadline(time.Time) error      { return errors.ErrUnsupported }
func (c *memConn) SetReadDeadline(time.Time) error  { return errors.ErrUnsupported }
func (c *memConn) SetWriteDeadline(time.Time) error { return errors.ErrUnsupported }

// TestPairIdleTimeout: a relay ends with ErrIdleTimeout exactly when no
// byte moved either way for its idle timeout, counted from the last byte
// in either direction.
func TestPairIdleTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		client, a := memPair()
		b, server := memPair()
		p := NewPair(a, b)
		p.SetIdleTimeout(time.Minute)
		res := make(chan Result, 1)
		start := time.Now()
		p.Start(nil, DoneFunc(func(r Result) { res <- r }))
		send := func(from, to *memConn, msg string) {
			t.Helper()
			go from.Write([]byte(msg))
			buf := make([]byte, len(msg))
			if _, err := io.ReadFull(to, buf); err != nil || string(buf) != msg {
				t.Fatalf("read %q, %v", buf, err)
			}
		}
		time.Sleep(50 * time.Second)
		send(client, server, "up")
		time.Sleep(50 * time.Second)
		send(server, client, "down") // each direction keeps the relay alive
		time.Sleep(time.Minute - time.Nanosecond)
		synctest.Wait()
		select {
		case r := <-res:
			t.Fatalf("ended after %v of a 1m idle timeout: %+v", time.Since(start), r)
		default:
		}
		time.Sleep(time.Nanosecond)
		synctest.Wait()
		select {
		case r := <-res:
			if !errors.Is(r.Err, ErrIdleTimeout) || r.AToB != 2 || r.BToA != 4 {
				t.Errorf("result %+v, want ErrIdleTimeout after 2 and 4 bytes", r)
			}
			if d := time.Since(start); d != 160*time.Second {
				t.Errorf("ended after %v, want 2m40s (the last byte at 1m40s, then 1m idle)", d)
			}
		default:
			t.Fatal("not ended after 1m without a byte")
		}
	})
}

// TestPairSize: an idle relay holds its Pair, directions and pump
// included; a field that pushes it past 176 bytes costs every connection
// the next size class of Go's allocator (192).
func TestPairSize(t *testing.T) {
	if size := unsafe.Sizeof(Pair{}); size > 176 {
		t.Errorf("Pair is %d bytes, want ≤ 176", size)
	}
}
