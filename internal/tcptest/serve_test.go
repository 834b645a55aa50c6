package tcptest

import (
	"io"
	"net"
	"runtime"
	"testing"

	"github.com/amber-mesh/amber/internal/testutil"
)

// Serve echoes through its handler, and when the test ends it closes the
// listener and a connection the handler is still blocked on, leaving no
// goroutine behind.
func TestServeClosesEverythingWhenTheTestEnds(t *testing.T) {
	base := runtime.NumGoroutine()
	var addr string
	var held net.Conn
	t.Run("serve", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr = ln.Addr().String()
		Serve(t, ln, func(c net.Conn) { io.Copy(c, c) })
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		held = c
		if _, err := c.Write([]byte("ping")); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 4)
		if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping" {
			t.Fatalf("echo: %q, %v", buf, err)
		}
	})
	defer held.Close()
	// The handler's connection was closed by the cleanup: the client sees EOF.
	if n, err := held.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("read after the test ended: %d, %v; want EOF", n, err)
	}
	if _, err := net.Dial("tcp", addr); err == nil {
		t.Fatal("listener still accepting after the test ended")
	}
	// wg.Done runs a moment before a handler's goroutine is gone.
	testutil.Eventually(t, "no goroutine left by Serve", func() bool { return runtime.NumGoroutine() <= base })
}
