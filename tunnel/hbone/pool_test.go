package hbone_test

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"golang.org/x/net/http2"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/tunnel/hbone"
)

// hold accepts and keeps the stream open until the client closes it.
var hold = hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, rw hbone.Responder) {
	s, err := rw.Accept()
	if err != nil {
		return
	}
	io.Copy(io.Discard, s)
	s.CloseWrite()
})

func TestPoolReuseAndLimits(t *testing.T) {
	checkLeaks(t)
	ts := startServer(t, echo)
	tp := newPool(t, ts)
	const n = 150
	streams := make([]*hbone.Stream, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := tp.Connect(context.Background(), tp.Key, "10.0.0.1:8080", nil)
			if err != nil {
				t.Error(err)
				return
			}
			streams[i] = s
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	// 100 streams per connection: 150 concurrent streams need two.
	if d := tp.Dials.Load(); d != 2 {
		t.Errorf("dials for %d concurrent streams = %d, want 2", n, d)
	}
	for i, s := range streams {
		msg := []byte{byte(i), byte(i >> 8)}
		if _, err := s.Write(msg); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, 2)
		if _, err := io.ReadFull(s, got); err != nil || string(got) != string(msg) {
			t.Fatalf("stream %d echoed %v, %v", i, got, err)
		}
		s.CloseWrite()
		if _, err := io.ReadAll(s); err != nil {
			t.Fatal(err)
		}
		s.Close()
	}
	// Finished streams free their slots: sequential streams reuse the
	// connections.
	for range 300 {
		s := tp.connect(t)
		s.CloseWrite()
		io.ReadAll(s)
		s.Close()
	}
	if d := tp.Dials.Load(); d != 2 {
		t.Errorf("dials after sequential reuse = %d, want 2", d)
	}
	if n := ts.Stats.StreamsRefused.Load(); n != 0 {
		t.Errorf("server refused %d streams", n)
	}
}

// A server advertising fewer concurrent streams than the pool's limit is
// respected.
func TestPoolRespectsServerMaxStreams(t *testing.T) {
	checkLeaks(t)
	ts := startServer(t, hold, func(s *hbone.Server) { s.MaxConcurrentStreams = 3 })
	tp := newPool(t, ts)
	// The first stream lets the pool learn the server's SETTINGS.
	first := tp.connect(t)
	var streams []*hbone.Stream
	for range 5 {
		streams = append(streams, tp.connect(t))
	}
	if d := tp.Dials.Load(); d != 2 {
		t.Errorf("dials for 6 streams at 3 per connection = %d, want 2", d)
	}
	if n := ts.Stats.StreamsRefused.Load(); n != 0 {
		t.Errorf("server refused %d streams: the pool exceeded its limit", n)
	}
	first.Close()
	for _, s := range streams {
		s.Close()
	}
}

// Concurrent Connects to one key while its dial is in flight share that
// dial. synctest.Wait says when every Connect is blocked on the held dial,
// so none can arrive after it finished.
func TestPoolSingleDial(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		tp := pipePool(t, &hbone.Server{Handler: hold})
		gate := make(chan struct{})
		dial := tp.Dial
		tp.Dial = func(ctx context.Context, key hbone.Key) (net.Conn, error) {
			<-gate // hold the dial so every Connect has to wait for it
			return dial(ctx, key)
		}
		var wg sync.WaitGroup
		for range 50 {
			wg.Go(func() {
				s, err := tp.Connect(context.Background(), tp.Key, "10.0.0.1:8080", nil)
				if err != nil {
					t.Error(err)
					return
				}
				s.Close()
			})
		}
		synctest.Wait()
		close(gate)
		wg.Wait()
		if d := tp.Dials.Load(); d != 1 {
			t.Errorf("50 concurrent Connects dialled %d times, want 1", d)
		}
	})
}

