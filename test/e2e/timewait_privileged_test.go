package e2e

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/test/meshbed"
	"github.com/amber-mesh/amber/test/testbed"
	"github.com/amber-mesh/amber/tunnel/ca"
)

// mustLocalMesh writes mesh as the local-mode mesh file, with a CA the
// nodes share, and starts a ztunnel on each node.
func mustLocalMesh(t *testing.T, mesh string, nodes ...*meshbed.Node) []*ztunnel {
	t.Helper()
	meshFile, caDir := mustMeshFiles(t, mesh)
	var zs []*ztunnel
	for _, nd := range nodes {
		zs = append(zs, mustZtunnel(t, nd, meshFile, caDir))
	}
	return zs
}

// mustMeshFiles writes mesh as the local-mode mesh file and creates a
// local CA, and returns their paths.
func mustMeshFiles(t *testing.T, mesh string) (meshFile, caDir string) {
	t.Helper()
	dir := t.TempDir()
	caDir = filepath.Join(dir, "ca")
	if _, err := ca.OpenLocal(caDir, "cluster.local"); err != nil {
		t.Fatal(err)
	}
	meshFile = filepath.Join(dir, "mesh.yaml")
	if err := os.WriteFile(meshFile, []byte(mesh), 0o644); err != nil {
		t.Fatal(err)
	}
	return meshFile, caDir
}

// clientServer is two nodes with the datapath: a captured client pod on
// n1, a captured server pod on n2, both in mesh.
type clientServer struct {
	n1, n2         *testbed.Node
	node1, node2   *meshbed.Node
	client, server *testbed.Pod
	mesh           string // the local-mode mesh file naming both pods
}

const greeting = "hello from the server"

// mustClientServer builds a clientServer with a ztunnel on each node and,
// on the server pod, a server that closes first (port 9090); more
// (uncaptured) pods named extra are added to n1 first.
func mustClientServer(t *testing.T, extra ...string) (*clientServer, map[string]*testbed.Pod) {
	t.Helper()
	cs, pods := mustClientServerBed(t, extra...)
	mustLocalMesh(t, cs.mesh, cs.node1, cs.node2)
	startGreeter(t, cs.server, 9090, greeting)
	return cs, pods
}

// mustClientServerBed builds a clientServer without ztunnels or servers.
func mustClientServerBed(t *testing.T, extra ...string) (*clientServer, map[string]*testbed.Pod) {
	t.Helper()
	cs := &clientServer{}
	cs.n1, cs.n2 = testbed.MustTwoNodes(t)
	var err error
	pods := map[string]*testbed.Pod{}
	for _, name := range extra {
		if pods[name], err = cs.n1.AddPod(name); err != nil {
			t.Fatal(err)
		}
	}
	if cs.client, err = cs.n1.AddPod("client"); err != nil {
		t.Fatal(err)
	}
	if cs.server, err = cs.n2.AddPod("server"); err != nil {
		t.Fatal(err)
	}
	cs.node1, cs.node2 = meshbed.MustLoadDatapath(t, cs.n1, "amber-e2e"), meshbed.MustLoadDatapath(t, cs.n2, "amber-e2e")
	cs.node1.MustCapture(t, cs.client)
	cs.node2.MustCapture(t, cs.server)
	cs.mesh = meshbed.MeshYAML([]meshbed.Workload{
		{Name: "client", ServiceAccount: "client", Pod: cs.client, HBONE: true},
		{Name: "server", ServiceAccount: "server", Pod: cs.server, HBONE: true},
	}, "")
	return cs, pods
}

// namespaced is a pod or a node: where a socket is created.
type namespaced interface {
	Do(fn func() error) error
}

// dialFrom connects from src (the port bound with SO_REUSEADDR, as a
// client reusing its port does) to dst, from inside ns.
func dialFrom(ctx context.Context, ns namespaced, src, dst netip.AddrPort) (net.Conn, error) {
	d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(src), Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1) })
		return errors.Join(err, serr)
	}}
	d.SetMultipathTCP(false)
	var c net.Conn
	err := ns.Do(func() (err error) {
		c, err = d.DialContext(ctx, "tcp", dst.String())
		return err
	})
	return c, err
}

