package state_test

import (
	"errors"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/amber-mesh/amber/tunnel/authz"
	"github.com/amber-mesh/amber/xds/state"
	"github.com/amber-mesh/amber/xds/workloadapi"
	"github.com/amber-mesh/amber/xds/workloadapi/security"
)

func goodWorkload() *workloadapi.Workload {
	return &workloadapi.Workload{
		Uid:            "Kubernetes//Pod/default/sleep",
		Name:           "sleep",
		Namespace:      "default",
		ServiceAccount: "sleep",
		Addresses:      [][]byte{{10, 0, 0, 1}, netip.MustParseAddr("fd00::1").AsSlice()},
		TunnelProtocol: workloadapi.TunnelProtocol_HBONE,
		Node:           "node-a",
		Services: map[string]*workloadapi.PortList{
			"default/sleep.default.svc.cluster.local": {Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}},
		},
		Waypoint: &workloadapi.GatewayAddress{
			Destination:   &workloadapi.GatewayAddress_Address{Address: &workloadapi.NetworkAddress{Address: []byte{10, 0, 0, 9}}},
			HboneMtlsPort: 15008,
		},
		AuthorizationPolicies: []string{"default/allow-sleep"},
	}
}

func TestNewWorkload(t *testing.T) {
	w, err := state.NewWorkload(goodWorkload())
	if err != nil {
		t.Fatal(err)
	}
	if w.TrustDomain != "cluster.local" || w.ServiceAccount != "sleep" || w.ClusterID != "Kubernetes" {
		t.Errorf("identity defaults: %+v", w)
	}
	want := []netip.Addr{netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("fd00::1")}
	if len(w.Addresses) != 2 || w.Addresses[0] != want[0] || w.Addresses[1] != want[1] {
		t.Errorf("addresses = %v, want %v", w.Addresses, want)
	}
	if w.Protocol != state.ProtocolHBONE || !w.Healthy || w.Capacity != 1 {
		t.Errorf("protocol/health/capacity: %v %v %v", w.Protocol, w.Healthy, w.Capacity)
	}
	key := state.NamespacedHostname{Namespace: "default", Hostname: "sleep.default.svc.cluster.local"}
	if got := w.Services[key][80]; got != 8080 {
		t.Errorf("service port 80 maps to %d, want 8080", got)
	}
	if w.Waypoint == nil || w.Waypoint.ByHostname() || w.Waypoint.Address.Addr != netip.MustParseAddr("10.0.0.9") || w.Waypoint.HBONEPort != 15008 {
		t.Errorf("waypoint = %+v", w.Waypoint)
	}

	// Elided fields take the workload API's defaults.
	min := &workloadapi.Workload{Uid: "u", Name: "n", Namespace: "ns", Addresses: [][]byte{{10, 0, 0, 2}}, Capacity: wrapperspb.UInt32(3)}
	w, err = state.NewWorkload(min)
	if err != nil {
		t.Fatal(err)
	}
	if w.ServiceAccount != "default" || w.TrustDomain != "cluster.local" || w.Protocol != state.ProtocolTCP || w.Capacity != 3 {
		t.Errorf("defaults: %+v", w)
	}

	// IPv4-mapped IPv6 is stored as IPv4 so lookups by either form agree.
	mapped := &workloadapi.Workload{Uid: "u", Name: "n", Namespace: "ns", Addresses: [][]byte{netip.MustParseAddr("::ffff:10.0.0.7").AsSlice()}}
	w, err = state.NewWorkload(mapped)
	if err != nil {
		t.Fatal(err)
	}
	if w.Addresses[0] != netip.MustParseAddr("10.0.0.7") {
		t.Errorf("mapped address stored as %v", w.Addresses[0])
	}

	// A hostname-only workload (DNS resolved) is valid, and so is one only
	// reachable through a network gateway (istiod's multi-network form).
	if _, err := state.NewWorkload(&workloadapi.Workload{Uid: "u", Name: "n", Namespace: "ns", Hostname: "db.example.com"}); err != nil {
		t.Errorf("hostname-only workload: %v", err)
	}
	remote := &workloadapi.Workload{Uid: "u", Name: "n", Namespace: "ns", NetworkGateway: &workloadapi.GatewayAddress{
		Destination:   &workloadapi.GatewayAddress_Hostname{Hostname: &workloadapi.NamespacedHostname{Hostname: "eastwest.example.com"}},
		HboneMtlsPort: 15008,
	}}
	if w, err := state.NewWorkload(remote); err != nil || w.NetworkGateway.Hostname.Hostname != "eastwest.example.com" {
		t.Errorf("remote-network workload: %v", err)
	}
}

