package e2e

import (
	"context"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/amber-mesh/amber/bpf"
	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/test/meshbed"
)

// TestPrivilegedZtunnelHandover stops a client node's ztunnel with
// SIGTERM under traffic and starts the next one, as a DaemonSet rollout
// does (ARCHITECTURE.md, "Restarts of the ztunnel"): the old ztunnel takes
// its listeners out of the SOCKMAP first and keeps serving the connection
// it has; a new connection meanwhile is dropped at the SYN, not reset,
// and completes through the next ztunnel once it registers; the old one
// exits cleanly when its last connection ends.
func TestPrivilegedZtunnelHandover(t *testing.T) {
	cs, _ := mustClientServerBed(t)
	client, server, node1 := cs.client, cs.server, cs.node1
	meshFile, caDir := mustMeshFiles(t, cs.mesh)
	mustZtunnel(t, cs.node2, meshFile, caDir)
	startEcho(t, server, 8080, 0)
	dst := netip.AddrPortFrom(server.IPv4, 8080)

	// The ztunnel under test drains for up to a minute: the test ends its
	// drain by closing the connection.
	oldLog := &syncBuffer{}
	old, err := meshbed.StartZtunnel(node1, ztunnelBin, meshFile, caDir, oldLog, "-drain-timeout", "1m")
	if err != nil {
		t.Fatalf("%v\n%s", err, oldLog)
	}
	t.Cleanup(func() {
		if exited, _ := old.Exited(); !exited {
			old.Stop()
		}
		if t.Failed() {
			t.Logf("old ztunnel log:\n%s", oldLog)
		}
	})
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	var c1 net.Conn
	if err := client.Do(func() (err error) { c1, err = dialNoMPTCP(ctx, dst); return err }); err != nil {
		t.Fatal(err)
	}
	defer c1.Close()
	mustRoundTrip(t, c1, "before the signal")

	if err := old.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, "the old ztunnel's listeners out of the SOCKMAP", func() bool {
		slots, err := listenerSlots(node1.Root)
		return err == nil && !slices.ContainsFunc(slots, func(s bpf.ListenerSlot) bool { return s.Registered })
	})
	mustRoundTrip(t, c1, "while draining")
	if exited, err := old.Exited(); exited {
		t.Fatalf("old ztunnel exited (%v) with a connection to drain", err)
	}

	// A new connection finds no listener: its SYN is dropped, and
	// retransmitted until the next ztunnel registers.
	before, err := node1.DP.Counters()
	if err != nil {
		t.Fatal(err)
	}
	dialed := make(chan error, 1)
	var c2 net.Conn
	go func() {
		dialed <- client.Do(func() (err error) { c2, err = dialNoMPTCP(ctx, dst); return err })
	}()
	testutil.Eventually(t, "the new connection's SYN dropped for want of a listener", func() bool {
		c, err := node1.DP.Counters()
		return err == nil && c["drop_no_listener"] > before["drop_no_listener"]
	})
	select {
	case err := <-dialed:
		t.Fatalf("connection without a registered ztunnel: %v", err)
	default:
	}

	c1.Close()
	testutil.Eventually(t, "the old ztunnel to exit once drained", func() bool {
		exited, _ := old.Exited()
		return exited
	})
	if _, err := old.Exited(); err != nil {
		t.Errorf("old ztunnel: %v", err)
	}
	if !strings.Contains(oldLog.String(), `"msg":"drained"`) {
		t.Errorf("old ztunnel did not log a complete drain")
	}

	mustZtunnel(t, node1, meshFile, caDir)
	if err := <-dialed; err != nil {
		t.Fatalf("new connection after the handover: %v", err)
	}
	defer c2.Close()
	mustRoundTrip(t, c2, "through the next ztunnel")
}

func dialNoMPTCP(ctx context.Context, dst netip.AddrPort) (net.Conn, error) {
	var d net.Dialer
	d.SetMultipathTCP(false)
	return d.DialContext(ctx, "tcp", dst.String())
}

// mustRoundTrip writes msg on c and reads it back from the echo server.
func mustRoundTrip(tb testing.TB, c net.Conn, msg string) {
	tb.Helper()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := io.WriteString(c, msg); err != nil {
		tb.Fatalf("write %q: %v", msg, err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
		tb.Fatalf("echo of %q: %q, %v", msg, buf, err)
	}
}

func listenerSlots(root string) ([]bpf.ListenerSlot, error) {
	ls, err := bpf.OpenListeners(root)
	if err != nil {
		return nil, err
	}
	defer ls.Close()
	return ls.Slots()
}
