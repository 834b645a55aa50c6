package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/netip"
	"testing"

	"github.com/amber-mesh/amber/internal/tcptest"
	"github.com/amber-mesh/amber/tunnel/certs"
	"github.com/amber-mesh/amber/tunnel/hbone"
	"github.com/amber-mesh/amber/tunnel/identity"
	"github.com/amber-mesh/amber/tunnel/sockopt"
	"github.com/amber-mesh/amber/xds/state"
)

// connectSeen is what a peer's HBONE server saw of one CONNECT.
type connectSeen struct {
	authority string
	peer      string         // the client certificate's identity
	remote    netip.AddrPort // the TCP connection's source
}

// mustPeerHBONE serves HBONE on a new listener at addr:0 as a pod serving
// its own 15008 would (a waypoint), presenting id's certificate from mgr;
// it accepts every CONNECT and reports it on the returned channel.
func mustPeerHBONE(t *testing.T, mgr *certs.Manager, addr netip.Addr, w *state.Workload) (netip.AddrPort, <-chan connectSeen) {
	t.Helper()
	return mustPeerHBONEPort(t, mgr, addr, 0, w)
}

// mustPeerHBONEPort is mustPeerHBONE on a given port.
func mustPeerHBONEPort(t *testing.T, mgr *certs.Manager, addr netip.Addr, port uint16, w *state.Workload) (netip.AddrPort, <-chan connectSeen) {
	t.Helper()
	ln, err := net.Listen("tcp", netip.AddrPortFrom(addr, port).String())
	if err != nil {
		t.Fatal(err)
	}
	seen := make(chan connectSeen, 16)
	srv := &hbone.Server{
		TLSConfig: mgr.ServerConfig(func(net.Addr) (identity.ID, error) { return workloadID(w), nil }, "cluster.local"),
		Handler: hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, rw hbone.Responder) {
			c := connectSeen{authority: req.Authority, remote: netip.MustParseAddrPort(req.Conn.RemoteAddr().String())}
			if tc, ok := req.Conn.(*tls.Conn); ok {
				if id, err := certs.PeerID(tc.ConnectionState()); err == nil {
					c.peer = id.String()
				}
			}
			seen <- c
			if s, err := rw.Accept(); err == nil {
				s.Close()
			}
		}),
		Stats: new(hbone.Stats),
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-served; !errors.Is(err, hbone.ErrServerClosed) {
			t.Errorf("peer HBONE server: %v", err)
		}
	})
	return netip.MustParseAddrPort(ln.Addr().String()), seen
}

// TestOutboundToLocalWaypoint sends a captured pod's connection to a
// service whose waypoint runs on the same node. The waypoint pod is not
// captured (istio.io/dataplane-mode=none: istiod describes it without
// HBONE) and serves HBONE itself: the ztunnel must open a real HBONE
// connection to it, not terminate the tunnel in process (which would
// present the waypoint's identity itself and answer 400 to an authority
// that is not the waypoint's own address).
func TestOutboundToLocalWaypoint(t *testing.T) {
	mgr := mustCerts(t)
	sleep := wl("sleep", state.ProtocolHBONE, "127.0.0.3")
	waypoint := wl("waypoint", state.ProtocolTCP, "127.0.0.9")
	hboneAddr, seen := mustPeerHBONE(t, mgr, waypoint.Addresses[0], waypoint)
	vip := netip.MustParseAddrPort("10.96.0.1:9080")
	store := state.NewStore()
	store.Update(func(tx *state.Txn) {
		tx.PutWorkload(sleep)
		tx.PutWorkload(waypoint)
		tx.PutService(&state.Service{
			Name: "reviews", Namespace: "default", Hostname: "reviews.default.svc.cluster.local",
			VIPs:     []state.NetworkPrefix{{Prefix: netip.PrefixFrom(vip.Addr(), 32)}},
			Ports:    map[uint16]state.Port{9080: {ServicePort: 9080, TargetPort: 9080}},
			Waypoint: &state.GatewayAddress{Address: state.NetworkAddr{Addr: waypoint.Addresses[0]}, HBONEPort: hboneAddr.Port()},
		})
	})
	p, err := New(Config{
		Store: store, Certs: mgr, NodeName: "n1", HBONEPort: hboneAddr.Port(),
		Sockets: sockopt.Options{Mark: -1, NoTransparent: true},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })

	src := netip.MustParseAddrPort("127.0.0.3:40000")
	down, _ := tcptest.Pair(t)
	oc, up := p.connectOutbound(down, src, vip, netip.AddrPort{})
	if up == nil {
		t.Fatalf("outbound to the service behind a local waypoint refused (CONNECTs answered 400 in process: %d)", p.Stats().BadRequests.Load())
	}
	up.Close()
	// Reported as Istio's ztunnel does: to the waypoint's identity, the
	// service, no destination workload.
	if l := oc.labels(); l.SourcePrincipal != workloadID(sleep).String() || l.DestinationPrincipal != workloadID(waypoint).String() ||
		l.DestinationService != "reviews.default.svc.cluster.local" || l.DestinationWorkload != "" || l.ConnectionSecurityPolicy != "mutual_tls" {
		t.Errorf("labels %+v, want sleep to the waypoint's identity for reviews", l)
	}
	c := <-seen
	if c.authority != vip.String() {
		t.Errorf("waypoint saw :authority %s, want the service address %s", c.authority, vip)
	}
	if want := workloadID(sleep).String(); c.peer != want {
		t.Errorf("waypoint saw client %q, want %s", c.peer, want)
	}
	if n := p.Stats().BadRequests.Load(); n != 0 {
		t.Errorf("the ztunnel's own HBONE server answered %d CONNECTs with 400", n)
	}
}