func TestNewWorkloadRejects(t *testing.T) {
	cases := []struct {
		name  string
		edit  func(*workloadapi.Workload)
		field string
	}{
		{"no uid", func(w *workloadapi.Workload) { w.Uid = "" }, "uid"},
		{"no name", func(w *workloadapi.Workload) { w.Name = "" }, "name"},
		{"no namespace", func(w *workloadapi.Workload) { w.Namespace = "" }, "namespace"},
		{"slash in namespace", func(w *workloadapi.Workload) { w.Namespace = "a/b" }, "namespace"},
		{"no address or hostname", func(w *workloadapi.Workload) { w.Addresses = nil }, "addresses"},
		{"5-byte address", func(w *workloadapi.Workload) { w.Addresses[1] = []byte{1, 2, 3, 4, 5} }, "addresses[1]"},
		{"empty address", func(w *workloadapi.Workload) { w.Addresses[0] = nil }, "addresses[0]"},
		{"unspecified address", func(w *workloadapi.Workload) { w.Addresses[0] = []byte{0, 0, 0, 0} }, "addresses[0]"},
		{"duplicate address", func(w *workloadapi.Workload) { w.Addresses[1] = []byte{10, 0, 0, 1} }, "addresses[1]"},
		{"unknown protocol", func(w *workloadapi.Workload) { w.TunnelProtocol = 7 }, "tunnel_protocol"},
		{"unknown network mode", func(w *workloadapi.Workload) { w.NetworkMode = 9 }, "network_mode"},
		{"unknown status", func(w *workloadapi.Workload) { w.Status = 9 }, "status"},
		{"empty waypoint", func(w *workloadapi.Workload) { w.Waypoint = &workloadapi.GatewayAddress{} }, "waypoint"},
		{"bad waypoint address", func(w *workloadapi.Workload) {
			w.Waypoint.GetAddress().Address = []byte{1}
		}, "waypoint.address.address"},
		{"waypoint port", func(w *workloadapi.Workload) { w.Waypoint.HboneMtlsPort = 70000 }, "waypoint.hbone_mtls_port"},
		{"service key", func(w *workloadapi.Workload) {
			w.Services["nohostname"] = &workloadapi.PortList{}
		}, `services["nohostname"]`},
		{"service port 0", func(w *workloadapi.Workload) {
			w.Services["default/sleep.default.svc.cluster.local"].Ports[0].ServicePort = 0
		}, `services["default/sleep.default.svc.cluster.local"].ports[0].service_port`},
		{"target port", func(w *workloadapi.Workload) {
			w.Services["default/sleep.default.svc.cluster.local"].Ports[0].TargetPort = 65536
		}, `services["default/sleep.default.svc.cluster.local"].ports[0].target_port`},
		{"policy key", func(w *workloadapi.Workload) { w.AuthorizationPolicies = []string{"nons"} }, "authorization_policies[0]"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			w := goodWorkload()
			c.edit(w)
			got, err := state.NewWorkload(w)
			if err == nil {
				t.Fatalf("accepted: %+v", got)
			}
			var ve *state.ValidationError
			if !errors.As(err, &ve) || !errors.Is(err, state.ErrInvalid) {
				t.Fatalf("error %v is not a *ValidationError", err)
			}
			if ve.Field != c.field {
				t.Errorf("field = %q, want %q (%v)", ve.Field, c.field, err)
			}
		})
	}
}

