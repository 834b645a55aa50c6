package config

import (
	"net/netip"
	"testing"

	xdscorev3 "github.com/cncf/xds/go/xds/core/v3"
	xdsmatcherv3 "github.com/cncf/xds/go/xds/type/matcher/v3"
	networkinputv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/matching/common_inputs/network/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// TestDispatchTree evaluates the matcher shapes istiod builds for
// main_internal (pilot/pkg/networking/core/match): destination IP, then
// port, then, for ports of unknown protocol, the sniffed application
// protocol with TCP as the fallback; workload IPs straight to the
// protocol matcher.
func TestDispatchTree(t *testing.T) {
	input := func(m protoMessage) *xdscorev3.TypedExtensionConfig {
		return &xdscorev3.TypedExtensionConfig{Name: "in", TypedConfig: mustAny(t, m)}
	}
	chain := func(name string) *xdsmatcherv3.Matcher_OnMatch {
		return &xdsmatcherv3.Matcher_OnMatch{OnMatch: &xdsmatcherv3.Matcher_OnMatch_Action{Action: &xdscorev3.TypedExtensionConfig{
			Name: name, TypedConfig: mustAny(t, wrapperspb.String(name))}}}
	}
	sub := func(m *xdsmatcherv3.Matcher) *xdsmatcherv3.Matcher_OnMatch {
		return &xdsmatcherv3.Matcher_OnMatch{OnMatch: &xdsmatcherv3.Matcher_OnMatch_Matcher{Matcher: m}}
	}
	exact := func(in protoMessage, m map[string]*xdsmatcherv3.Matcher_OnMatch, noMatch *xdsmatcherv3.Matcher_OnMatch) *xdsmatcherv3.Matcher {
		return &xdsmatcherv3.Matcher{OnNoMatch: noMatch, MatcherType: &xdsmatcherv3.Matcher_MatcherTree_{MatcherTree: &xdsmatcherv3.Matcher_MatcherTree{
			Input: input(in), TreeType: &xdsmatcherv3.Matcher_MatcherTree_ExactMatchMap{ExactMatchMap: &xdsmatcherv3.Matcher_MatcherTree_MatchMap{Map: m}}}}}
	}
	sniff := func(http, tcp string) *xdsmatcherv3.Matcher {
		return exact(&networkinputv3.ApplicationProtocolInput{}, map[string]*xdsmatcherv3.Matcher_OnMatch{
			"'h2c'": chain(http), "'http/1.1'": chain(http)}, chain(tcp))
	}
	ip := &xdsmatcherv3.IPMatcher{RangeMatchers: []*xdsmatcherv3.IPMatcher_IPRangeMatcher{
		{Ranges: []*xdscorev3.CidrRange{{AddressPrefix: "10.96.10.1", PrefixLen: wrapperspb.UInt32(32)}},
			OnMatch: sub(exact(&networkinputv3.DestinationPortInput{}, map[string]*xdsmatcherv3.Matcher_OnMatch{
				"9080": chain("http-9080"),
				"7000": sub(sniff("http-7000", "tcp-7000")),
			}, nil))},
		{Ranges: []*xdscorev3.CidrRange{{AddressPrefix: "10.244.0.10", PrefixLen: wrapperspb.UInt32(32)}},
			OnMatch: sub(sniff("direct-http", "direct-tcp"))},
	}}
	root := &xdsmatcherv3.Matcher{MatcherType: &xdsmatcherv3.Matcher_MatcherTree_{MatcherTree: &xdsmatcherv3.Matcher_MatcherTree{
		Input: input(&networkinputv3.DestinationIPInput{}),
		TreeType: &xdsmatcherv3.Matcher_MatcherTree_CustomMatch{CustomMatch: &xdscorev3.TypedExtensionConfig{
			Name: "ip", TypedConfig: mustAny(t, ip)}}}}}
	refs := map[string]bool{}
	n, err := compileMatcher(root, refs)
	if err != nil {
		t.Fatal(err)
	}
	d := &Dispatch{root: n, Chains: map[string]*Chain{}}
	for name := range refs {
		d.Chains[name] = &Chain{Name: name}
	}
	cases := []struct {
		dst, proto string
		want       string
		sniffed    bool
	}{
		{"10.96.10.1:9080", "http/1.1", "http-9080", false},
		{"10.96.10.1:7000", "h2c", "http-7000", true},
		{"10.96.10.1:7000", "", "tcp-7000", true},
		{"10.96.10.1:8000", "http/1.1", "", false}, // no chain: Envoy closes
		{"10.244.0.10:3306", "", "direct-tcp", true},
		{"10.244.0.10:8080", "http/1.1", "direct-http", true},
		{"[::ffff:10.96.10.1]:9080", "", "http-9080", false},
		{"10.0.0.1:9080", "", "", false},
	}
	for _, c := range cases {
		sniffed := false
		ch := d.Lookup(Input{Destination: netip.MustParseAddrPort(c.dst), Protocol: func() string { sniffed = true; return c.proto }})
		got := ""
		if ch != nil {
			got = ch.Name
		}
		if got != c.want || sniffed != c.sniffed {
			t.Errorf("%s (%q): chain %q sniffed %v, want %q sniffed %v", c.dst, c.proto, got, sniffed, c.want, c.sniffed)
		}
	}
}