// tcpState is testbed.TCPState in ns.
func tcpState(tb testing.TB, ns namespaced, local, remote netip.AddrPort) string {
	tb.Helper()
	var st string
	if err := ns.Do(func() (err error) {
		st, err = testbed.TCPState(local, remote)
		return err
	}); err != nil {
		tb.Fatal(err)
	}
	return st
}

// readAll reads c to EOF within 5 s.
func readAll(c net.Conn) (string, error) {
	c.SetDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	return string(b), err
}

// TestPrivilegedReconnectAfterServerClose connects twice from the same
// source port to the same destination, the server side closing first the
// first time, through each of the ztunnel's listeners. The ztunnel's side
// of the first connection is then in TIME_WAIT (checked), and the second
// SYN must reach the ztunnel the way the kernel's own TIME_WAIT rules let
// it (RFC 6191): before the fix it was assigned straight to the listener,
// whose request socket duplicated the TIME_WAIT socket and was dropped, so
// the client's connect timed out.
func TestPrivilegedReconnectAfterServerClose(t *testing.T) {
	cs, pods := mustClientServer(t, "plain") // plain: not captured, outside the mesh
	n1, n2, client, server, plain := cs.n1, cs.n2, cs.client, cs.server, pods["plain"]
	serverID := "spiffe://cluster.local/ns/default/sa/server"

	// greeted reads the greeting and the server's close.
	greeted := func(c net.Conn) error {
		got, err := readAll(c)
		if err == nil && got != greeting {
			err = fmt.Errorf("read %q, want %q", got, greeting)
		}
		return err
	}
	// refused sends what is not a TLS handshake: the ztunnel's HBONE
	// listener closes first.
	refused := func(c net.Conn) error {
		if _, err := io.WriteString(c, "GET / HTTP/1.0\r\n\r\n"); err != nil {
			return err
		}
		_, err := readAll(c)
		return err
	}
	// handshake shows the ztunnel's HBONE listener answering on the
	// reused 4-tuple: its TLS handshake presents the server's identity.
	handshake := func(c net.Conn) error {
		tc := tls.Client(c, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}, MinVersion: tls.VersionTLS13})
		tc.SetDeadline(time.Now().Add(5 * time.Second))
		if err := tc.Handshake(); err != nil {
			return fmt.Errorf("TLS handshake: %w", err)
		}
		certs := tc.ConnectionState().PeerCertificates
		if len(certs) == 0 || len(certs[0].URIs) == 0 || certs[0].URIs[0].String() != serverID {
			return fmt.Errorf("peer certificates %v, want one for %s", certs, serverID)
		}
		return nil
	}

	for _, v6 := range []bool{false, true} {
		ip := func(p *testbed.Pod) netip.Addr {
			if v6 {
				return p.IPv6
			}
			return p.IPv4
		}
		nodeIP := n1.IPv4
		if v6 {
			nodeIP = n1.IPv6
		}
		family := map[bool]string{false: "ipv4", true: "ipv6"}[v6]
		port := map[bool]uint16{false: 45000, true: 46000}[v6]
		for _, tc := range []struct {
			name          string
			from          namespaced
			src, dst      netip.AddrPort
			tw            *testbed.Node // holds the ztunnel's side
			first, second func(net.Conn) error
		}{
			{"outbound 15001", client, netip.AddrPortFrom(ip(client), port+1), netip.AddrPortFrom(ip(server), 9090), n1, greeted, greeted},
			{"inbound plaintext 15006", plain, netip.AddrPortFrom(ip(plain), port+6), netip.AddrPortFrom(ip(server), 9090), n2, greeted, greeted},
			{"inbound HBONE 15008", n1, netip.AddrPortFrom(nodeIP, port+8), netip.AddrPortFrom(ip(server), 15008), n2, refused, handshake},
		} {
			t.Run(family+"/"+tc.name, func(t *testing.T) {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				c, err := dialFrom(ctx, tc.from, tc.src, tc.dst)
				if err != nil {
					t.Fatalf("first connection: %v", err)
				}
				err = tc.first(c)
				c.Close()
				if err != nil {
					t.Fatalf("first connection: %v", err)
				}
				testutil.Eventually(t, "the ztunnel's side in TIME_WAIT and the client's gone", func() bool {
					return tcpState(t, tc.tw, tc.dst, tc.src) == testbed.TCPTimeWait && tcpState(t, tc.from, tc.src, tc.dst) == ""
				})

				ctx, cancel = context.WithTimeout(context.Background(), time.Second)
				defer cancel()
				start := time.Now()
				c, err = dialFrom(ctx, tc.from, tc.src, tc.dst)
				if err != nil {
					t.Fatalf("reconnect from %s to %s over the ztunnel's TIME_WAIT: %v after %v", tc.src, tc.dst, err, time.Since(start).Round(time.Millisecond))
				}
				defer c.Close()
				if err := tc.second(c); err != nil {
					t.Fatalf("reconnected: %v", err)
				}
			})
		}
	}
}

