package waypointgolden

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	xdsmatcherv3 "github.com/cncf/xds/go/xds/type/matcher/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	"google.golang.org/protobuf/types/known/anypb"
)

// Normalize puts s into the order that does not depend on when the test
// created its objects, in place:
//
//   - a listener's filter_chains are sorted by name, and the range
//     matchers of an IP matcher in its filter_chain_matcher by their
//     first range. istiod orders a waypoint's services by creation
//     timestamp, which has one-second resolution
//     (pilot/pkg/model/push_context.go SortServicesByCreationTime); chains
//     are selected by name through the matcher, and the IP matcher takes
//     the longest matching prefix whatever the order (a service's
//     addresses never overlap another's), so neither order carries
//     meaning.
func Normalize(s *Snapshot) error {
	for _, l := range s.Listeners {
		slices.SortStableFunc(l.FilterChains, func(a, b *listenerv3.FilterChain) int {
			return strings.Compare(a.GetName(), b.GetName())
		})
		if err := sortRanges(l.GetFilterChainMatcher()); err != nil {
			return fmt.Errorf("listener %s: %w", l.GetName(), err)
		}
	}
	return nil
}

// sortRanges sorts the range matchers of every IP matcher in m's tree.
func sortRanges(m *xdsmatcherv3.Matcher) error {
	if m == nil {
		return nil
	}
	if err := sortRangesOn(m.GetOnNoMatch()); err != nil {
		return err
	}
	tree := m.GetMatcherTree()
	if tree == nil {
		return nil
	}
	for _, om := range tree.GetExactMatchMap().GetMap() {
		if err := sortRangesOn(om); err != nil {
			return err
		}
	}
	cm := tree.GetCustomMatch()
	if cm == nil || cm.GetTypedConfig().GetTypeUrl() != "type.googleapis.com/xds.type.matcher.v3.IPMatcher" {
		return nil
	}
	ipm := &xdsmatcherv3.IPMatcher{}
	if err := cm.GetTypedConfig().UnmarshalTo(ipm); err != nil {
		return err
	}
	for _, rm := range ipm.GetRangeMatchers() {
		if err := sortRangesOn(rm.GetOnMatch()); err != nil {
			return err
		}
	}
	key := func(rm *xdsmatcherv3.IPMatcher_IPRangeMatcher) string {
		if len(rm.GetRanges()) == 0 {
			return ""
		}
		r := rm.GetRanges()[0]
		a, err := netip.ParseAddr(r.GetAddressPrefix())
		if err != nil {
			return r.GetAddressPrefix()
		}
		// Sort by address bytes, IPv4 before IPv6.
		return fmt.Sprintf("%02d%x/%03d", a.BitLen(), a.AsSlice(), r.GetPrefixLen().GetValue())
	}
	slices.SortStableFunc(ipm.RangeMatchers, func(a, b *xdsmatcherv3.IPMatcher_IPRangeMatcher) int {
		return strings.Compare(key(a), key(b))
	})
	any, err := anypb.New(ipm)
	if err != nil {
		return err
	}
	cm.TypedConfig = any
	return nil
}

func sortRangesOn(om *xdsmatcherv3.Matcher_OnMatch) error {
	return sortRanges(om.GetMatcher())
}
