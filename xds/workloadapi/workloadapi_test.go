package workloadapi_test

import (
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/amber-mesh/amber/xds/workloadapi"
	"github.com/amber-mesh/amber/xds/workloadapi/security"
)

func TestTypeURLs(t *testing.T) {
	a, err := anypb.New(&workloadapi.Address{})
	if err != nil {
		t.Fatal(err)
	}
	if a.TypeUrl != workloadapi.AddressTypeURL {
		t.Errorf("Address type URL = %q, want %q", a.TypeUrl, workloadapi.AddressTypeURL)
	}
	p, err := anypb.New(&security.Authorization{})
	if err != nil {
		t.Fatal(err)
	}
	if p.TypeUrl != workloadapi.AuthorizationTypeURL {
		t.Errorf("Authorization type URL = %q, want %q", p.TypeUrl, workloadapi.AuthorizationTypeURL)
	}
	w, err := anypb.New(&workloadapi.Workload{})
	if err != nil {
		t.Fatal(err)
	}
	if w.TypeUrl != workloadapi.WorkloadTypeURL {
		t.Errorf("Workload type URL = %q, want %q", w.TypeUrl, workloadapi.WorkloadTypeURL)
	}
}

// TestUpstreamFieldNumbers pins the wire contract with istiod: a sample of
// fields with the numbers and kinds they have in istio/istio's
// pkg/workloadapi. A renumbered or retyped field breaks interop silently, so
// it must break this test loudly.
func TestUpstreamFieldNumbers(t *testing.T) {
	cases := []struct {
		msg    proto.Message
		field  protoreflect.Name
		number protowire.Number
		kind   protoreflect.Kind
	}{
		{&workloadapi.Address{}, "workload", 1, protoreflect.MessageKind},
		{&workloadapi.Address{}, "service", 2, protoreflect.MessageKind},
		{&workloadapi.Workload{}, "uid", 20, protoreflect.StringKind},
		{&workloadapi.Workload{}, "name", 1, protoreflect.StringKind},
		{&workloadapi.Workload{}, "namespace", 2, protoreflect.StringKind},
		{&workloadapi.Workload{}, "addresses", 3, protoreflect.BytesKind},
		{&workloadapi.Workload{}, "hostname", 21, protoreflect.StringKind},
		{&workloadapi.Workload{}, "network", 4, protoreflect.StringKind},
		{&workloadapi.Workload{}, "tunnel_protocol", 5, protoreflect.EnumKind},
		{&workloadapi.Workload{}, "trust_domain", 6, protoreflect.StringKind},
		{&workloadapi.Workload{}, "service_account", 7, protoreflect.StringKind},
		{&workloadapi.Workload{}, "waypoint", 8, protoreflect.MessageKind},
		{&workloadapi.Workload{}, "network_gateway", 19, protoreflect.MessageKind},
		{&workloadapi.Workload{}, "node", 9, protoreflect.StringKind},
		{&workloadapi.Workload{}, "services", 22, protoreflect.MessageKind},
		{&workloadapi.Workload{}, "authorization_policies", 16, protoreflect.StringKind},
		{&workloadapi.Workload{}, "status", 17, protoreflect.EnumKind},
		{&workloadapi.Workload{}, "network_mode", 25, protoreflect.EnumKind},
		{&workloadapi.Workload{}, "capacity", 27, protoreflect.MessageKind},
		{&workloadapi.Service{}, "hostname", 3, protoreflect.StringKind},
		{&workloadapi.Service{}, "addresses", 4, protoreflect.MessageKind},
		{&workloadapi.Service{}, "ports", 5, protoreflect.MessageKind},
		{&workloadapi.Service{}, "waypoint", 7, protoreflect.MessageKind},
		{&workloadapi.Service{}, "canonical", 11, protoreflect.BoolKind},
		{&workloadapi.Service{}, "visibility", 14, protoreflect.EnumKind},
		{&workloadapi.Port{}, "app_protocol", 3, protoreflect.EnumKind},
		{&workloadapi.NetworkAddress{}, "length", 3, protoreflect.Uint32Kind},
		{&workloadapi.GatewayAddress{}, "hbone_mtls_port", 3, protoreflect.Uint32Kind},
		{&security.Authorization{}, "scope", 3, protoreflect.EnumKind},
		{&security.Authorization{}, "action", 4, protoreflect.EnumKind},
		{&security.Authorization{}, "groups", 5, protoreflect.MessageKind},
		{&security.Authorization{}, "dry_run", 6, protoreflect.BoolKind},
		{&security.Rules{}, "matches", 2, protoreflect.MessageKind},
		{&security.Match{}, "service_accounts", 11, protoreflect.MessageKind},
		{&security.Match{}, "not_principals", 4, protoreflect.MessageKind},
		{&security.Match{}, "destination_ports", 9, protoreflect.Uint32Kind},
		{&security.Match{}, "not_destination_ports", 10, protoreflect.Uint32Kind},
		{&security.ServiceAccountMatch{}, "serviceAccount", 2, protoreflect.StringKind},
		{&security.StringMatch{}, "presence", 4, protoreflect.MessageKind},
	}
	for _, c := range cases {
		md := c.msg.ProtoReflect().Descriptor()
		f := md.Fields().ByName(c.field)
		if f == nil {
			t.Errorf("%s has no field %s", md.FullName(), c.field)
			continue
		}
		if f.Number() != c.number || f.Kind() != c.kind {
			t.Errorf("%s.%s = %d %v, want %d %v", md.FullName(), c.field, f.Number(), f.Kind(), c.number, c.kind)
		}
	}
	if n := workloadapi.TunnelProtocol_HBONE.Number(); n != 1 {
		t.Errorf("HBONE = %d, want 1", n)
	}
	if n := security.Action_DENY.Number(); n != 1 {
		t.Errorf("DENY = %d, want 1", n)
	}
	if n := security.Scope_WORKLOAD_SELECTOR.Number(); n != 2 {
		t.Errorf("WORKLOAD_SELECTOR = %d, want 2", n)
	}
}

// TestDecodeHandEncoded decodes bytes built field by field, as istiod would
// put them on the wire, without going through our generated marshaller.
func TestDecodeHandEncoded(t *testing.T) {
	var w []byte
	w = protowire.AppendTag(w, 20, protowire.BytesType)
	w = protowire.AppendString(w, "Kubernetes//Pod/default/sleep")
	w = protowire.AppendTag(w, 3, protowire.BytesType)
	w = protowire.AppendBytes(w, []byte{10, 0, 0, 1})
	w = protowire.AppendTag(w, 5, protowire.VarintType)
	w = protowire.AppendVarint(w, 1)
	var addr []byte
	addr = protowire.AppendTag(addr, 1, protowire.BytesType)
	addr = protowire.AppendBytes(addr, w)

	var got workloadapi.Address
	if err := proto.Unmarshal(addr, &got); err != nil {
		t.Fatal(err)
	}
	wl := got.GetWorkload()
	if wl.GetUid() != "Kubernetes//Pod/default/sleep" || len(wl.GetAddresses()) != 1 || wl.GetTunnelProtocol() != workloadapi.TunnelProtocol_HBONE {
		t.Errorf("decoded %v", wl)
	}
}
