package server_test

import (
	"bufio"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/amber-mesh/amber/xds/server"
	"github.com/amber-mesh/amber/xds/state"
	"github.com/amber-mesh/amber/xds/workloadapi"
	"github.com/amber-mesh/amber/xds/workloadapi/security"
)

// docExample returns the mesh file example from the package documentation,
// so the documented format is tested.
func docExample(t *testing.T) []byte {
	t.Helper()
	f, err := os.Open("doc.go")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b strings.Builder
	in := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "// # Mesh file":
			in = true
		case in && strings.HasPrefix(line, "//\t"):
			b.WriteString(strings.TrimPrefix(line, "//\t") + "\n")
		case in && b.Len() > 0 && line == "//":
			b.WriteString("\n")
		case in && b.Len() > 0:
			return []byte(b.String())
		}
	}
	t.Fatal("no example in doc.go")
	return nil
}

func mustParse(t *testing.T, yaml string) *server.Resources {
	t.Helper()
	r, err := server.ParseMesh([]byte(yaml))
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestParseDocExample(t *testing.T) {
	r, err := server.ParseMesh(docExample(t))
	if err != nil {
		t.Fatalf("the documented example does not parse: %v", err)
	}
	if got := slices.Sorted(mapsKeys(r.Addresses)); !slices.Equal(got, []string{
		"Kubernetes//Pod/default/productpage-v1",
		"Kubernetes//Pod/default/sleep",
		"default/productpage.default.svc.cluster.local",
	}) {
		t.Errorf("addresses = %v", got)
	}
	pp := r.Addresses["Kubernetes//Pod/default/productpage-v1"].GetWorkload()
	// The file's resources must pass the same validation the client does.
	w, err := state.NewWorkload(pp)
	if err != nil {
		t.Fatal(err)
	}
	if w.ServiceAccount != "bookinfo-productpage" || w.Protocol != state.ProtocolHBONE || w.Node != "node-a" {
		t.Errorf("productpage = %+v", w)
	}
	if !slices.Equal(w.AuthorizationPolicies, []string{"default/productpage-viewer"}) {
		t.Errorf("productpage policies = %v", w.AuthorizationPolicies)
	}
	key := state.NamespacedHostname{Namespace: "default", Hostname: "productpage.default.svc.cluster.local"}
	if w.Services[key][9080] != 9080 {
		t.Errorf("productpage services = %v", w.Services)
	}
	sleep, err := state.NewWorkload(r.Addresses["Kubernetes//Pod/default/sleep"].GetWorkload())
	if err != nil {
		t.Fatal(err)
	}
	if len(sleep.AuthorizationPolicies) != 0 {
		t.Errorf("sleep selected by %v", sleep.AuthorizationPolicies)
	}
	svc, err := state.NewService(r.Addresses[key.String()].GetService())
	if err != nil {
		t.Fatal(err)
	}
	if len(svc.VIPs) != 2 || svc.Waypoint == nil || svc.Waypoint.HBONEPort != 15008 || svc.Ports[9080].AppProtocol != workloadapi.AppProtocol_HTTP11 {
		t.Errorf("service = %+v", svc)
	}

	p := r.Authorizations["default/productpage-viewer"]
	if _, err := state.NewAuthorization(p); err != nil {
		t.Fatal(err)
	}
	if p.GetScope() != security.Scope_WORKLOAD_SELECTOR || p.GetAction() != security.Action_ALLOW || len(p.GetGroups()) != 1 {
		t.Fatalf("policy = %v", p)
	}
	// to, from and each when are ANDed rules.
	rules := p.GetGroups()[0].GetRules()
	if len(rules) != 3 {
		t.Fatalf("rules = %v", rules)
	}
	if got := rules[0].GetMatches()[0].GetDestinationPorts(); !slices.Equal(got, []uint32{9080}) {
		t.Errorf("to ports = %v", got)
	}
	if got := rules[1].GetMatches()[0].GetPrincipals()[0].GetExact(); got != "cluster.local/ns/default/sa/sleep" {
		t.Errorf("principal = %q", got)
	}
	src := rules[2].GetMatches()[0].GetSourceIps()[0]
	if netip.PrefixFrom(netip.AddrFrom4([4]byte(src.GetAddress())), int(src.GetLength())) != netip.MustParsePrefix("10.0.0.0/8") {
		t.Errorf("when source.ip = %v", src)
	}
	if len(r.Warnings) != 0 {
		t.Errorf("warnings = %v", r.Warnings)
	}
}

func mapsKeys[V any](m map[string]V) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

func TestParseErrors(t *testing.T) {
	cases := []struct {
		name, yaml, want string
	}{
		{"unknown top-level field", "workload: []", `unknown field "workload"`},
		{"unknown workload field", "workloads: [{name: a, addresses: [10.0.0.1], serviceacount: x}]", `unknown field "serviceacount"`},
		{"unknown rule field", "policies: [{name: p, rules: [{from: [{source: {principal: [x]}}]}]}]", `unknown field "principal"`},
		{"duplicate key", "workloads: [{name: a, name: b, addresses: [10.0.0.1]}]", `key "name" already set`},
		{"not yaml", "workloads: [", "parse mesh file"},
		{"bad address", "workloads: [{name: a, addresses: [10.0.0.256]}]", `workloads[0] (default/a): address "10.0.0.256" is not an IP address`},
		{"no address", "workloads: [{name: a}]", "needs addresses or a hostname"},
		{"no name", "workloads: [{addresses: [10.0.0.1]}]", "name is required"},
		{"bad protocol", "workloads: [{name: a, addresses: [10.0.0.1], protocol: QUIC}]", `protocol "QUIC"`},
		{"address clash", "workloads: [{name: a, addresses: [10.0.0.1]}, {name: b, addresses: [10.0.0.1]}]", "already used by workload default/a"},
		{"duplicate uid", "workloads: [{name: a, addresses: [10.0.0.1]}, {name: a, addresses: [10.0.0.2]}]", "duplicate workload uid"},
		{"unknown service", "workloads: [{name: a, addresses: [10.0.0.1], services: [{service: nope}]}]", "no service default/nope"},
		{"unknown service port", "services: [{name: s, ports: [{port: 80}]}]\nworkloads: [{name: a, addresses: [10.0.0.1], services: [{service: s, ports: [{port: 81}]}]}]", "has no port 81"},
		{"port out of range", "services: [{name: s, ports: [{port: 70000}]}]", "70000"},
		{"port zero", "services: [{name: s, ports: [{port: 0}]}]", "port is required"},
		{"bad app protocol", "services: [{name: s, ports: [{port: 80, appProtocol: SPDY}]}]", `appProtocol "SPDY"`},
		{"bad vip", "services: [{name: s, addresses: [10.0.0.0/33]}]", "not an IP or CIDR"},
		{"waypoint both", "workloads: [{name: a, addresses: [10.0.0.1], waypoint: {address: 10.0.0.9, hostname: w}}]", "not both"},
		{"waypoint none", "workloads: [{name: a, addresses: [10.0.0.1], waypoint: {port: 15008}}]", "needs an address or a hostname"},
		{"bad action", "policies: [{name: p, action: AUDIT}]", `action "AUDIT"`},
		{"bad scope", "policies: [{name: p, scope: Cluster}]", `scope "Cluster"`},
		{"selector without scope", "policies: [{name: p, scope: Namespace, selector: {matchLabels: {app: a}}}]", "go together"},
		{"scope without selector", "policies: [{name: p, scope: WorkloadSelector}]", "go together"},
		{"empty selector", "policies: [{name: p, selector: {}}]", "selector needs matchLabels"},
		{"duplicate policy", "policies: [{name: p}, {name: p}]", "duplicate policy"},
		{"bad ip block", "policies: [{name: p, rules: [{from: [{source: {ipBlocks: [10.0.0.0/40]}}]}]}]", `"10.0.0.0/40" is not an IP or CIDR`},
		{"bad port string", `policies: [{name: p, rules: [{to: [{operation: {ports: ["http"]}}]}]}]`, `"http" is not a port`},
		{"bad when port", "policies: [{name: p, rules: [{when: [{key: destination.port, values: [99999]}]}]}]", `"99999" is not a port`},
		{"bad service account", "policies: [{name: p, rules: [{from: [{source: {serviceAccounts: [a/b/c]}}]}]}]", "is not [namespace/]serviceaccount"},
		{"when without key", "policies: [{name: p, rules: [{when: [{values: [a]}]}]}]", "key is required"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r, err := server.ParseMesh([]byte(c.yaml))
			if err == nil {
				t.Fatalf("accepted: %+v", r)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %q does not contain %q", err, c.want)
			}
		})
	}

	// Every problem is reported, not just the first.
	_, err := server.ParseMesh([]byte("workloads: [{name: a}, {name: b, addresses: [x]}]"))
	if err == nil || !strings.Contains(err.Error(), "default/a") || !strings.Contains(err.Error(), "default/b") {
		t.Errorf("error %v does not report both workloads", err)
	}
}

