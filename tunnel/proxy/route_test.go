package proxy

import (
	"net/netip"
	"regexp"
	"testing"
	"testing/synctest"
	"time"

	"github.com/amber-mesh/amber/tunnel/hbone"
	"github.com/amber-mesh/amber/xds/state"
)

func wl(name string, proto state.Protocol, addr string) *state.Workload {
	return &state.Workload{
		UID: "Kubernetes//Pod/default/" + name, Name: name, Namespace: "default",
		ServiceAccount: name, TrustDomain: "cluster.local", Node: "n1",
		Addresses: []netip.Addr{netip.MustParseAddr(addr)}, Protocol: proto, Healthy: true,
	}
}

func TestRoute(t *testing.T) {
	svcKey := state.NamespacedHostname{Namespace: "default", Hostname: "pp.default.svc.cluster.local"}
	pp := wl("productpage", state.ProtocolHBONE, "10.0.0.2")
	pp.Services = map[state.NamespacedHostname]map[uint16]uint16{svcKey: {80: 9080}}
	plain := wl("plain", state.ProtocolTCP, "10.0.0.3")
	// As istiod describes a waypoint pod: uncaptured, so not HBONE.
	wp := wl("waypoint", state.ProtocolTCP, "10.0.0.9")
	behind := wl("behind", state.ProtocolHBONE, "10.0.0.4")
	behind.Waypoint = &state.GatewayAddress{Address: state.NetworkAddr{Addr: netip.MustParseAddr("10.0.0.9")}, HBONEPort: 15008}
	store := state.NewStore()
	store.Update(func(tx *state.Txn) {
		for _, w := range []*state.Workload{pp, plain, wp, behind} {
			tx.PutWorkload(w)
		}
		tx.PutService(&state.Service{
			Name: "pp", Namespace: "default", Hostname: svcKey.Hostname,
			VIPs:  []state.NetworkPrefix{{Prefix: netip.MustParsePrefix("10.96.0.1/32")}},
			Ports: map[uint16]state.Port{80: {ServicePort: 80}},
		})
	})
	p := &Proxy{cfg: Config{HBONEPort: 15008}}
	for _, tc := range []struct {
		name, dst     string
		hbone         bool
		addr, auth    string
		peer, service string
	}{
		{"hbone workload", "10.0.0.2:9080", true, "10.0.0.2:15008", "10.0.0.2:9080", "spiffe://cluster.local/ns/default/sa/productpage", ""},
		{"service VIP to endpoint target port", "10.96.0.1:80", true, "10.0.0.2:15008", "10.0.0.2:9080", "spiffe://cluster.local/ns/default/sa/productpage", svcKey.Hostname},
		{"plain workload passes through", "10.0.0.3:80", false, "10.0.0.3:80", "", "", ""},
		{"unknown destination passes through", "192.0.2.1:443", false, "192.0.2.1:443", "", "", ""},
		{"workload waypoint keeps authority", "10.0.0.4:8080", true, "10.0.0.9:15008", "10.0.0.4:8080", "spiffe://cluster.local/ns/default/sa/waypoint", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rt, err := p.route(store.Load(), netip.MustParseAddrPort(tc.dst))
			if err != nil {
				t.Fatal(err)
			}
			if rt.hbone != tc.hbone || rt.addr.String() != tc.addr || rt.authority != tc.auth {
				t.Errorf("route = hbone %v addr %s authority %q; want %v %s %q", rt.hbone, rt.addr, rt.authority, tc.hbone, tc.addr, tc.auth)
			}
			if tc.peer != "" && (rt.peer == nil || workloadID(rt.peer).String() != tc.peer) {
				t.Errorf("peer = %v, want %s", rt.peer, tc.peer)
			}
			if got := ""; rt.svc != nil {
				got = rt.svc.Hostname
				if got != tc.service {
					t.Errorf("service = %q, want %q", got, tc.service)
				}
			}
		})
	}

	// A destination the node translated (kube-proxy): a Service the mesh
	// does not describe is routed by the address the node translated it
	// to; what the mesh knows is routed as before whatever the node did.
	for _, tc := range []struct {
		name, dst, translated string
		hbone                 bool
		addr                  string
	}{
		{"unknown Service to an unknown endpoint: the endpoint", "10.96.0.9:80", "192.0.2.7:8080", false, "192.0.2.7:8080"},
		{"unknown Service to a plain workload: the workload", "10.96.0.9:80", "10.0.0.3:9080", false, "10.0.0.3:9080"},
		{"unknown Service to a mesh workload: HBONE to it", "10.96.0.9:80", "10.0.0.2:9080", true, "10.0.0.2:15008"},
		{"unknown Service, not translated: passthrough", "10.96.0.9:80", "", false, "10.96.0.9:80"},
		{"known Service: its endpoint, not the node's choice", "10.96.0.1:80", "10.0.0.3:9080", true, "10.0.0.2:15008"},
		{"known workload: itself", "10.0.0.3:9080", "192.0.2.7:8080", false, "10.0.0.3:9080"},
	} {
		t.Run("translated/"+tc.name, func(t *testing.T) {
			var translated netip.AddrPort
			if tc.translated != "" {
				translated = netip.MustParseAddrPort(tc.translated)
			}
			rt, err := p.routeOutbound(store.Load(), netip.MustParseAddrPort(tc.dst), translated)
			if err != nil {
				t.Fatal(err)
			}
			if rt.hbone != tc.hbone || rt.addr.String() != tc.addr {
				t.Errorf("route = hbone %v addr %s; want %v %s", rt.hbone, rt.addr, tc.hbone, tc.addr)
			}
		})
	}

	// A service without a healthy endpoint is refused, not passed through
	// to the VIP.
	store.Update(func(tx *state.Txn) {
		sick := *pp
		sick.Healthy = false
		tx.PutWorkload(&sick)
	})
	if _, err := p.route(store.Load(), netip.MustParseAddrPort("10.96.0.1:80")); err == nil {
		t.Error("route to a service without healthy endpoints succeeded")
	}
}

