// Package rbac evaluates Envoy's RBAC filters (HTTP and network) as istiod
// configures them for a waypoint: one Filter per RBAC filter in the chain,
// evaluated in the chain's order.
//
// Semantics, with their sources (envoy = envoyproxy/envoy, istiod =
// istio/istio at the pinned version; details in docs/waypoint.md):
//
//   - istiod emits, per chain, an RBAC filter per action present among the
//     policies attached to the service, in the order CUSTOM (an RBAC
//     filter with shadow rules only, then ext_authz), AUDIT (LOG), DENY,
//     ALLOW (pilot/pkg/security/authz/builder/builder.go build); a service
//     without ALLOW policies has no ALLOW filter, so everything not denied
//     is allowed. The caller runs the filters in order and stops at the
//     first denial.
//   - Rules: ALLOW allows iff some policy matches; DENY allows iff none
//     matches; LOG always allows and asks for the request to be logged
//     when one matches (envoy source/extensions/filters/common/rbac/
//     engine_impl.cc handleAction). No rules: the filter enforces nothing.
//     Shadow rules are evaluated and reported, never enforced.
//   - A policy matches when any permission and any principal match;
//     policies are tried in name order (Envoy keeps them in a std::map)
//     and the first that matches names the decision.
//   - and_rules/and_ids with no member match; or_rules/or_ids with none do
//     not (envoy matchers.cc AndMatcher/OrMatcher).
//   - url_path matches the path without query and fragment; header
//     matchers see ":path" with them (envoy matchers.cc PathMatcher).
//   - Principals: direct_remote_ip and source_ip are the downstream peer
//     address, remote_ip the address the HCM derived (x-forwarded-for when
//     use_remote_address is false); filter_state matches the string a
//     filter stored (istiod's waypoints use io.istio.peer_principal, the
//     HBONE client's URI SAN; pilot/pkg/security/authz/model/principal.go
//     principalAuthenticated); authenticated matches the TLS peer of the
//     connection the filter runs on, which for a waypoint's inner
//     connection has none, so it never matches.
//
// What Envoy can evaluate and this package cannot — metadata (istiod's
// request principals, audiences, presenters and JWT claims), sourced
// metadata, CEL conditions, matcher extensions, URI templates, xDS
// matcher trees, custom principals — is an error from New*: the caller
// must refuse the chain (fail closed), as amber has no jwt_authn or
// ext_authz to produce what those rules read.
package rbac
