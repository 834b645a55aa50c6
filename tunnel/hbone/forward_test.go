package hbone_test

import (
	"context"
	"errors"
	"io"
	"net"
	"runtime"
	"testing"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/tunnel/hbone"
)

type forwardResult struct {
	n   int64
	err error
}

// startForwarder serves CONNECTs by forwarding each stream to a new TCP
// connection it returns on conns, from a detached stream, the handler
// returning at once. Forward's results arrive on results.
func startForwarder(t *testing.T) (tp *testPool, conns chan net.Conn, results chan forwardResult, streams chan *hbone.Stream) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	conns = make(chan net.Conn, 4)
	results = make(chan forwardResult, 4)
	streams = make(chan *hbone.Stream, 4)
	ts := startServer(t, hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, rw hbone.Responder) {
		up, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			rw.Reject(503, err.Error())
			return
		}
		peer, err := ln.Accept()
		if err != nil {
			up.Close()
			rw.Reject(503, err.Error())
			return
		}
		s, err := rw.Accept()
		if err != nil {
			up.Close()
			peer.Close()
			return
		}
		if !hbone.Detach(s) {
			t.Error("Detach refused a server stream")
		}
		hbone.Forward(s, up, forwardFunc(func(n int64, err error) {
			up.(*net.TCPConn).CloseWrite()
			results <- forwardResult{n, err}
		}))
		conns <- peer
		streams <- s
	}))
	return newPool(t, ts), conns, results, streams
}

// forwardFunc adapts a function to hbone.ForwardDone.
type forwardFunc func(int64, error)

func (f forwardFunc) ForwardDone(n int64, err error) { f(n, err) }

// TestForward: data and the half-close reach the socket, and while the
// stream idles neither its handler nor the copy holds a goroutine.
func TestForward(t *testing.T) {
	checkLeaks(t)
	tp, conns, results, streams := startForwarder(t)
	tp.connect(t).Close() // the connection's own goroutines are not the stream's
	<-conns
	(<-streams).Close()
	<-results
	base := runtime.NumGoroutine()

	s := tp.connect(t)
	peer := <-conns
	defer peer.Close()
	up := <-streams
	defer up.Close()
	if hbone.Detach(s) {
		t.Error("Detach took a client stream")
	}
	for _, msg := range []string{"hello", "again"} {
		if _, err := s.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, len(msg))
		if _, err := io.ReadFull(peer, buf); err != nil || string(buf) != msg {
			t.Fatalf("read %q, %v; want %q", buf, err, msg)
		}
		testutil.Eventually(t, "an idle forwarded stream to hold no goroutine", func() bool {
			return runtime.NumGoroutine() <= base
		})
	}
	if err := s.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if rest, err := io.ReadAll(peer); err != nil || len(rest) != 0 {
		t.Fatalf("after CloseWrite read %q, %v; want EOF", rest, err)
	}
	if r := <-results; r.err != nil || r.n != 10 {
		t.Fatalf("Forward ended with %d, %v; want 10, nil", r.n, r.err)
	}
}

// TestForwardClose: closing an idle forwarded stream ends the copy.
func TestForwardClose(t *testing.T) {
	checkLeaks(t)
	tp, conns, results, streams := startForwarder(t)
	s := tp.connect(t)
	peer := <-conns
	defer peer.Close()
	up := <-streams
	s.Write([]byte("x"))
	io.ReadFull(peer, make([]byte, 1))
	up.Close()
	if r := <-results; !errors.Is(r.err, net.ErrClosed) || r.n != 1 {
		t.Fatalf("Forward ended with %d, %v; want 1, net.ErrClosed", r.n, r.err)
	}
}

// TestRelease: a handler that releases its accepted stream has its part
// ended at once — its context is cancelled — and goes on tunnelling the
// stream on its own goroutine.
func TestRelease(t *testing.T) {
	checkLeaks(t)
	cancelled := make(chan bool, 1)
	ts := startServer(t, hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, rw hbone.Responder) {
		s, err := rw.Accept()
		if err != nil {
			return
		}
		if !hbone.Release(s) || !hbone.Release(s) {
			t.Error("Release refused a server stream")
		}
		select {
		case <-ctx.Done():
			cancelled <- true
		default:
			cancelled <- false
		}
		// The handler's goroutine is the relay's now: echo, then close.
		io.Copy(s, s)
		s.CloseWrite()
		s.Close()
	}))
	tp := newPool(t, ts)
	s := tp.connect(t)
	defer s.Close()
	if hbone.Release(s) {
		t.Error("Release took a client stream")
	}
	if !<-cancelled {
		t.Error("the handler's context is live after Release")
	}
	if _, err := s.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	if err := s.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(s)
	if err != nil || string(got) != "hello" {
		t.Fatalf("echo %q, %v", got, err)
	}
}
