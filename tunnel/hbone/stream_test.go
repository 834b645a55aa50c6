package hbone_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"testing"
	"testing/synctest"
	"time"

	"golang.org/x/net/http2"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/tunnel/hbone"
)

func TestEcho(t *testing.T) {
	checkLeaks(t)
	var got *hbone.Request
	reqs := make(chan *hbone.Request, 1)
	ts := startServer(t, hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, rw hbone.Responder) {
		reqs <- req
		echo(ctx, req, rw)
	}))
	tp := newPool(t, ts)
	hdr := http.Header{"Forwarded": {`for="10.0.0.2:4000"`}, "Baggage": {"k8s.namespace.name=a"}}
	s, err := tp.Connect(context.Background(), tp.Key, "10.0.0.1:8080", hdr)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	got = <-reqs
	if got.Method != "CONNECT" || got.Authority != "10.0.0.1:8080" || got.Addr != netip.MustParseAddrPort("10.0.0.1:8080") {
		t.Errorf("request = %+v", got)
	}
	if got.Header.Get("Forwarded") != `for="10.0.0.2:4000"` || got.Header.Get("Baggage") != "k8s.namespace.name=a" {
		t.Errorf("headers = %v", got.Header)
	}
	if got.Conn.LocalAddr().String() != ts.Addr.String() {
		t.Errorf("Request.Conn.LocalAddr = %v, want %v", got.Conn.LocalAddr(), ts.Addr)
	}
	if _, err := s.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(s, buf); err != nil || string(buf) != "hello" {
		t.Fatalf("read %q, %v", buf, err)
	}
	if err := s.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if n, err := s.Read(buf); n != 0 || err != io.EOF {
		t.Fatalf("read after peer's END_STREAM = %d, %v; want EOF", n, err)
	}
	if _, err := s.Write([]byte("x")); !errors.Is(err, hbone.ErrWriteAfterCloseWrite) {
		t.Errorf("write after CloseWrite: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("close: %v", err)
	}
	testutil.Eventually(t, "server stream counted", func() bool { return ts.Stats.StreamsOpened.Load() == 1 })
	if n := ts.Stats.StreamsReset.Load() + tp.Stats.StreamsReset.Load(); n != 0 {
		t.Errorf("a clean close reset %d streams", n)
	}
}

// The server finishes first while the client is still sending: the
// client must read the server's data and EOF, keep sending, and the
// server must receive everything. An x/net/http2 server cannot do this.
func TestHalfCloseServerFirst(t *testing.T) {
	checkLeaks(t)
	const clientBytes = 8 << 20
	received := make(chan int64, 1)
	ts := startServer(t, hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, rw hbone.Responder) {
		s, err := rw.Accept()
		if err != nil {
			return
		}
		if _, err := s.Write([]byte("bye")); err != nil {
			t.Error(err)
		}
		if err := s.CloseWrite(); err != nil {
			t.Error(err)
		}
		n, err := io.Copy(io.Discard, s)
		if err != nil {
			t.Error(err)
		}
		received <- n
	}))
	tp := newPool(t, ts)
	s := tp.connect(t)
	if got := readAllString(t, s); got != "bye" {
		t.Fatalf("client read %q before EOF", got)
	}
	// The server's side is done; ours is still open.
	if _, err := s.Write(make([]byte, clientBytes)); err != nil {
		t.Fatalf("write after peer's END_STREAM: %v", err)
	}
	if err := s.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if n := <-received; n != clientBytes {
		t.Fatalf("server received %d bytes, want %d", n, clientBytes)
	}
}

// The client half-closes and then reads the rest of the answer.
func TestHalfCloseClientFirst(t *testing.T) {
	checkLeaks(t)
	ts := startServer(t, hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, rw hbone.Responder) {
		s, err := rw.Accept()
		if err != nil {
			return
		}
		data, err := io.ReadAll(s)
		if err != nil {
			t.Error(err)
			return
		}
		// Answer only after the client's END_STREAM, like a server that
		// reads a whole request first.
		sum := sha256.Sum256(data)
		for range 1000 {
			if _, err := s.Write(sum[:]); err != nil {
				t.Error(err)
				return
			}
		}
		s.CloseWrite()
	}))
	tp := newPool(t, ts)
	s := tp.connect(t)
	data := make([]byte, 1<<20)
	for i := range data {
		data[i] = byte(i)
	}
	if _, err := s.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := s.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(s)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(data)
	if want := bytes.Repeat(sum[:], 1000); !bytes.Equal(got, want) {
		t.Fatalf("got %d bytes, want %d bytes of digests", len(got), len(want))
	}
}