// TestPrivilegedSequentialConnections makes 20 000 connections one after
// the other from one client pod to a server that closes first, through
// both ztunnels. The client's ports come from a 1000-port range, so after
// the first few hundred connections almost every 4-tuple is one the
// ztunnel still holds in TIME_WAIT from a few seconds before (as with
// Linux's default range after ≈ 14 000 connections within TIME_WAIT's
// 60 s). Every connect must complete within 1 s: a SYN the datapath
// black-holes would be retransmitted after 1 s.
func TestPrivilegedSequentialConnections(t *testing.T) {
	cs, _ := mustClientServer(t)
	client, server, node1 := cs.client, cs.server, cs.node1
	if err := client.Do(func() error {
		return os.WriteFile("/proc/sys/net/ipv4/ip_local_port_range", []byte("40000 40999"), 0)
	}); err != nil {
		t.Fatal(err)
	}
	dst := netip.AddrPortFrom(server.IPv4, 9090).String()
	before, err := node1.DP.Counters()
	if err != nil {
		t.Fatal(err)
	}

	const (
		conns     = 20000
		stall     = time.Second
		maxStalls = 10 // enough to show the defect without waiting for all of them
	)
	var (
		stalls  int
		slowest time.Duration
		done    int
	)
	for done < conns && stalls < maxStalls {
		ctx, cancel := context.WithTimeout(context.Background(), 2*stall)
		start := time.Now()
		c, err := client.Dial(ctx, "tcp", dst)
		took := time.Since(start)
		cancel()
		slowest = max(slowest, took)
		if took >= stall || err != nil {
			stalls++
			t.Logf("connection %d: connect took %v: %v", done, took.Round(time.Millisecond), err)
			if err != nil {
				done++
				continue
			}
		}
		got, err := readAll(c)
		c.Close()
		if err != nil || got != greeting {
			t.Fatalf("connection %d: read %q, %v", done, got, err)
		}
		done++
	}
	if stalls > 0 {
		t.Fatalf("%d of %d connects took ≥ %v or failed (slowest %v)", stalls, done, stall, slowest.Round(time.Millisecond))
	}
	after, err := node1.DP.Counters()
	if err != nil {
		t.Fatal(err)
	}
	// The test only means something if the 4-tuples really were in use.
	reused := after["pass_tuple_in_use"] - before["pass_tuple_in_use"]
	t.Logf("%d connections, slowest connect %v, %d SYNs on a 4-tuple in TIME_WAIT", done, slowest.Round(time.Millisecond), reused)
	if reused < conns/2 {
		t.Errorf("only %d of %d SYNs met a 4-tuple the ztunnel held: the client's ports did not wrap within TIME_WAIT", reused, conns)
	}
}
