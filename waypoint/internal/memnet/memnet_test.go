package memnet

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"testing"
	"testing/synctest"
	"time"
)

var (
	lo  = netip.MustParseAddr("127.0.0.1")
	dst = netip.MustParseAddrPort("127.0.0.1:8080")
)

func pair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	var n Network
	l, err := n.Listen(dst)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	c, err := n.Dial(context.Background(), lo, dst)
	if err != nil {
		t.Fatal(err)
	}
	s, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c, s
}

// TestBufferedHalfClose: both ends may write before either reads (what
// TLS 1.3 does after its handshake), and a half-close delivers what was
// written, then io.EOF, while the other direction stays open.
func TestBufferedHalfClose(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, s := pair(t)
		if s.RemoteAddr().(*net.TCPAddr).AddrPort().Addr() != lo || s.LocalAddr().String() != dst.String() {
			t.Errorf("addresses %v → %v", s.RemoteAddr(), s.LocalAddr())
		}
		if _, err := io.WriteString(c, "ping"); err != nil {
			t.Fatal(err)
		}
		if _, err := io.WriteString(s, "pong"); err != nil {
			t.Fatal(err)
		}
		c.(*Conn).CloseWrite()
		if b, err := io.ReadAll(s); err != nil || string(b) != "ping" {
			t.Errorf("server read %q %v", b, err)
		}
		io.WriteString(s, "!")
		s.Close()
		if b, err := io.ReadAll(c); err != nil || string(b) != "pong!" {
			t.Errorf("client read %q %v", b, err)
		}
		if _, err := io.WriteString(c, "x"); err == nil {
			t.Error("write after CloseWrite succeeded")
		}
	})
}

// TestDeadlines: a read waits exactly until its deadline; Close ends a
// waiting read; a full buffer makes a write wait for its deadline.
func TestDeadlines(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, s := pair(t)
		start := time.Now()
		s.SetReadDeadline(start.Add(time.Second))
		if _, err := s.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) || time.Since(start) != time.Second {
			t.Errorf("read: %v after %v, want a deadline error after 1s", err, time.Since(start))
		}
		s.SetReadDeadline(time.Time{})
		done := make(chan error)
		go func() { _, err := s.Read(make([]byte, 1)); done <- err }()
		synctest.Wait()
		s.Close()
		if err := <-done; !errors.Is(err, net.ErrClosed) {
			t.Errorf("read after Close: %v", err)
		}

		if _, err := c.Write([]byte("x")); err == nil {
			t.Error("write to a closed peer succeeded")
		}

		c, _ = pair(t)
		start = time.Now()
		c.SetWriteDeadline(start.Add(time.Second))
		if n, err := c.Write(make([]byte, 2*bufSize)); n != bufSize || !errors.Is(err, os.ErrDeadlineExceeded) || time.Since(start) != time.Second {
			t.Errorf("write to a peer not reading: %d, %v after %v; want %d, a deadline error after 1s", n, err, time.Since(start), bufSize)
		}
	})
}

// TestRefused: a dial to no listener, or one closed, is refused.
func TestRefused(t *testing.T) {
	var n Network
	if _, err := n.Dial(context.Background(), lo, dst); err == nil {
		t.Error("dial without a listener succeeded")
	}
	l, _ := n.Listen(netip.AddrPortFrom(lo, 0))
	l.Close()
	if _, err := n.Dial(context.Background(), lo, l.AddrPort()); err == nil {
		t.Error("dial to a closed listener succeeded")
	}
	if _, err := l.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("accept after close: %v", err)
	}
}