func TestBigTransfer(t *testing.T) {
	for _, tc := range []struct {
		name     string
		settings hbone.Settings
		plainTLS bool
	}{
		{"default windows", hbone.Settings{}, false},
		{"client with plain tls.Client", hbone.Settings{}, true},
		// Windows far smaller than the transfer and than a frame: every
		// byte waits for WINDOW_UPDATEs.
		{"small windows", hbone.Settings{StreamWindow: 20 << 10, ConnWindow: 70 << 10, MaxFrameSize: 16 << 10}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkLeaks(t)
			ts := startServer(t, echo, func(s *hbone.Server) { s.Settings = tc.settings })
			tp := newPool(t, ts, func(p *hbone.Pool) { p.Settings = tc.settings })
			tp.plainTLS = tc.plainTLS
			const size = 48 << 20
			const streams = 3
			errs := make(chan error, streams)
			for i := range streams {
				go func() { errs <- transfer(tp, size/streams, uint64(i)) }()
			}
			for range streams {
				if err := <-errs; err != nil {
					t.Error(err)
				}
			}
		})
	}
}

// transfer sends n pseudo-random bytes through an echo stream while
// reading them back, and compares digests.
func transfer(tp *testPool, n int64, seed uint64) error {
	s, err := tp.Connect(context.Background(), tp.Key, "10.0.0.1:8080", nil)
	if err != nil {
		return err
	}
	defer s.Close()
	src := io.LimitReader(rand.NewChaCha8([32]byte{byte(seed)}), n)
	sent := sha256.New()
	errc := make(chan error, 1)
	go func() {
		_, err := io.Copy(s, io.TeeReader(src, sent))
		if err == nil {
			err = s.CloseWrite()
		}
		errc <- err
	}()
	recv := sha256.New()
	got, err := io.Copy(recv, s)
	if err != nil {
		return err
	}
	if err := <-errc; err != nil {
		return err
	}
	if got != n || !bytes.Equal(sent.Sum(nil), recv.Sum(nil)) {
		return errors.New("echoed data differs")
	}
	return nil
}

func TestStatusErrors(t *testing.T) {
	checkLeaks(t)
	ts := startServer(t, hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, rw hbone.Responder) {
		switch req.Addr.Port() {
		case 401:
			rw.Reject(http.StatusUnauthorized, "denied by policy")
		case 503:
			rw.Reject(http.StatusServiceUnavailable, "upstream refused")
		default:
			// Never answering is a handler bug: the stream is reset.
		}
	}))
	tp := newPool(t, ts)
	for _, code := range []int{401, 503} {
		_, err := tp.Connect(context.Background(), tp.Key, "10.0.0.1:"+itoa(code), nil)
		var se *hbone.StatusError
		if !errors.As(err, &se) || se.Code != code {
			t.Errorf("Connect to port %d: %v, want StatusError %d", code, err, code)
		}
	}
	_, err := tp.Connect(context.Background(), tp.Key, "10.0.0.1:1", nil)
	var rst *hbone.StreamError
	if !errors.As(err, &rst) || rst.Code != http2.ErrCodeInternal || !rst.Remote {
		t.Errorf("Connect to a handler that never answers: %v, want reset INTERNAL_ERROR", err)
	}
	if ts.Stats.StreamsRejected.Load() != 2 || tp.Stats.StreamsRejected.Load() != 2 {
		t.Errorf("rejected: server %d, client %d; want 2", ts.Stats.StreamsRejected.Load(), tp.Stats.StreamsRejected.Load())
	}
	// The connection stays usable.
	if tp.Dials.Load() != 1 {
		t.Errorf("dials = %d, want 1", tp.Dials.Load())
	}
}

func itoa(i int) string { return netip.AddrPortFrom(netip.IPv4Unspecified(), uint16(i)).String()[8:] }

func TestCloseResetsPeer(t *testing.T) {
	checkLeaks(t)
	serverErr := make(chan error, 1)
	ts := startServer(t, hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, rw hbone.Responder) {
		s, err := rw.Accept()
		if err != nil {
			return
		}
		_, err = io.Copy(io.Discard, s)
		serverErr <- err
		<-ctx.Done() // the reset cancels the handler's context
	}))
	tp := newPool(t, ts)
	s := tp.connect(t)
	if _, err := s.Write([]byte("partial")); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	var rst *hbone.StreamError
	if err := <-serverErr; !errors.As(err, &rst) || rst.Code != http2.ErrCodeCancel || !rst.Remote {
		t.Fatalf("server read: %v, want reset CANCEL", err)
	}
	if _, err := s.Read(make([]byte, 1)); !errors.Is(err, net.ErrClosed) {
		t.Errorf("read after Close: %v", err)
	}
	if err := s.Close(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("second Close: %v", err)
	}
}

