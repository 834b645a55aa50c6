package admin_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	adminv3 "github.com/envoyproxy/go-control-plane/envoy/admin/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	luav3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/lua/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/amber-mesh/amber/test/waypointgolden"
	"github.com/amber-mesh/amber/waypoint/admin"
	"github.com/amber-mesh/amber/waypoint/config"
	"github.com/amber-mesh/amber/waypoint/discovery"
)

const productpage = "inbound-vip|9080|http|productpage.default.svc.cluster.local"

func golden(t *testing.T, scenario string) *waypointgolden.Snapshot {
	t.Helper()
	s, err := waypointgolden.Latest(scenario)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// fill applies s to a new set through its own handlers, as the xDS client
// would.
func fill(t *testing.T, s *waypointgolden.Snapshot) *discovery.Set {
	t.Helper()
	rs, err := waypointgolden.Resources(s)
	if err != nil {
		t.Fatal(err)
	}
	set := discovery.New(nil)
	for _, ty := range set.Types() {
		ty.Handler.Apply(rs[ty.URL], nil)
	}
	return set
}

func selfSigned(t *testing.T) *tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse("spiffe://cluster.local/ns/default/sa/waypoint")
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), URIs: []*url.URL{u}, NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	return &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
}

func get(t *testing.T, h http.Handler, target string) (int, []byte) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, target, nil))
	body, _ := io.ReadAll(rec.Result().Body)
	return rec.Code, body
}

// parseDump parses as istioctl does, but strictly: every field must be
// Envoy's and every Any a known type.
func parseDump(t *testing.T, body []byte) *adminv3.ConfigDump {
	t.Helper()
	d := &adminv3.ConfigDump{}
	if err := protojson.Unmarshal(body, d); err != nil {
		t.Fatalf("config_dump does not parse as envoy.admin.v3.ConfigDump: %v\n%.2000s", err, body)
	}
	return d
}

func section[M proto.Message](t *testing.T, d *adminv3.ConfigDump, m M) M {
	t.Helper()
	for _, a := range d.GetConfigs() {
		if a.MessageIs(m) {
			if err := a.UnmarshalTo(m); err != nil {
				t.Fatal(err)
			}
			return m
		}
	}
	t.Fatalf("no %T section", m)
	return m
}

