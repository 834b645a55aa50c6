package config

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"

	xdscorev3 "github.com/cncf/xds/go/xds/core/v3"
	xdsmatcherv3 "github.com/cncf/xds/go/xds/type/matcher/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	networkinputv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/matching/common_inputs/network/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Dispatch is main_internal: the internal listener a terminated CONNECT
// stream enters, which picks a filter chain from the stream's original
// destination (the CONNECT :authority, VIP:port or podIP:port) and, for
// ports of unknown protocol, from the sniffed application protocol.
type Dispatch struct {
	// Chains are the filter chains by name. A chain with Err set refuses
	// its traffic.
	Chains map[string]*Chain
	// Sniff is true when the listener runs http_inspector for some ports;
	// Lookup then may call Input.Protocol.
	Sniff bool

	root *node
}

// Input is what main_internal dispatches on.
type Input struct {
	// Destination is the original destination from the CONNECT :authority.
	Destination netip.AddrPort
	// Authority is the CONNECT :authority as sent
	// (io.istio.connect_authority; matched by hostname only in
	// multi-network setups).
	Authority string
	// Protocol detects the stream's application protocol the way Envoy's
	// http_inspector does: "h2c", "http/1.1", "http/1.0", or "" for
	// anything else. Lookup calls it at most once, and only for a port
	// that needs it. Nil means "".
	Protocol func() string
}

// Lookup returns the filter chain for in, or nil when none matches:
// Envoy then closes the stream (no filter chain found).
func (d *Dispatch) Lookup(in Input) *Chain {
	if d == nil || d.root == nil {
		return nil
	}
	var proto *string
	detect := func() string {
		if proto == nil {
			p := ""
			if in.Protocol != nil {
				p = in.Protocol()
			}
			proto = &p
		}
		return *proto
	}
	name, ok := d.root.eval(&in, detect)
	if !ok {
		return nil
	}
	return d.Chains[name]
}

type inputKind uint8

const (
	inputDestinationIP inputKind = iota + 1
	inputDestinationPort
	inputAppProtocol
	inputAuthority
)

// node is one compiled xds.type.matcher.v3.Matcher.
type node struct {
	input     inputKind
	ranges    []ipRange // custom "ip" matcher
	exact     map[string]*onMatch
	onNoMatch *onMatch
}

type ipRange struct {
	prefix    netip.Prefix
	exclusive bool
	on        *onMatch
}

// onMatch is a chain name or a nested matcher.
type onMatch struct {
	chain string
	next  *node
}

func (n *node) eval(in *Input, detect func() string) (string, bool) {
	if n.input == inputDestinationIP && n.ranges != nil {
		addr := in.Destination.Addr().Unmap()
		// Longest prefix first; a more specific range whose nested
		// matcher fails gives way to shorter ones that are not exclusive
		// (Envoy's IP matcher).
		var hits []ipRange
		for _, r := range n.ranges {
			if addr.IsValid() && r.prefix.Contains(addr) {
				hits = append(hits, r)
			}
		}
		slices.SortStableFunc(hits, func(a, b ipRange) int { return b.prefix.Bits() - a.prefix.Bits() })
		for i, r := range hits {
			if i > 0 && r.exclusive {
				continue
			}
			if name, ok := r.on.eval(in, detect); ok {
				return name, true
			}
		}
		return n.onNoMatch.eval(in, detect)
	}
	var key string
	switch n.input {
	case inputDestinationIP:
		key = in.Destination.Addr().Unmap().String()
	case inputDestinationPort:
		key = strconv.Itoa(int(in.Destination.Port()))
	case inputAppProtocol:
		if p := detect(); p != "" {
			key = "'" + p + "'"
		}
	case inputAuthority:
		key = in.Authority
	}
	if m, ok := n.exact[key]; ok && key != "" {
		if name, ok := m.eval(in, detect); ok {
			return name, true
		}
	}
	return n.onNoMatch.eval(in, detect)
}

func (o *onMatch) eval(in *Input, detect func() string) (string, bool) {
	switch {
	case o == nil:
		return "", false
	case o.next != nil:
		return o.next.eval(in, detect)
	}
	return o.chain, true
}

// compileMatcher compiles main_internal's filter_chain_matcher. chains
// receives every chain name an action refers to.
func compileMatcher(m *xdsmatcherv3.Matcher, chains map[string]bool) (*node, error) {
	if m == nil {
		return nil, nil
	}
	n := &node{}
	var err error
	if n.onNoMatch, err = compileOnMatch(m.GetOnNoMatch(), chains); err != nil {
		return nil, fmt.Errorf("on_no_match: %w", err)
	}
	tree := m.GetMatcherTree()
	if tree == nil {
		return nil, errors.New("matcher_list: unsupported (istiod sends matcher trees)")
	}
	if n.input, err = compileInput(tree.GetInput()); err != nil {
		return nil, fmt.Errorf("matcher_tree.input: %w", err)
	}
	switch t := tree.GetTreeType().(type) {
	case *xdsmatcherv3.Matcher_MatcherTree_ExactMatchMap:
		n.exact = map[string]*onMatch{}
		for k, om := range t.ExactMatchMap.GetMap() {
			c, err := compileOnMatch(om, chains)
			if err != nil {
				return nil, fmt.Errorf("matcher_tree.exact_match_map[%s]: %w", k, err)
			}
			n.exact[k] = c
		}
	case *xdsmatcherv3.Matcher_MatcherTree_CustomMatch:
		if n.input != inputDestinationIP {
			return nil, errors.New("matcher_tree.custom_match: only the IP matcher on the destination IP")
		}
		ipm, err := unpack[*xdsmatcherv3.IPMatcher](t.CustomMatch.GetTypedConfig())
		if err != nil {
			return nil, fmt.Errorf("matcher_tree.custom_match: %w", err)
		}
		n.ranges = []ipRange{}
		for i, rm := range ipm.GetRangeMatchers() {
			on, err := compileOnMatch(rm.GetOnMatch(), chains)
			if err != nil {
				return nil, fmt.Errorf("matcher_tree.custom_match.range_matchers[%d]: %w", i, err)
			}
			for j, c := range rm.GetRanges() {
				p, err := xdsCIDR(c)
				if err != nil {
					return nil, fmt.Errorf("matcher_tree.custom_match.range_matchers[%d].ranges[%d]: %w", i, j, err)
				}
				n.ranges = append(n.ranges, ipRange{prefix: p, exclusive: rm.GetExclusive(), on: on})
			}
		}
	default:
		return nil, fmt.Errorf("matcher_tree %T: unsupported", t)
	}
	return n, nil
}