// The Forwarded header a ztunnel sends reads back as the client's address
// (hbone.ForwardedFor), with and without the service's host.
func TestForwardedRoundTrip(t *testing.T) {
	src := netip.MustParseAddrPort("[2001:db8::1]:80")
	if ap, ok := hbone.ForwardedFor(formatForwarded(src, nil)); !ok || ap != src {
		t.Errorf("round trip of %s: %s", src, ap)
	}
	if got, want := formatForwarded(netip.MustParseAddrPort("10.0.0.3:1234"), nil), `for="10.0.0.3:1234"`; got != want {
		t.Errorf("forwarded = %s, want %s", got, want)
	}
	svc := &state.Service{Hostname: "pp.default.svc.cluster.local"}
	if got, want := formatForwarded(src, svc), `for="[2001:db8::1]:80";host=pp.default.svc.cluster.local`; got != want {
		t.Errorf("forwarded = %s, want %s", got, want)
	}
	if ap, ok := hbone.ForwardedFor(formatForwarded(src, svc)); !ok || ap != src {
		t.Errorf("round trip of %s with host: %s", src, ap)
	}
}

// The CONNECT request carries Istio's baggage and a W3C traceparent.
func TestBaggageTraceparent(t *testing.T) {
	w := wl("sleep", state.ProtocolHBONE, "10.0.0.1")
	w.ClusterID, w.WorkloadType, w.WorkloadName = "Kubernetes", "deployment", "sleep"
	w.CanonicalName, w.CanonicalRevision = "sleep", "v1"
	w.Locality = state.Locality{Region: "eu", Zone: "eu-1"}
	want := "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=sleep,service.name=sleep,service.version=v1,cloud.region=eu,cloud.availability_zone=eu-1"
	if got := baggage(w); got != want {
		t.Errorf("baggage = %s\nwant       %s", got, want)
	}
	tp := newTraceparent()
	if !regexp.MustCompile(`^00-[0-9a-f]{32}-[0-9a-f]{16}-00$`).MatchString(tp) || tp == newTraceparent() {
		t.Errorf("traceparent %q", tp)
	}
}

// A pod's first connection can arrive before the control plane describes
// the pod: the source is waited for, then found; an address that never
// appears is refused after WorkloadWait. In a synctest bubble: the waits
// run in fake time.
func TestWaitLocalWorkload(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		store := state.NewStore()
		p := &Proxy{ctx: t.Context(), cfg: Config{Store: store, NodeName: "n1", WorkloadWait: 2 * time.Second}}
		late := wl("late", state.ProtocolHBONE, "10.0.0.7")
		go func() {
			time.Sleep(200 * time.Millisecond)
			store.Update(func(tx *state.Txn) { tx.PutWorkload(late) })
		}()
		t0 := time.Now()
		if _, w := p.waitLocalWorkload(netip.MustParseAddr("10.0.0.7")); w == nil || w.Name != "late" {
			t.Fatalf("workload described 200ms late: got %v", w)
		}
		if d := time.Since(t0); d < 200*time.Millisecond || d > 250*time.Millisecond {
			t.Errorf("found after %v, want within a 50 ms poll of 200 ms", d)
		}
		p.cfg.WorkloadWait = 100 * time.Millisecond
		t0 = time.Now()
		if _, w := p.waitLocalWorkload(netip.MustParseAddr("10.0.0.8")); w != nil {
			t.Fatalf("unknown address: got %v", w)
		}
		if d := time.Since(t0); d != 100*time.Millisecond {
			t.Errorf("gave up after %v, want 100ms", d)
		}
	})
}