func TestConfigDump(t *testing.T) {
	g := golden(t, "httproute-reviews-90-10")
	started := time.Now().Add(-time.Minute)
	cert := selfSigned(t)
	h := admin.Handler(admin.Source{
		Set:         fill(t, g),
		Node:        &corev3.Node{Id: "waypoint~10.244.0.20~waypoint-x.default~default.svc.cluster.local", Cluster: "waypoint.default"},
		Started:     started,
		Certificate: func(context.Context) (*tls.Certificate, error) { return cert, nil },
		RootPEM:     []byte("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"),
	})
	code, body := get(t, h, "/config_dump")
	if code != http.StatusOK {
		t.Fatalf("config_dump: %d %s", code, body)
	}
	// Envoy's JSON: proto field names.
	if !strings.Contains(string(body), `"dynamic_listeners"`) || !strings.Contains(string(body), `"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump"`) {
		t.Errorf("not Envoy's field names:\n%.500s", body)
	}
	d := parseDump(t, body)
	var types []string
	for _, a := range d.GetConfigs() {
		types = append(types, strings.TrimPrefix(a.GetTypeUrl(), "type.googleapis.com/envoy.admin.v3."))
	}
	if want := []string{"BootstrapConfigDump", "ClustersConfigDump", "ListenersConfigDump", "RoutesConfigDump", "SecretsConfigDump"}; !slices.Equal(types, want) {
		t.Errorf("sections %v, want %v", types, want)
	}

	bs := section(t, d, &adminv3.BootstrapConfigDump{})
	if bs.GetBootstrap().GetNode().GetId() != "waypoint~10.244.0.20~waypoint-x.default~default.svc.cluster.local" || !bs.GetLastUpdated().AsTime().Equal(started.Truncate(time.Nanosecond)) {
		t.Errorf("bootstrap %v", bs)
	}

	var listeners []string
	for _, l := range section(t, d, &adminv3.ListenersConfigDump{}).GetDynamicListeners() {
		m := &listenerv3.Listener{}
		if err := l.GetActiveState().GetListener().UnmarshalTo(m); err != nil {
			t.Fatal(err)
		}
		if m.GetName() != l.GetName() || l.GetActiveState().GetVersionInfo() != "golden" || l.GetClientStatus() != adminv3.ClientResourceStatus_ACKED || l.GetErrorState() != nil {
			t.Errorf("listener %s: version %q, status %v, error %v", l.GetName(), l.GetActiveState().GetVersionInfo(), l.GetClientStatus(), l.GetErrorState())
		}
		listeners = append(listeners, m.GetName())
	}
	var wantListeners []string
	for _, l := range g.Listeners {
		wantListeners = append(wantListeners, l.GetName())
	}
	if !slices.Equal(listeners, wantListeners) {
		t.Errorf("listeners %v, want %v", listeners, wantListeners)
	}

	var clusters []string
	for _, c := range section(t, d, &adminv3.ClustersConfigDump{}).GetDynamicActiveClusters() {
		m := &clusterv3.Cluster{}
		if err := c.GetCluster().UnmarshalTo(m); err != nil {
			t.Fatal(err)
		}
		clusters = append(clusters, m.GetName())
	}
	if len(clusters) != len(g.Clusters) || !slices.Contains(clusters, productpage) {
		t.Errorf("clusters %v", clusters)
	}

	// The weighted route of the HTTPRoute, inline in main_internal, listed
	// as a static route configuration.
	found := false
	for _, r := range section(t, d, &adminv3.RoutesConfigDump{}).GetStaticRouteConfigs() {
		rc := &routev3.RouteConfiguration{}
		if err := r.GetRouteConfig().UnmarshalTo(rc); err != nil {
			t.Fatal(err)
		}
		for _, vh := range rc.GetVirtualHosts() {
			for _, rt := range vh.GetRoutes() {
				if len(rt.GetRoute().GetWeightedClusters().GetClusters()) == 2 {
					found = true
				}
			}
		}
	}
	if !found {
		t.Error("no route with the 90/10 weighted clusters")
	}

	secrets := section(t, d, &adminv3.SecretsConfigDump{}).GetDynamicActiveSecrets()
	if len(secrets) != 2 || secrets[0].GetName() != admin.SecretDefault || secrets[1].GetName() != admin.SecretRoots {
		t.Fatalf("secrets %v", secrets)
	}
	sec := &tlsv3.Secret{}
	if err := secrets[0].GetSecret().UnmarshalTo(sec); err != nil {
		t.Fatal(err)
	}
	if sec.GetTlsCertificate().GetPrivateKey().GetInlineString() != "[redacted]" || !strings.Contains(string(sec.GetTlsCertificate().GetCertificateChain().GetInlineBytes()), "BEGIN CERTIFICATE") {
		t.Errorf("certificate secret %v", sec)
	}
	if strings.Contains(string(body), "PRIVATE KEY") {
		t.Error("the private key is in the dump")
	}

	// Endpoints only when asked for.
	_, body = get(t, h, "/config_dump?include_eds")
	eds := section(t, parseDump(t, body), &adminv3.EndpointsConfigDump{})
	if len(eds.GetDynamicEndpointConfigs()) != len(g.Endpoints) {
		t.Errorf("%d endpoint configs, want %d", len(eds.GetDynamicEndpointConfigs()), len(g.Endpoints))
	}
}

// TestConfigDumpMask: istioctl asks for sections with a field mask; each
// section keeps only the named fields.
func TestConfigDumpMask(t *testing.T) {
	h := admin.Handler(admin.Source{Set: fill(t, golden(t, "base")), Node: &corev3.Node{Id: "n"}})
	code, body := get(t, h, "/config_dump?mask=dynamic_listeners,static_listeners")
	if code != http.StatusOK {
		t.Fatalf("%d %s", code, body)
	}
	d := parseDump(t, body)
	if n := len(section(t, d, &adminv3.ListenersConfigDump{}).GetDynamicListeners()); n == 0 {
		t.Error("no listeners under the listener mask")
	}
	if c := section(t, d, &adminv3.ClustersConfigDump{}); len(c.GetDynamicActiveClusters()) != 0 {
		t.Error("clusters survived the listener mask")
	}
	if b := section(t, d, &adminv3.BootstrapConfigDump{}); b.GetBootstrap() != nil {
		t.Error("bootstrap survived the listener mask")
	}

	// A nested path keeps part of each element.
	_, body = get(t, h, "/config_dump?mask=dynamic_listeners.name")
	for _, l := range section(t, parseDump(t, body), &adminv3.ListenersConfigDump{}).GetDynamicListeners() {
		if l.GetName() == "" || l.GetActiveState() != nil {
			t.Errorf("listener under mask name: %v", l)
		}
	}

	for _, q := range []string{"resource=dynamic_listeners", "name_regex=x", "mask=,"} {
		if code, _ := get(t, h, "/config_dump?"+q); code != http.StatusBadRequest {
			t.Errorf("%s: %d", q, code)
		}
	}
}

