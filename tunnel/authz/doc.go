// Package authz evaluates Istio's L4 authorization policies for connections
// arriving at a destination workload, as the destination ztunnel does.
//
// Semantics, with their sources (zt = istio/ztunnel, istiod = istio/istio
// pilot/pkg/serviceregistry/kube/controller/ambient/authorization.go):
//
//   - Applicable policies: GLOBAL ones (istiod gives that scope to root
//     namespace policies without selector), NAMESPACE ones of the
//     destination's namespace, and every "ns/name" key the destination
//     workload lists (WORKLOAD_SELECTOR) (zt src/state.rs assert_rbac).
//   - Decision: a matching DENY denies; no ALLOW allows; a matching ALLOW
//     allows; else deny (istio.io AuthorizationPolicy reference).
//   - Nesting (zt src/rbac.rs): Groups OR-ed, none never matches; Rules
//     within a Group AND-ed (istiod emits from, to and each when as one
//     Rules), none always matches; Matches within Rules OR-ed, none always
//     matches; within a Match every non-empty field must contain the value
//     (values OR-ed) and no non-empty not_ field may.
//   - Principals are compared without "spiffe://" (zt rbac.rs
//     matches_principal) by exact, prefix, suffix or presence; no character
//     is a wildcard. A source without identity matches no principal,
//     namespace or service account value: positive conditions on them fail,
//     negative ones hold (zt rbac.rs tests, plaintext_conn).
//   - Addresses match as CIDRs of the same family; IPv4-mapped addresses
//     and /96+ mapped prefixes are IPv4 (zt canonicalises peer addresses).
//
// Fail-closed rules where ztunnel is silent or widens a policy:
//
//   - An empty Match is what istiod leaves of an all-L7 clause. It never
//     matches in an ALLOW and always matches in a DENY, the "more
//     restrictive" outcome istiod's status promises; ztunnel skips it, so
//     such a DENY has no effect there (istio/istio#61126).
//   - A policy with content that cannot be evaluated (unknown action,
//     StringMatch without a type, malformed address, port above 65535,
//     Authorization.Unsupported) is kept: as an ALLOW it matches nothing,
//     otherwise it matches everything it applies to. ztunnel drops such
//     values, which widens the policy. An unknown scope applies to the
//     policy's own namespace.
//   - A policy the client rejected as malformed (and NACKed) is enforced
//     through a stand-in (Rejected) built from what could be read of it:
//     its key, and its scope and action when they decoded. As an ALLOW it
//     matches nothing; otherwise, or when its action is unknown, it denies
//     every connection it applies to: by scope (an unknown one meaning its
//     namespace) and to the workloads that list it. A rejected update
//     replaces the version before it until a good one arrives: Envoy and
//     ztunnel keep the last accepted version, but that one may allow what
//     its replacement denies. A rejected policy in the root namespace whose
//     scope could not be read is taken to apply to that namespace only
//     (the data plane does not know which namespace is the root).
//   - A listed key missing from the set denies: istiod pushes workloads
//     before policies (pilot/pkg/xds/ads.go PushOrder), so a reference can
//     arrive before its policy, which may be a DENY. ztunnel skips it.
//   - An identity other than spiffe://TD/ns/NS/sa/SA, or an invalid
//     address, denies.
package authz