func compileInput(in *xdscorev3.TypedExtensionConfig) (inputKind, error) {
	switch typeName(in.GetTypedConfig()) {
	case "envoy.extensions.matching.common_inputs.network.v3.DestinationIPInput":
		return inputDestinationIP, nil
	case "envoy.extensions.matching.common_inputs.network.v3.DestinationPortInput":
		return inputDestinationPort, nil
	case "envoy.extensions.matching.common_inputs.network.v3.ApplicationProtocolInput":
		return inputAppProtocol, nil
	case "envoy.extensions.matching.common_inputs.network.v3.FilterStateInput":
		fs, err := unpack[*networkinputv3.FilterStateInput](in.GetTypedConfig())
		if err != nil {
			return 0, err
		}
		if fs.GetKey() != "io.istio.connect_authority" {
			return 0, fmt.Errorf("filter state input %q: unsupported", fs.GetKey())
		}
		return inputAuthority, nil
	}
	return 0, fmt.Errorf("input %s: unsupported", in.GetTypedConfig().GetTypeUrl())
}

func compileOnMatch(om *xdsmatcherv3.Matcher_OnMatch, chains map[string]bool) (*onMatch, error) {
	if om == nil {
		return nil, nil
	}
	if om.GetKeepMatching() {
		return nil, errors.New("keep_matching: unsupported")
	}
	switch o := om.GetOnMatch().(type) {
	case *xdsmatcherv3.Matcher_OnMatch_Matcher:
		next, err := compileMatcher(o.Matcher, chains)
		if err != nil {
			return nil, err
		}
		return &onMatch{next: next}, nil
	case *xdsmatcherv3.Matcher_OnMatch_Action:
		sv, err := unpack[*wrapperspb.StringValue](o.Action.GetTypedConfig())
		if err != nil {
			return nil, fmt.Errorf("action: %w", err)
		}
		chains[sv.GetValue()] = true
		return &onMatch{chain: sv.GetValue()}, nil
	}
	return nil, errors.New("no on_match")
}

func xdsCIDR(c *xdscorev3.CidrRange) (netip.Prefix, error) {
	a, err := netip.ParseAddr(c.GetAddressPrefix())
	if err != nil {
		return netip.Prefix{}, err
	}
	return a.Prefix(int(c.GetPrefixLen().GetValue()))
}

// mainInternal compiles main_internal; its chains compile one by one.
func (b *builder) mainInternal(l *listenerv3.Listener) *Dispatch {
	if !b.checkListener(l) {
		return nil
	}
	fail := func(err error) *Dispatch {
		b.problem(ListenerType, l.GetName(), err)
		return nil
	}
	if l.GetInternalListener() == nil {
		return fail(errors.New("not an internal listener"))
	}
	d := &Dispatch{Chains: map[string]*Chain{}}
	for i, lf := range l.GetListenerFilters() {
		switch typeName(lf.GetTypedConfig()) {
		case "envoy.extensions.filters.listener.original_dst.v3.OriginalDst":
			// The original destination comes from the CONNECT :authority,
			// which amber's HBONE server hands over directly.
		case "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector":
			d.Sniff = true
		case "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector":
			// Only SNI-based matching (TLS ports, multi-network) reads it;
			// the matcher refuses that.
		default:
			return fail(fmt.Errorf("listener_filters[%d]: unsupported", i))
		}
	}
	if l.GetDefaultFilterChain() != nil {
		return fail(errors.New("default_filter_chain: unsupported"))
	}
	refs := map[string]bool{}
	root, err := compileMatcher(l.GetFilterChainMatcher(), refs)
	if err != nil {
		return fail(fmt.Errorf("filter_chain_matcher: %w", err))
	}
	if root == nil {
		return fail(errors.New("no filter_chain_matcher"))
	}
	d.root = root
	for i, fc := range l.GetFilterChains() {
		name := fc.GetName()
		if _, dup := d.Chains[name]; dup || name == "" {
			return fail(fmt.Errorf("filter_chains[%d]: name %q empty or repeated", i, name))
		}
		ch := &Chain{Name: name}
		if err := b.checkChain(l.GetName(), i, fc); err != nil {
			ch.Err = err
		} else if err := compileChain(ch, fc); err != nil {
			ch.Err = fmt.Errorf("filter_chains[%d] %s: %w", i, name, err)
		}
		if ch.Err != nil {
			b.problem(ListenerType, l.GetName(), ch.Err)
		}
		d.Chains[name] = ch
	}
	for name := range refs {
		if _, ok := d.Chains[name]; !ok {
			return fail(fmt.Errorf("filter_chain_matcher names chain %q, which does not exist", name))
		}
	}
	return d
}