func TestPoolDialError(t *testing.T) {
	checkLeaks(t)
	ts := startServer(t, hold)
	tp := newPool(t, ts)
	tp.Dial = func(ctx context.Context, key hbone.Key) (net.Conn, error) {
		return nil, errors.New("no route")
	}
	_, err := tp.Connect(context.Background(), tp.Key, "10.0.0.1:8080", nil)
	if err == nil || tp.Stats.DialErrors.Load() != 1 {
		t.Fatalf("Connect: %v, dial errors %d", err, tp.Stats.DialErrors.Load())
	}
	// Without ALPN h2 the connection is not HTTP/2.
	_, ctls := mustTLS(t)
	ctls.NextProtos = []string{"http/1.1"}
	tp.Dial = func(ctx context.Context, key hbone.Key) (net.Conn, error) {
		d := tls.Dialer{Config: ctls}
		return d.DialContext(ctx, "tcp", key.Addr.String())
	}
	if _, err := tp.Connect(context.Background(), tp.Key, "10.0.0.1:8080", nil); err == nil {
		t.Fatal("Connect over a connection without ALPN h2 succeeded")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := tp.Connect(ctx, tp.Key, "10.0.0.1:8080", nil); !errors.Is(err, context.Canceled) {
		t.Errorf("Connect with cancelled context: %v", err)
	}
}

func TestPoolIdleClose(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv := &hbone.Server{Handler: hold, Stats: new(hbone.Stats)}
		tp := pipePool(t, srv, func(p *hbone.Pool) { p.IdleTimeout = 100 * time.Millisecond })
		s := tp.connect(t)
		time.Sleep(250 * time.Millisecond)
		if n := tp.Stats.IdleCloses.Load(); n != 0 {
			t.Fatalf("a connection with an open stream was closed as idle")
		}
		s.CloseWrite()
		io.ReadAll(s)
		s.Close()
		time.Sleep(100 * time.Millisecond)
		synctest.Wait()
		if n, c := tp.Stats.IdleCloses.Load(), srv.Stats.ConnsClosed.Load(); n != 1 || c != 1 {
			t.Fatalf("IdleTimeout after the last stream: pool idle closes %d, server conns closed %d; want 1, 1", n, c)
		}
		tp.connect(t)
		if d := tp.Dials.Load(); d != 2 {
			t.Errorf("dials = %d, want a new one after the idle close", d)
		}
	})
}

// Shutdown sends GOAWAY: open streams finish, new streams go to a new
// connection, and the old one closes once drained.
func TestGoAwayGraceful(t *testing.T) {
	checkLeaks(t)
	ts := startServer(t, echo)
	tp := newPool(t, ts)
	old := tp.connect(t)

	shut := make(chan error, 1)
	go func() { shut <- ts.Shutdown(context.Background()) }()
	testutil.Eventually(t, "GOAWAY received", func() bool { return tp.Stats.GoAwaysReceived.Load() == 1 })

	// The old stream still works both ways.
	if _, err := old.Write([]byte("still here")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 10)
	if _, err := io.ReadFull(old, buf); err != nil {
		t.Fatalf("stream after GOAWAY: %v", err)
	}
	select {
	case err := <-shut:
		t.Fatalf("Shutdown returned %v with a stream open", err)
	case <-time.After(50 * time.Millisecond):
	}
	old.CloseWrite()
	io.ReadAll(old)
	old.Close()
	if err := <-shut; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	// The server is gone: a new stream needs a new connection and fails.
	if _, err := tp.Connect(context.Background(), tp.Key, "10.0.0.1:8080", nil); err == nil {
		t.Fatal("Connect after server shutdown succeeded")
	}
	if d := tp.Dials.Load(); d != 2 {
		t.Errorf("dials = %d, want 2 (the draining connection is not reused)", d)
	}
}

// Streams the server did not process before its GOAWAY are retried on a
// new connection.
func TestGoAwayRetry(t *testing.T) {
	checkLeaks(t)
	// A server that answers the first HEADERS with GOAWAY(last=0).
	ln, stls := rawListener(t)
	go func() {
		for i := 0; ; i++ {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				tc := tls.Server(nc, stls)
				defer tc.Close()
				fr := newRawServer(t, tc)
				if fr == nil {
					return
				}
				for {
					f, err := fr.ReadFrame()
					if err != nil {
						return
					}
					if _, ok := f.(*http2.HeadersFrame); ok {
						fr.WriteGoAway(0, http2.ErrCodeNo, nil)
						return
					}
				}
			}()
		}
	}()
	tp := newPool(t, &testServer{Addr: ln.Addr().(*net.TCPAddr).AddrPort()})
	_, err := tp.Connect(context.Background(), tp.Key, "10.0.0.1:8080", nil)
	var ge *hbone.GoAwayError
	if !errors.As(err, &ge) || !ge.Remote {
		t.Fatalf("Connect: %v, want GoAwayError", err)
	}
	if d, r := tp.Dials.Load(), tp.Stats.Retries.Load(); d != 3 || r != 2 {
		t.Errorf("dials %d retries %d, want 3 attempts on fresh connections", d, r)
	}
}