func goodService() *workloadapi.Service {
	return &workloadapi.Service{
		Name:      "productpage",
		Namespace: "default",
		Hostname:  "productpage.default.svc.cluster.local",
		Addresses: []*workloadapi.NetworkAddress{{Address: []byte{10, 96, 0, 10}}},
		Ports:     []*workloadapi.Port{{ServicePort: 9080, TargetPort: 9080}},
	}
}

func TestNewService(t *testing.T) {
	s, err := state.NewService(goodService())
	if err != nil {
		t.Fatal(err)
	}
	if s.Key().String() != "default/productpage.default.svc.cluster.local" {
		t.Errorf("key = %s", s.Key())
	}
	if len(s.VIPs) != 1 || s.VIPs[0].Prefix != netip.MustParsePrefix("10.96.0.10/32") {
		t.Errorf("vips = %v", s.VIPs)
	}
	if s.Ports[9080].TargetPort != 9080 {
		t.Errorf("ports = %v", s.Ports)
	}
	// istiod lists a UDP+TCP port (kube-dns's 53) twice.
	dns := goodService()
	dns.Ports = append(dns.Ports, &workloadapi.Port{ServicePort: 9080, TargetPort: 9080, AppProtocol: workloadapi.AppProtocol_HTTP11})
	if s, err := state.NewService(dns); err != nil || len(s.Ports) != 1 {
		t.Errorf("port listed twice, same target: %v, ports %v", err, s)
	}

	cases := []struct {
		name  string
		edit  func(*workloadapi.Service)
		field string
	}{
		{"no hostname", func(s *workloadapi.Service) { s.Hostname = "" }, "hostname"},
		{"no namespace", func(s *workloadapi.Service) { s.Namespace = "" }, "namespace"},
		{"bad vip", func(s *workloadapi.Service) { s.Addresses[0].Address = []byte{1, 2, 3} }, "addresses[0].address"},
		{"nil vip", func(s *workloadapi.Service) { s.Addresses = append(s.Addresses, nil) }, "addresses[1]"},
		{"long prefix", func(s *workloadapi.Service) { s.Addresses[0].Length = proto.Uint32(33) }, "addresses[0].length"},
		{"port 0", func(s *workloadapi.Service) { s.Ports[0].ServicePort = 0 }, "ports[0].service_port"},
		{"port too big", func(s *workloadapi.Service) { s.Ports[0].ServicePort = 1 << 20 }, "ports[0].service_port"},
		{"port twice with different targets", func(s *workloadapi.Service) {
			s.Ports = append(s.Ports, &workloadapi.Port{ServicePort: 9080, TargetPort: 8080})
		}, "ports[1].service_port"},
		{"unknown visibility", func(s *workloadapi.Service) { s.Visibility = 5 }, "visibility"},
		{"waypoint without destination", func(s *workloadapi.Service) { s.Waypoint = &workloadapi.GatewayAddress{HboneMtlsPort: 15008} }, "waypoint"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := goodService()
			c.edit(s)
			_, err := state.NewService(s)
			var ve *state.ValidationError
			if !errors.As(err, &ve) {
				t.Fatalf("error = %v, want *ValidationError", err)
			}
			if ve.Field != c.field {
				t.Errorf("field = %q, want %q (%v)", ve.Field, c.field, err)
			}
		})
	}
}

func goodPolicy() *security.Authorization {
	return &security.Authorization{
		Name:      "allow-sleep",
		Namespace: "default",
		Scope:     security.Scope_WORKLOAD_SELECTOR,
		Action:    security.Action_ALLOW,
		Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{{
			Principals:       []*security.StringMatch{{MatchType: &security.StringMatch_Exact{Exact: "cluster.local/ns/default/sa/sleep"}}},
			NotPrincipals:    []*security.StringMatch{{MatchType: &security.StringMatch_Presence{Presence: &emptypb.Empty{}}}},
			SourceIps:        []*security.Address{{Address: []byte{10, 0, 0, 0}, Length: 8}},
			DestinationPorts: []uint32{9080},
			ServiceAccounts:  []*security.ServiceAccountMatch{{Namespace: "default", ServiceAccount: "sleep"}},
		}}}}}},
	}
}