// TestHBONEFromPodAddress: HBONE to a peer leaves from the client pod's
// own address, as Istio's ztunnel dials from inside the pod, so that the
// peer — another node's ztunnel, a waypoint, a NetworkPolicy — sees the
// pod, not the node. Two pods of one service account get a connection
// each (the pool is keyed by the source address too, as ztunnel's
// WorkloadKey is), and a pod reaches a peer of the other family from its
// address of that family.
func TestHBONEFromPodAddress(t *testing.T) {
	mgr := mustCerts(t)
	sleepA := wl("sleep-a", state.ProtocolHBONE, "127.0.0.3")
	sleepB := wl("sleep-b", state.ProtocolHBONE, "127.0.0.4")
	sleepB.ServiceAccount = sleepA.ServiceAccount
	sleepB.Addresses = append(sleepB.Addresses, netip.MustParseAddr("::1"))
	remote := wl("productpage", state.ProtocolHBONE, "127.0.0.5")
	remote.Node = "n2"
	waypoint := wl("waypoint", state.ProtocolTCP, "127.0.0.9")
	hboneAddr, seen := mustPeerHBONE(t, mgr, remote.Addresses[0], remote)
	// The waypoint listens on the same port on another address, and on
	// IPv6 for the family switch.
	wpAddr, wpSeen := mustPeerHBONEPort(t, mgr, waypoint.Addresses[0], hboneAddr.Port(), waypoint)
	store := state.NewStore()
	store.Update(func(tx *state.Txn) {
		for _, w := range []*state.Workload{sleepA, sleepB, remote, waypoint} {
			tx.PutWorkload(w)
		}
	})
	p, err := New(Config{
		Store: store, Certs: mgr, NodeName: "n1", HBONEPort: hboneAddr.Port(),
		Sockets: sockopt.Options{Mark: -1, NoTransparent: true},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })

	connect := func(src string, dst netip.AddrPort) {
		t.Helper()
		down, _ := tcptest.Pair(t)
		_, up := p.connectOutbound(down, netip.MustParseAddrPort(src), dst, netip.AddrPort{})
		if up == nil {
			t.Fatalf("%s → %s refused", src, dst)
		}
		up.Close()
	}
	dst := netip.AddrPortFrom(remote.Addresses[0], 9080)
	for _, src := range []string{"127.0.0.3:40000", "127.0.0.4:40000", "127.0.0.3:40001"} {
		connect(src, dst)
		c := <-seen
		if want := netip.MustParseAddrPort(src).Addr(); c.remote.Addr() != want {
			t.Errorf("%s: the peer saw the connection from %s, want the pod's %s", src, c.remote.Addr(), want)
		}
	}
	if n := p.HBONEStats().Dials.Load(); n != 2 {
		t.Errorf("%d HBONE connections dialled, want one per source pod (2)", n)
	}

	// The waypoint of a workload, by IPv4 address, from a pod that
	// connected over IPv6: its IPv4 address.
	behind := *remote
	behind.Waypoint = &state.GatewayAddress{Address: state.NetworkAddr{Addr: waypoint.Addresses[0]}, HBONEPort: wpAddr.Port()}
	behind.Addresses = append(behind.Addresses, netip.MustParseAddr("::5"))
	store.Update(func(tx *state.Txn) { tx.PutWorkload(&behind) })
	connect("[::1]:40000", netip.MustParseAddrPort("[::5]:9080"))
	if c := <-wpSeen; c.remote.Addr() != sleepB.Addresses[0] {
		t.Errorf("waypoint saw the connection from %s, want sleep-b's IPv4 address %s", c.remote.Addr(), sleepB.Addresses[0])
	}
}