// TestConfigDumpNACKed: what the compiler refused is listed as installed,
// NACKED, with the problem; an Any of a type the binary does not know is
// shown by its type URL.
func TestConfigDumpNACKed(t *testing.T) {
	// A filter of a type this binary cannot know.
	unknown, err := anypb.New(&luav3.Lua{})
	if err != nil {
		t.Fatal(err)
	}
	unknown.TypeUrl = "type.googleapis.com/example.Unknown"
	g, err := waypointgolden.WithHTTPFilter(golden(t, "base"), config.MainInternal, productpage,
		&hcmv3.HttpFilter{Name: "x", ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: unknown}})
	if err != nil {
		t.Fatal(err)
	}
	h := admin.Handler(admin.Source{Set: fill(t, g)})
	code, body := get(t, h, "/config_dump")
	if code != http.StatusOK {
		t.Fatalf("%d %s", code, body)
	}
	if !strings.Contains(string(body), `"@type": "type.googleapis.com/example.Unknown"`) {
		t.Error("the unknown Any is not shown by its type")
	}
	// istioctl reads unknown types leniently; so does this check.
	d := &adminv3.ConfigDump{}
	if err := (protojson.UnmarshalOptions{DiscardUnknown: true, Resolver: admin.LenientResolver}).Unmarshal(body, d); err != nil {
		t.Fatal(err)
	}
	for _, l := range section(t, d, &adminv3.ListenersConfigDump{}).GetDynamicListeners() {
		nacked := l.GetClientStatus() == adminv3.ClientResourceStatus_NACKED
		if nacked != (l.GetName() == config.MainInternal) {
			t.Errorf("listener %s: status %v", l.GetName(), l.GetClientStatus())
		}
		if nacked && (!strings.Contains(l.GetErrorState().GetDetails(), "example.Unknown") || l.GetActiveState() == nil) {
			t.Errorf("main_internal: %v", l)
		}
	}
}

func TestClusters(t *testing.T) {
	h := admin.Handler(admin.Source{Set: fill(t, golden(t, "base"))})
	code, body := get(t, h, "/clusters?format=json")
	if code != http.StatusOK {
		t.Fatalf("%d %s", code, body)
	}
	cs := &adminv3.Clusters{}
	if err := protojson.Unmarshal(body, cs); err != nil {
		t.Fatalf("does not parse as envoy.admin.v3.Clusters: %v", err)
	}
	var hosts []string
	for _, c := range cs.GetClusterStatuses() {
		if c.GetName() != productpage {
			continue
		}
		for _, h := range c.GetHostStatuses() {
			ia := h.GetAddress().GetEnvoyInternalAddress()
			hosts = append(hosts, ia.GetServerListenerName()+"/"+ia.GetEndpointId())
			if h.GetHealthStatus().GetEdsHealthStatus() != corev3.HealthStatus_HEALTHY || h.GetWeight() != 1 {
				t.Errorf("host %v", h)
			}
		}
	}
	if !slices.Equal(hosts, []string{"connect_originate/10.244.0.10:9080"}) {
		t.Errorf("productpage hosts %v", hosts)
	}
	_, text := get(t, h, "/clusters")
	if !strings.Contains(string(text), productpage+"::envoy://connect_originate/10.244.0.10:9080::health_flags::healthy") {
		t.Errorf("text format:\n%s", text)
	}
	var anything map[string]any
	if json.Unmarshal(body, &anything) != nil {
		t.Error("not JSON")
	}
}
