package e2e

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/test/meshbed"
	"github.com/amber-mesh/amber/test/testbed"
	"github.com/amber-mesh/amber/tunnel/ca"
	"github.com/amber-mesh/amber/tunnel/certs"
	"github.com/amber-mesh/amber/tunnel/hbone"
	"github.com/amber-mesh/amber/tunnel/identity"
)

const waypointID = "spiffe://cluster.local/ns/default/sa/waypoint"

// TestPrivilegedSourceFromWaypointPeer: a waypoint dials the destination
// pod's HBONE port from its own pod address, with its own identity and no
// Forwarded header (Envoy's and amber's waypoints alike). The destination
// ztunnel shows the application the waypoint's address, as Istio's
// ztunnel does, when the workload at that address has the identity the
// peer proved — from another node and from the destination's own node —
// and never an address whose workload is someone else: a peer with the
// waypoint's certificate in another pod gets no preserved source.
func TestPrivilegedSourceFromWaypointPeer(t *testing.T) {
	bed := testbed.New(t)
	n1, err := bed.AddNode("n1")
	if err != nil {
		t.Fatal(err)
	}
	n2, err := bed.AddNode("n2")
	if err != nil {
		t.Fatal(err)
	}
	pod := func(n *testbed.Node, name string) *testbed.Pod {
		p, err := n.AddPod(name)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	wpRemote, wpLocal, impostor := pod(n1, "waypoint-a"), pod(n2, "waypoint-b"), pod(n1, "impostor")
	productpage := pod(n2, "productpage")
	node2 := meshbed.MustLoadDatapath(t, n2, "amber-e2e")
	meshbed.MustLoadDatapath(t, n1, "amber-e2e")
	node2.MustCapture(t, productpage)
	dir := t.TempDir()
	caDir := filepath.Join(dir, "ca")
	local, err := ca.OpenLocal(caDir, "cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	meshFile := filepath.Join(dir, "mesh.yaml")
	// The waypoint pods are outside the capture (dataplane-mode none), so
	// plain TCP workloads; impostor is a workload of another identity.
	mesh := meshbed.MeshYAML([]meshbed.Workload{
		{Name: "productpage", ServiceAccount: "productpage", Pod: productpage, HBONE: true},
		{Name: "waypoint-a", ServiceAccount: "waypoint", Pod: wpRemote},
		{Name: "waypoint-b", ServiceAccount: "waypoint", Pod: wpLocal},
		{Name: "impostor", ServiceAccount: "impostor", Pod: impostor},
	}, "")
	if err := os.WriteFile(meshFile, []byte(mesh), 0o644); err != nil {
		t.Fatal(err)
	}
	z2 := mustZtunnel(t, node2, meshFile, caDir)
	echo := mustEcho(t, productpage, 9080)

	mgr := &certs.Manager{CA: local}
	t.Cleanup(func() { mgr.Close() })
	src, _ := identity.Parse(waypointID)
	dst, _ := identity.Parse(productpageID)
	target := netip.AddrPortFrom(productpage.IPv4, 9080)
	for _, tc := range []struct {
		from     *testbed.Pod
		preserve bool
	}{
		{wpRemote, true},
		{wpLocal, true},
		{impostor, false},
	} {
		t.Run(tc.from.Name, func(t *testing.T) {
			pool := &hbone.Pool{Dial: func(ctx context.Context, key hbone.Key) (net.Conn, error) {
				nc, err := tc.from.Dial(ctx, "tcp", key.Addr.String())
				if err != nil {
					return nil, err
				}
				c := hbone.TLSClient(nc, mgr.ClientConfig(src, dst))
				if err := c.HandshakeContext(ctx); err != nil {
					nc.Close()
					return nil, err
				}
				return c, nil
			}}
			t.Cleanup(func() { pool.Close() })
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			key := hbone.Key{Src: src.String(), Dst: dst.String(), Addr: netip.AddrPortFrom(productpage.IPv4, 15008)}
			s, err := pool.Connect(ctx, key, target.String(), http.Header{})
			if err != nil {
				t.Fatalf("CONNECT %s from %s: %v", target, tc.from.Name, err)
			}
			defer s.Close()
			s.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := s.Write([]byte("ping")); err != nil {
				t.Fatal(err)
			}
			// Half-close: the echo ends, and so does the connection, which
			// is when the destination logs it.
			if err := s.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			if b, err := io.ReadAll(s); err != nil || string(b) != "ping" {
				t.Fatalf("echo %q, %v", b, err)
			}
			got := echo.lastPeer(t).Addr()
			switch {
			case tc.preserve && got != tc.from.IPv4:
				t.Errorf("productpage saw %s, want the waypoint pod's address %s", got, tc.from.IPv4)
			case !tc.preserve && got == tc.from.IPv4:
				t.Errorf("productpage saw the address of %s, whose workload is not the peer's identity", tc.from.Name)
			}
			testutil.Eventually(t, "the destination's access log", func() bool {
				return len(z2.accessLogs(map[string]string{"src.identity": waypointID, "src.addr": tc.from.IPv4.String()})) > 0
			})
		})
	}
}