func TestParseEmpty(t *testing.T) {
	r := mustParse(t, "")
	if len(r.Addresses) != 0 || len(r.Authorizations) != 0 {
		t.Errorf("empty file gave %+v", r)
	}
}

func TestParsePolicyScopes(t *testing.T) {
	r := mustParse(t, `
rootNamespace: mesh-root
workloads:
  - {name: a, namespace: apps, addresses: [10.0.0.1], labels: {app: a}}
  - {name: b, namespace: other, addresses: [10.0.0.2], labels: {app: a}}
policies:
  - {name: global, namespace: mesh-root}
  - {name: ns, namespace: apps}
  - {name: sel, namespace: apps, selector: {matchLabels: {app: a}}}
  - {name: rootsel, namespace: mesh-root, selector: {matchLabels: {app: a}}}
  - {name: forced, namespace: apps, scope: GLOBAL}
`)
	scopes := map[string]security.Scope{
		"mesh-root/global":  security.Scope_GLOBAL,
		"apps/ns":           security.Scope_NAMESPACE,
		"apps/sel":          security.Scope_WORKLOAD_SELECTOR,
		"mesh-root/rootsel": security.Scope_WORKLOAD_SELECTOR,
		"apps/forced":       security.Scope_GLOBAL,
	}
	for k, want := range scopes {
		if got := r.Authorizations[k].GetScope(); got != want {
			t.Errorf("%s scope = %v, want %v", k, got, want)
		}
	}
	// A selector policy selects in its own namespace; a root-namespace one
	// selects everywhere (istiod's rule).
	a := r.Addresses["Kubernetes//Pod/apps/a"].GetWorkload().GetAuthorizationPolicies()
	b := r.Addresses["Kubernetes//Pod/other/b"].GetWorkload().GetAuthorizationPolicies()
	if !slices.Equal(a, []string{"apps/sel", "mesh-root/rootsel"}) {
		t.Errorf("a policies = %v", a)
	}
	if !slices.Equal(b, []string{"mesh-root/rootsel"}) {
		t.Errorf("b policies = %v", b)
	}
}

