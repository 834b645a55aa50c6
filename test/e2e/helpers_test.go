package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/amber-mesh/amber/internal/tcptest"
	"github.com/amber-mesh/amber/test/meshbed"
	"github.com/amber-mesh/amber/test/promtext"
	"github.com/amber-mesh/amber/test/testbed"
)

// syncBuffer is a bytes.Buffer safe for a process writing while the test
// reads.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// ztunnel is a running amber-ztunnel process in a node's namespace.
type ztunnel struct {
	*meshbed.Ztunnel
	log *syncBuffer
}

// mustZtunnel starts amber-ztunnel on nd in local mode and waits until it
// reports ready; it is stopped with SIGTERM when the test ends.
func mustZtunnel(tb testing.TB, nd *meshbed.Node, meshFile, caDir string) *ztunnel {
	tb.Helper()
	log := &syncBuffer{}
	z, err := meshbed.StartZtunnel(nd, ztunnelBin, meshFile, caDir, log)
	if err != nil {
		tb.Fatalf("%v\n%s", err, log)
	}
	tb.Cleanup(func() {
		if err := z.Stop(); err != nil {
			tb.Errorf("ztunnel on %s: %v\n%s", nd.Name, err, log)
		}
		if tb.Failed() {
			tb.Logf("ztunnel %s log:\n%s", nd.Name, log)
		}
	})
	return &ztunnel{Ztunnel: z, log: log}
}

func (z *ztunnel) get(port int, path string) (int, string, error) { return z.Get(port, path) }

// metric returns the sum of the samples of name whose labels include
// every one of want, or -1 when there is none.
func (z *ztunnel) metric(tb testing.TB, name string, want map[string]string) float64 {
	tb.Helper()
	_, body, err := z.get(15020, "/stats/prometheus")
	if err != nil {
		tb.Fatal(err)
	}
	ss, err := promtext.Parse(strings.NewReader(body), name)
	if err != nil {
		tb.Fatal(err)
	}
	sum, found := 0.0, false
	for _, s := range ss {
		if s.Matches(want) {
			sum, found = sum+s.Value, true
		}
	}
	if !found {
		return -1
	}
	return sum
}

// accessLogs returns the ztunnel's access-log lines that contain every
// one of want (attribute key → value).
func (z *ztunnel) accessLogs(want map[string]string) []map[string]any {
	var out []map[string]any
	for _, line := range strings.Split(z.log.String(), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) != nil || m["msg"] != "connection complete" {
			continue
		}
		ok := true
		for k, v := range want {
			if s, _ := m[k].(string); !strings.Contains(s, v) {
				ok = false
			}
		}
		if ok {
			out = append(out, m)
		}
	}
	return out
}

// echoServer listens in a pod (or a node), serves each connection, and
// reports each peer address.
type echoServer struct {
	peers chan netip.AddrPort
}

// listenerIn is a pod or a node.
type listenerIn interface {
	Listen(network, address string) (net.Listener, error)
}

// mustEcho echoes on port in l; a connection gives up after 10 s.
func mustEcho(tb testing.TB, l listenerIn, port int) *echoServer {
	return startEcho(tb, l, port, 10*time.Second)
}

// startEcho runs an echo server on port in l. Each connection is closed
// after timeout (0: when the client closes it), and any still open when
// the test ends.
func startEcho(tb testing.TB, l listenerIn, port int, timeout time.Duration) *echoServer {
	tb.Helper()
	return startServer(tb, l, port, func(c net.Conn) {
		if timeout > 0 {
			c.SetDeadline(time.Now().Add(timeout))
		}
		io.Copy(c, c)
	})
}

// startGreeter runs a server on port in l that writes greeting and closes
// the connection: the server closes first, as HTTP/1.0 or `Connection:
// close` servers do.
func startGreeter(tb testing.TB, l listenerIn, port int, greeting string) *echoServer {
	tb.Helper()
	return startServer(tb, l, port, func(c net.Conn) {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(c, greeting)
	})
}

// startServer accepts on port in l and runs handle on each connection,
// closing it when handle returns; connections still open when the test
// ends are closed.
func startServer(tb testing.TB, l listenerIn, port int, handle func(net.Conn)) *echoServer {
	tb.Helper()
	ln, err := l.Listen("tcp", fmt.Sprintf("[::]:%d", port))
	if err != nil {
		tb.Fatal(err)
	}
	s := &echoServer{peers: make(chan netip.AddrPort, 64)}
	tcptest.Serve(tb, ln, func(c net.Conn) {
		ap := c.RemoteAddr().(*net.TCPAddr).AddrPort()
		select {
		case s.peers <- netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()):
		default:
		}
		handle(c)
	})
	return s
}

func (s *echoServer) lastPeer(tb testing.TB) netip.AddrPort {
	tb.Helper()
	select {
	case p := <-s.peers:
		return p
	case <-time.After(2 * time.Second):
		tb.Fatal("server saw no connection")
	}
	return netip.AddrPort{}
}

// echoConn dials addr from a pod, sends msg and reads it echoed back, and
// returns the connection, still open, with a 5 s deadline.
func echoConn(tb testing.TB, p *testbed.Pod, addr netip.AddrPort, msg string) net.Conn {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := p.Dial(ctx, "tcp", addr.String())
	if err != nil {
		tb.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, len(msg))
	if _, err := c.Write([]byte(msg)); err == nil {
		_, err = io.ReadFull(c, buf)
	}
	if err != nil {
		c.Close()
		tb.Fatalf("echo of %q through %s: %v", msg, addr, err)
	}
	return c
}

// roundTrip dials addr from a pod, sends msg and expects it echoed.
func roundTrip(p *testbed.Pod, addr netip.AddrPort, msg string) error {
	return roundTripWithin(p, addr, msg, 5*time.Second)
}

// roundTripWithin is roundTrip, all of it within d.
func roundTripWithin(p *testbed.Pod, addr netip.AddrPort, msg string, d time.Duration) error {
	deadline := time.Now().Add(d)
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	c, err := p.Dial(ctx, "tcp", addr.String())
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(deadline)
	if _, err := c.Write([]byte(msg)); err != nil {
		return err
	}
	// Half-close: the echo must still come back (TCP semantics through
	// both tunnels).
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		return err
	}
	got, err := io.ReadAll(c)
	if err != nil {
		return err
	}
	if string(got) != msg {
		return fmt.Errorf("echo %q, want %q", got, msg)
	}
	return nil
}
