package proxy

import (
	"errors"
	"log/slog"
	"net"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/amber-mesh/amber/tunnel/sockopt"
	"github.com/amber-mesh/amber/xds/state"
)

// TestNotCapturedReset connects to the outbound and inbound listeners
// directly, as anyone who can reach a node address could when they listen
// on [::] (without the datapath, behind nftables TPROXY): the connection
// is reset at once and counted, not held for WorkloadWait and logged as a
// failed connection.
func TestNotCapturedReset(t *testing.T) {
	mgr := mustCerts(t)
	var logs lockedBuffer
	p, err := New(Config{
		Store: state.NewStore(), Certs: mgr, NodeName: "n1",
		Logger:       slog.New(slog.NewJSONHandler(&logs, nil)),
		Sockets:      sockopt.Options{Mark: -1, NoTransparent: true},
		WorkloadWait: 5 * time.Second, // as tunnel.Run sets it
	})
	if err != nil {
		t.Fatal(err)
	}
	for name, serve := range map[string]func(net.Listener) error{"outbound": p.ServeOutbound, "inbound": p.ServeInbound} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		served := make(chan error, 1)
		go func() { served <- serve(ln) }()
		t.Cleanup(func() {
			if err := <-served; !errors.Is(err, ErrClosed) {
				t.Errorf("%s listener: %v, want ErrClosed", name, err)
			}
		})
		c, err := net.Dial("tcp", ln.Addr().String())
		if err == nil {
			c.SetReadDeadline(time.Now().Add(2 * time.Second))
			_, err = c.Read(make([]byte, 1))
			c.Close()
		}
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("%s: direct connection: %v, want reset at once", name, err)
		}
	}
	t.Cleanup(func() { p.Close() })
	if n := p.Stats().NotCaptured.Load(); n != 2 {
		t.Errorf("NotCaptured = %d, want 2", n)
	}
	if lines := logs.lines(); len(lines) != 0 {
		t.Errorf("access-log lines for connections that were never captured: %v", lines)
	}
}

// TestConnSize: an idle connection holds its conn (record, metrics
// handle, relay pointer) for as long as it lives; a field that pushes it
// past 208 bytes costs every connection the next size class of Go's
// allocator (224).
func TestConnSize(t *testing.T) {
	if size := unsafe.Sizeof(conn{}); size > 208 {
		t.Errorf("conn is %d bytes, want ≤ 208", size)
	}
}