// TestParseL7 checks the fail-closed treatment of HTTP-only fields against
// istiod's ambient conversion: an ALLOW rule using them is dropped (it can
// never allow), a DENY rule keeps only its L4 conditions (it denies more).
func TestParseL7(t *testing.T) {
	r := mustParse(t, `
policies:
  - name: allow-get
    action: ALLOW
    rules:
      - to: [{operation: {methods: [GET], ports: ["80"]}}]
      - from: [{source: {namespaces: [ok]}}]
  - name: allow-only-l7
    rules:
      - from: [{source: {requestPrincipals: ["*"]}}]
      - when: [{key: "request.headers[x-user]", values: [alice]}]
  - name: deny-post
    action: DENY
    rules:
      - from: [{source: {principals: ["cluster.local/ns/x/sa/y"]}}]
        to: [{operation: {methods: [POST], ports: [8080]}}]
  - name: deny-paths
    action: DENY
    rules:
      - to: [{operation: {paths: [/admin]}}]
  - name: deny-header
    action: DENY
    rules:
      - when: [{key: "request.headers[x-evil]", values: ["1"]}]
  - name: allow-all
    rules: [{}]
  - name: allow-nothing
`)
	// ALLOW: the L7 rule is gone, the L4 rule stays.
	allow := r.Authorizations["default/allow-get"]
	if len(allow.GetGroups()) != 1 || allow.GetGroups()[0].GetRules()[0].GetMatches()[0].GetNamespaces()[0].GetExact() != "ok" {
		t.Errorf("allow-get = %v", allow)
	}
	// ALLOW with only L7 rules has no group: it applies but matches
	// nothing, so it allows nothing.
	if g := r.Authorizations["default/allow-only-l7"].GetGroups(); len(g) != 0 {
		t.Errorf("allow-only-l7 groups = %v", g)
	}
	// DENY: methods ignored, principal and port kept.
	deny := r.Authorizations["default/deny-post"]
	rules := deny.GetGroups()[0].GetRules()
	if len(rules) != 2 || !slices.Equal(rules[0].GetMatches()[0].GetDestinationPorts(), []uint32{8080}) ||
		rules[1].GetMatches()[0].GetPrincipals()[0].GetExact() != "cluster.local/ns/x/sa/y" {
		t.Errorf("deny-post = %v", deny)
	}
	// DENY with only L7: an empty match, which matches every connection.
	for _, name := range []string{"default/deny-paths", "default/deny-header"} {
		g := r.Authorizations[name].GetGroups()
		if len(g) != 1 || len(g[0].GetRules()) != 1 || len(g[0].GetRules()[0].GetMatches()) != 1 {
			t.Fatalf("%s groups = %v", name, g)
		}
		m := g[0].GetRules()[0].GetMatches()[0]
		if m.GetDestinationPorts() != nil || m.GetPrincipals() != nil || m.GetSourceIps() != nil {
			t.Errorf("%s match is not empty: %v", name, m)
		}
	}
	// rules: [{}] is a group with no conditions (allow all); no rules at
	// all is no group (allow nothing).
	if g := r.Authorizations["default/allow-all"].GetGroups(); len(g) != 1 || len(g[0].GetRules()) != 0 {
		t.Errorf("allow-all groups = %v", g)
	}
	if g := r.Authorizations["default/allow-nothing"].GetGroups(); len(g) != 0 {
		t.Errorf("allow-nothing groups = %v", g)
	}
	if len(r.Warnings) != 6 {
		t.Errorf("want 6 warnings, got %q", r.Warnings)
	}
	for _, p := range r.Authorizations {
		if _, err := state.NewAuthorization(p); err != nil {
			t.Error(err)
		}
	}
}

func TestParseWildcardsAndServiceAccounts(t *testing.T) {
	r := mustParse(t, `
policies:
  - name: p
    namespace: apps
    rules:
      - from:
          - source:
              principals: ["*", "cluster.local/*", "*/sa/sleep", exact]
              serviceAccounts: [sleep, other/bot]
`)
	m := r.Authorizations["apps/p"].GetGroups()[0].GetRules()[0].GetMatches()[0]
	ps := m.GetPrincipals()
	if ps[0].GetPresence() == nil || ps[1].GetPrefix() != "cluster.local/" || ps[2].GetSuffix() != "/sa/sleep" || ps[3].GetExact() != "exact" {
		t.Errorf("principals = %v", ps)
	}
	sas := m.GetServiceAccounts()
	if sas[0].GetNamespace() != "apps" || sas[0].GetServiceAccount() != "sleep" || sas[1].GetNamespace() != "other" || sas[1].GetServiceAccount() != "bot" {
		t.Errorf("service accounts = %v", sas)
	}
}