// A peer that stops answering PINGs is detected and its connection
// evicted; the next stream dials anew.
func TestKeepaliveTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		tp := pipePool(t, &hbone.Server{Handler: hold}, func(p *hbone.Pool) {
			p.Settings.PingInterval = 20 * time.Millisecond
			p.Settings.PingTimeout = 500 * time.Millisecond
		})
		var silent atomic.Bool
		dial := tp.Dial
		tp.Dial = func(ctx context.Context, key hbone.Key) (net.Conn, error) {
			c, err := dial(ctx, key)
			return silenceable{c, &silent}, err
		}
		s := tp.connect(t)
		time.Sleep(300 * time.Millisecond) // fifteen PINGs, all answered
		if tp.Stats.KeepaliveTimeouts.Load() != 0 {
			t.Fatal("keepalive fired on a live connection")
		}
		silent.Store(true) // the client's frames, PINGs included, vanish
		_, err := s.Read(make([]byte, 1))
		if !errors.Is(err, hbone.ErrKeepaliveTimeout) {
			t.Fatalf("read on a dead connection: %v, want keepalive timeout", err)
		}
		if tp.Stats.KeepaliveTimeouts.Load() != 1 {
			t.Errorf("KeepaliveTimeouts = %d", tp.Stats.KeepaliveTimeouts.Load())
		}
		silent.Store(false)
		tp.connect(t)
		if d := tp.Dials.Load(); d != 2 {
			t.Errorf("dials = %d, want the dead connection evicted", d)
		}
	})
}

// silenceable is a connection whose writes vanish while *silent holds.
type silenceable struct {
	net.Conn
	silent *atomic.Bool
}

func (c silenceable) Write(b []byte) (int, error) {
	if c.silent.Load() {
		return len(b), nil
	}
	return c.Conn.Write(b)
}

// A connection that breaks under a stream fails the stream and is
// replaced.
func TestBrokenConnEvicted(t *testing.T) {
	checkLeaks(t)
	ts := startServer(t, hold)
	tp := newPool(t, ts)
	var raw net.Conn
	dial := tp.Dial
	tp.Dial = func(ctx context.Context, key hbone.Key) (net.Conn, error) {
		c, err := dial(ctx, key)
		raw = c
		return c, err
	}
	s := tp.connect(t)
	raw.(*tls.Conn).NetConn().Close()
	if _, err := s.Read(make([]byte, 1)); err == nil || err == io.EOF {
		t.Fatalf("read on a broken connection: %v", err)
	}
	tp.connect(t)
	if d := tp.Dials.Load(); d != 2 {
		t.Errorf("dials = %d, want 2", d)
	}
}

func TestPoolClose(t *testing.T) {
	checkLeaks(t)
	ts := startServer(t, hold)
	tp := newPool(t, ts)
	s := tp.connect(t)
	if err := tp.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Read(make([]byte, 1)); !errors.Is(err, hbone.ErrPoolClosed) {
		t.Errorf("read after pool Close: %v", err)
	}
	if _, err := tp.Connect(context.Background(), tp.Key, "10.0.0.1:8080", nil); !errors.Is(err, hbone.ErrPoolClosed) {
		t.Errorf("Connect after Close: %v", err)
	}
}

func TestServerClose(t *testing.T) {
	checkLeaks(t)
	serverErr := make(chan error, 1)
	ts := startServer(t, hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, rw hbone.Responder) {
		s, err := rw.Accept()
		if err != nil {
			return
		}
		_, err = io.Copy(io.Discard, s)
		serverErr <- err
	}))
	tp := newPool(t, ts)
	s := tp.connect(t)
	if err := ts.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-serverErr; !errors.Is(err, hbone.ErrServerClosed) {
		t.Errorf("handler's read after Close: %v", err)
	}
	if _, err := s.Read(make([]byte, 1)); err == nil || err == io.EOF {
		t.Errorf("client read after server Close: %v", err)
	}
}

func TestShutdownTimeout(t *testing.T) {
	checkLeaks(t)
	ts := startServer(t, hold)
	tp := newPool(t, ts)
	s := tp.connect(t)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := ts.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown with a stream that never ends: %v", err)
	}
	if _, err := s.Read(make([]byte, 1)); err == nil || err == io.EOF {
		t.Errorf("stream survived the forced close: %v", err)
	}
}