func TestDeadlines(t *testing.T) {
	checkLeaks(t)
	release := make(chan struct{})
	ts := startServer(t, hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, rw hbone.Responder) {
		s, err := rw.Accept()
		if err != nil {
			return
		}
		<-release // neither reads nor writes: windows fill up
		s.Close()
	}))
	defer close(release)
	tp := newPool(t, ts, func(p *hbone.Pool) { p.Settings.StreamWindow = 64 << 10 })
	s := tp.connect(t)

	s.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	start := time.Now()
	_, err := s.Read(make([]byte, 1))
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read past deadline: %v", err)
	}
	if d := time.Since(start); d < 40*time.Millisecond || d > 2*time.Second {
		t.Errorf("read deadline fired after %v", d)
	}
	// A cleared deadline lets reads block again; a past one fails at once.
	s.SetReadDeadline(time.Time{})
	s.SetReadDeadline(time.Now().Add(-time.Second))
	if _, err := s.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read with past deadline: %v", err)
	}

	// Within the server's 4 MiB window a write completes though the
	// server does not read; past it Write blocks until the deadline and
	// reports what it sent. (How much fits in 200 ms depends on the
	// machine's load: zero is possible and not a fault.)
	if _, err := s.Write(make([]byte, 32<<10)); err != nil {
		t.Fatalf("write within the window: %v", err)
	}
	s.SetWriteDeadline(time.Now().Add(200 * time.Millisecond))
	n, err := s.Write(make([]byte, 16<<20))
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("write past deadline: %d, %v", n, err)
	}
	if n >= 16<<20-32<<10 {
		t.Errorf("wrote %d bytes before the deadline into a window of 4 MiB", n)
	}
}

// ServeConn serves an established connection: here plain TCP, as an
// in-process shortcut or test would hand it over. Cancelling its context
// ends the connection.
func TestServeConn(t *testing.T) {
	checkLeaks(t)
	srv := &hbone.Server{Handler: echo}
	defer srv.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	served := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			served <- err
			return
		}
		served <- srv.ServeConn(ctx, c)
	}()
	tp := &testPool{Pool: &hbone.Pool{Dial: func(ctx context.Context, key hbone.Key) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", ln.Addr().String())
	}}}
	defer tp.Close()
	s := tp.connect(t)
	if _, err := s.Write([]byte("plain")); err != nil {
		t.Fatal(err)
	}
	s.CloseWrite()
	if got := readAllString(t, s); got != "plain" {
		t.Fatalf("echo = %q", got)
	}
	s2 := tp.connect(t)
	cancel()
	if err := <-served; !errors.Is(err, context.Canceled) {
		t.Errorf("ServeConn after cancel: %v", err)
	}
	if _, err := s2.Read(make([]byte, 1)); err == nil || err == io.EOF {
		t.Errorf("stream read after the server side was cancelled: %v", err)
	}
}

// TestCloseLinger: a handler that ends its stream with CloseLinger
// returns at once; the client reads everything it was sent and the end,
// is not reset while it still sends (what it sends is discarded), and
// once it ends its side the stream leaves the connection cleanly: a
// graceful shutdown then has nothing to wait for.
func TestCloseLinger(t *testing.T) {
	checkLeaks(t)
	returned := make(chan error, 1)
	ts := startServer(t, hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, rw hbone.Responder) {
		s, err := rw.Accept()
		if err != nil {
			returned <- err
			return
		}
		io.WriteString(s, "last words")
		returned <- s.CloseLinger(time.Hour)
	}))
	tp := newPool(t, ts)
	s := tp.connect(t)
	if err := <-returned; err != nil {
		t.Fatalf("CloseLinger: %v", err)
	}
	if got := readAllString(t, s); got != "last words" {
		t.Fatalf("read %q, want everything before the end", got)
	}
	for range 3 {
		if _, err := s.Write(make([]byte, 32<<10)); err != nil {
			t.Fatalf("write to a lingering stream: %v", err)
		}
	}
	if err := s.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := ts.Shutdown(ctx); err != nil {
		t.Errorf("Shutdown: %v: the stream is still there after both sides ended", err)
	}
	if n := tp.Stats.StreamsReset.Load(); n != 0 {
		t.Errorf("the client saw %d resets", n)
	}
}

// TestCloseLingerTimeout: a peer that never ends its side is reset after
// the linger timeout, not before.
func TestCloseLingerTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv := &hbone.Server{Handler: hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, rw hbone.Responder) {
			s, err := rw.Accept()
			if err != nil {
				return
			}
			io.WriteString(s, "bye")
			s.CloseLinger(2 * time.Second)
		})}
		a, b := net.Pipe()
		ctx, cancel := context.WithCancel(context.Background())
		served := make(chan error, 1)
		go func() { served <- srv.ServeConn(ctx, a) }()
		pool := &hbone.Pool{Dial: func(context.Context, hbone.Key) (net.Conn, error) { return b, nil }}
		s, err := pool.Connect(context.Background(), hbone.Key{Addr: netip.MustParseAddrPort("10.0.0.2:15008")}, "10.0.0.1:80", nil)
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		if got := readAllString(t, s); got != "bye" {
			t.Fatalf("read %q", got)
		}
		time.Sleep(2*time.Second - time.Nanosecond - time.Since(start))
		synctest.Wait()
		if _, err := s.Write([]byte("still talking")); err != nil {
			t.Fatalf("write before the linger timeout: %v", err)
		}
		time.Sleep(time.Nanosecond)
		synctest.Wait()
		var se *hbone.StreamError
		if _, err := s.Write([]byte("x")); !errors.As(err, &se) || se.Code != http2.ErrCodeCancel || !se.Remote {
			t.Errorf("write after the linger timeout: %v, want the peer's reset (CANCEL)", err)
		}
		s.Close()
		pool.Close()
		cancel()
		<-served
		srv.Close()
	})
}