func TestNewAuthorization(t *testing.T) {
	p, err := state.NewAuthorization(goodPolicy())
	if err != nil {
		t.Fatal(err)
	}
	if p.Key() != "default/allow-sleep" || p.Err() != nil {
		t.Errorf("policy %s: %v", p.Key(), p.Err())
	}
	want := authz.Authorization{
		Name: "allow-sleep", Namespace: "default", Scope: authz.ScopeWorkloadSelector, Action: authz.ActionAllow,
		Groups: []authz.Group{{Rules: []authz.Rules{{Matches: []authz.Match{{
			Principals:       []authz.StringMatch{authz.Exact("cluster.local/ns/default/sa/sleep")},
			NotPrincipals:    []authz.StringMatch{authz.Presence()},
			SourceIPs:        []authz.Address{{Address: []byte{10, 0, 0, 0}, Length: 8}},
			DestinationPorts: []uint32{9080},
			ServiceAccounts:  []authz.ServiceAccountMatch{{Namespace: "default", ServiceAccount: "sleep"}},
		}}}}}},
	}
	if got := p.Authorization(); !reflect.DeepEqual(got, want) {
		t.Errorf("converted\n%+v\nwant\n%+v", got, want)
	}

	// What the policy model cannot represent is kept, fail-closed.
	for name, edit := range map[string]func(*security.Authorization){
		"dry-run":          func(p *security.Authorization) { p.DryRun = true },
		"policy extension": func(p *security.Authorization) { p.Extensions = []*workloadapi.Extension{{Name: "x"}} },
		"match extension": func(p *security.Authorization) {
			p.Groups[0].Rules[0].Matches[0].Extensions = []*workloadapi.Extension{{Name: "x"}}
		},
	} {
		pb := goodPolicy()
		edit(pb)
		p, err := state.NewAuthorization(pb)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if !errors.Is(p.Err(), authz.ErrUnenforceable) {
			t.Errorf("%s: Err = %v, want ErrUnenforceable", name, p.Err())
		}
	}
	m := func(p *security.Authorization) *security.Match { return p.Groups[0].Rules[0].Matches[0] }
	cases := []struct {
		name  string
		edit  func(*security.Authorization)
		field string
	}{
		{"no name", func(p *security.Authorization) { p.Name = "" }, "name"},
		{"no namespace", func(p *security.Authorization) { p.Namespace = "" }, "namespace"},
		{"unknown action", func(p *security.Authorization) { p.Action = 2 }, "action"},
		{"unknown scope", func(p *security.Authorization) { p.Scope = 3 }, "scope"},
		{"empty string match", func(p *security.Authorization) {
			m(p).Principals = append(m(p).Principals, &security.StringMatch{})
		}, "groups[0].rules[0].matches[0].principals[1]"},
		{"bad ip", func(p *security.Authorization) { m(p).SourceIps[0].Address = []byte{10} }, "groups[0].rules[0].matches[0].source_ips[0].address"},
		{"long prefix", func(p *security.Authorization) { m(p).SourceIps[0].Length = 40 }, "groups[0].rules[0].matches[0].source_ips[0].length"},
		{"bad port", func(p *security.Authorization) { m(p).DestinationPorts[0] = 65536 }, "groups[0].rules[0].matches[0].destination_ports[0]"},
		{"empty service account", func(p *security.Authorization) { m(p).ServiceAccounts[0].ServiceAccount = "" }, "groups[0].rules[0].matches[0].service_accounts[0].serviceAccount"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := goodPolicy()
			c.edit(p)
			_, err := state.NewAuthorization(p)
			var ve *state.ValidationError
			if !errors.As(err, &ve) {
				t.Fatalf("error = %v, want *ValidationError", err)
			}
			if ve.Field != c.field {
				t.Errorf("field = %q, want %q (%v)", ve.Field, c.field, err)
			}
			if !strings.Contains(err.Error(), "default/") && c.name != "no namespace" {
				t.Errorf("error %q does not name the policy", err)
			}
		})
	}
}
