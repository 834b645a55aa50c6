package config

import (
	udpatypev1 "github.com/cncf/xds/go/udpa/type/v1"
	xdsmatcherv3 "github.com/cncf/xds/go/xds/type/matcher/v3"
	xdstypev3 "github.com/cncf/xds/go/xds/type/v3"
	corsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/cors/v3"
	faultv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/fault/v3"
	grpcstatsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/grpc_stats/v3"
	rbachttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	sfshttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/set_filter_state/v3"
	httpinspectorv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/http_inspector/v3"
	originaldstv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/original_dst/v3"
	tlsinspectorv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	rbacnetv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	sfsnetv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/set_filter_state/v3"
	tcpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	networkinputv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/matching/common_inputs/network/v3"
	uuidv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/request_id/uuid/v3"
	previoushostsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/retry/host/previous_hosts/v3"
	internalv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/internal_upstream/v3"
	rawbufferv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/raw_buffer/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	httpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"
	alpnv2alpha1 "istio.io/api/envoy/config/filter/http/alpn/v2alpha1"
	statsv1 "istio.io/api/envoy/extensions/stats"
)

// The allow-list. Per message type, the fields that may be set:
//
//   - compiled: read and checked by the compiler (a value it cannot honour
//     is a problem there);
//   - inert: changes nothing amber does: names, stat names, settings that
//     only concern Envoy's own machinery (worker balancing, SDS sources
//     amber replaces with its own certificates, metadata passed between
//     Envoy's internal listeners);
//   - telemetry: only affects stats, logs and traces, which amber produces
//     its own way: accepted and reported as Degraded;
//   - resilience: outlier detection and panic routing from
//     DestinationRules, which amber does not implement: accepted and
//     reported as Degraded, because refusing them would take every
//     waypoint of a mesh with a mesh-wide DestinationRule down.
//
// Everything else is refused with its path. docs/waypoint.md renders this
// table (TestAllowListDocumented keeps the two in step).

const resilience = telemetry + 1

func init() {
	// Listeners.
	allow("envoy.config.listener.v3.Listener", compiled, "name", "address", "additional_addresses", "filter_chains",
		"filter_chain_matcher", "listener_filters", "internal_listener")
	allow("envoy.config.listener.v3.Listener", inert, "traffic_direction", "use_original_dst", "connection_balance_config",
		"max_connections_to_accept_per_socket_event")
	allow("envoy.config.listener.v3.Listener", telemetry, "access_log")
	allow("envoy.config.listener.v3.Listener.ConnectionBalanceConfig", inert, "exact_balance")
	allow("envoy.config.listener.v3.Listener.ConnectionBalanceConfig.ExactBalance", inert)
	allow("envoy.config.listener.v3.Listener.InternalListenerConfig", compiled)
	allow("envoy.config.listener.v3.AdditionalAddress", compiled, "address")
	allow("envoy.config.listener.v3.FilterChain", compiled, "name", "filters", "transport_socket", "filter_chain_match")
	// A gateway's HTTPS server: the SNI names its chain serves.
	allow("envoy.config.listener.v3.FilterChainMatch", compiled, "server_names")
	allow("envoy.config.listener.v3.FilterChain", inert, "metadata", "transport_socket_connect_timeout")
	allow("envoy.config.listener.v3.Filter", compiled, "name", "typed_config")
	allow("envoy.config.listener.v3.ListenerFilter", compiled, "name", "typed_config")
	// Which ports http_inspector skips: amber sniffs exactly when the
	// filter chain matcher asks for the application protocol.
	allow("envoy.config.listener.v3.ListenerFilter", inert, "filter_disabled")
	allow("envoy.config.listener.v3.ListenerFilterChainMatchPredicate", inert, "or_match", "destination_port_range")
	allow("envoy.config.listener.v3.ListenerFilterChainMatchPredicate.MatchSet", inert, "rules")
	allow("envoy.type.v3.Int32Range", compiled, "start", "end")
	allow("envoy.extensions.filters.listener.original_dst.v3.OriginalDst", compiled)
	allow("envoy.extensions.filters.listener.http_inspector.v3.HttpInspector", compiled)
	allow("envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector", inert, "initial_read_buffer_size")
	allow("envoy.config.core.v3.Address", compiled, "socket_address", "envoy_internal_address")
	allow("envoy.config.core.v3.SocketAddress", compiled, "address", "port_value", "protocol")
	allow("envoy.config.core.v3.EnvoyInternalAddress", compiled, "server_listener_name", "endpoint_id")
	allow("envoy.config.core.v3.Metadata", compiled, "filter_metadata")

	// main_internal's filter chain matcher.
	allow("xds.type.matcher.v3.Matcher", compiled, "matcher_tree", "on_no_match")
	allow("xds.type.matcher.v3.Matcher.MatcherTree", compiled, "input", "exact_match_map", "custom_match")
	allow("xds.type.matcher.v3.Matcher.MatcherTree.MatchMap", compiled, "map")
	allow("xds.type.matcher.v3.Matcher.OnMatch", compiled, "matcher", "action")
	allow("xds.type.matcher.v3.IPMatcher", compiled, "range_matchers")
	allow("xds.type.matcher.v3.IPMatcher.IPRangeMatcher", compiled, "ranges", "on_match", "exclusive")
	allow("xds.core.v3.TypedExtensionConfig", compiled, "name", "typed_config")
	allow("xds.core.v3.CidrRange", compiled, "address_prefix", "prefix_len")
	allow("envoy.extensions.matching.common_inputs.network.v3.DestinationIPInput", compiled)
	allow("envoy.extensions.matching.common_inputs.network.v3.DestinationPortInput", compiled)
	allow("envoy.extensions.matching.common_inputs.network.v3.ApplicationProtocolInput", compiled)
	allow("envoy.extensions.matching.common_inputs.network.v3.FilterStateInput", compiled, "key")

	// TLS of connect_terminate and connect_originate: checked, then served
	// by amber's HBONE code with its own certificates from istiod's CA.
	allow("envoy.config.core.v3.TransportSocket", compiled, "name", "typed_config")
	allow("envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext", compiled, "common_tls_context", "require_client_certificate")
	allow("envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", compiled, "common_tls_context", "sni")
	allow("envoy.extensions.transport_sockets.tls.v3.CommonTlsContext", compiled, "tls_params", "alpn_protocols",
		"tls_certificate_sds_secret_configs", "combined_validation_context")
	allow("envoy.extensions.transport_sockets.tls.v3.TlsParameters", compiled, "tls_minimum_protocol_version", "tls_maximum_protocol_version")
	allow("envoy.extensions.transport_sockets.tls.v3.CommonTlsContext.CombinedCertificateValidationContext", compiled,
		"default_validation_context", "validation_context_sds_secret_config")
	allow("envoy.extensions.transport_sockets.tls.v3.CertificateValidationContext", compiled, "match_typed_subject_alt_names",
		"match_subject_alt_names")
	allow("envoy.extensions.transport_sockets.tls.v3.SubjectAltNameMatcher", compiled, "san_type", "matcher")
	allow("envoy.extensions.transport_sockets.tls.v3.SdsSecretConfig", compiled, "name")
	allow("envoy.extensions.transport_sockets.tls.v3.SdsSecretConfig", inert, "sds_config")
	// SDS over ADS: a gateway's Kubernetes Secrets.
	allow("envoy.extensions.transport_sockets.tls.v3.Secret", compiled, "name", "tls_certificate")
	allow("envoy.extensions.transport_sockets.tls.v3.TlsCertificate", compiled, "certificate_chain", "private_key")
	allow("envoy.config.core.v3.ConfigSource", inert, "ads", "api_config_source", "initial_fetch_timeout", "resource_api_version")
	allow("envoy.config.core.v3.AggregatedConfigSource", inert)
	allow("envoy.config.core.v3.ApiConfigSource", inert, "api_type", "transport_api_version", "grpc_services", "set_node_on_first_message_only")
	allow("envoy.config.core.v3.GrpcService", inert, "envoy_grpc")
	allow("envoy.config.core.v3.GrpcService.EnvoyGrpc", inert, "cluster_name")
	allow("envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport", compiled, "transport_socket")
	allow("envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport", inert, "passthrough_metadata")
	allow("envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport.MetadataValueSource", inert, "kind", "name")
	allow("envoy.type.metadata.v3.MetadataKind", inert, "host", "request", "route", "cluster")
	allow("envoy.type.metadata.v3.MetadataKind.Host", inert)
	allow("envoy.type.metadata.v3.MetadataKind.Request", inert)
	allow("envoy.type.metadata.v3.MetadataKind.Cluster", inert)
	allow("envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer", compiled)

	// HTTP connection manager.
	const hcm = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
	allow(hcm, compiled, "codec_type", "route_config", "http_filters", "server_name", "server_header_transformation",
		"forward_client_cert_details", "use_remote_address", "xff_num_trusted_hops",
		"generate_request_id", "preserve_external_request_id", "stream_idle_timeout", "request_timeout",
		"request_headers_timeout", "common_http_protocol_options", "http_protocol_options", "http2_protocol_options",
		"max_request_headers_kb", "upgrade_configs", "normalize_path", "merge_slashes", "path_with_escaped_slashes_action",
		"append_x_forwarded_port", "proxy_100_continue")
	// set_current_client_cert_details only shapes an x-forwarded-client-cert
	// the chains never forward (SANITIZE) and connect_terminate only puts
	// on the outer CONNECT, which no application sees.
	allow(hcm, compiled, "rds")
	allow(hcm, inert, "stat_prefix", "set_current_client_cert_details")
	allow("envoy.extensions.filters.network.http_connection_manager.v3.Rds", compiled, "route_config_name")
	allow("envoy.extensions.filters.network.http_connection_manager.v3.Rds", inert, "config_source")
	allow(hcm, telemetry, "access_log", "tracing", "request_id_extension")
	allow(hcm+".SetCurrentClientCertDetails", inert, "subject", "uri", "dns", "cert")
	allow(hcm+".UpgradeConfig", compiled, "upgrade_type", "enabled")
	allow("envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter", compiled, "name", "typed_config", "disabled")
	allow("envoy.config.core.v3.HttpProtocolOptions", compiled, "idle_timeout", "max_connection_duration", "max_stream_duration",
		"max_headers_count", "headers_with_underscores_action", "max_requests_per_connection")
	allow("envoy.config.core.v3.Http1ProtocolOptions", compiled, "accept_http_10")
	allow("envoy.config.core.v3.Http2ProtocolOptions", compiled, "allow_connect", "max_concurrent_streams", "connection_keepalive",
		"initial_stream_window_size", "initial_connection_window_size")
	allow("envoy.config.core.v3.KeepaliveSettings", compiled, "interval", "timeout")

	// Routes.
	allow("envoy.config.route.v3.RouteConfiguration", compiled, "name", "virtual_hosts", "request_headers_to_add",
		"request_headers_to_remove", "response_headers_to_add", "response_headers_to_remove", "ignore_port_in_host_matching")
	allow("envoy.config.route.v3.RouteConfiguration", inert, "validate_clusters", "max_direct_response_body_size_bytes")
	allow("envoy.config.route.v3.VirtualHost", compiled, "name", "domains", "routes", "retry_policy", "request_headers_to_add",
		"request_headers_to_remove", "response_headers_to_add", "response_headers_to_remove")
	allow("envoy.config.route.v3.VirtualHost", telemetry, "include_request_attempt_count")
	allow("envoy.config.route.v3.Route", compiled, "name", "match", "route", "redirect", "direct_response",
		"request_headers_to_add", "request_headers_to_remove", "response_headers_to_add", "response_headers_to_remove")
	allow("envoy.config.route.v3.Route", inert, "metadata")
	allow("envoy.config.route.v3.Route", telemetry, "decorator")
	allow("envoy.config.route.v3.RouteMatch", compiled, "prefix", "path", "safe_regex", "path_separated_prefix", "connect_matcher",
		"case_sensitive", "headers", "query_parameters", "grpc")
	allow("envoy.config.route.v3.RouteMatch.ConnectMatcher", compiled)
	allow("envoy.config.route.v3.RouteMatch.GrpcRouteMatchOptions", compiled)
	allow("envoy.config.route.v3.RouteAction", compiled, "cluster", "weighted_clusters", "cluster_not_found_response_code",
		"timeout", "idle_timeout", "retry_policy", "prefix_rewrite", "regex_rewrite", "host_rewrite_literal",
		"upgrade_configs", "max_stream_duration", "max_grpc_timeout")
	allow("envoy.config.route.v3.RouteAction.UpgradeConfig", compiled, "upgrade_type", "enabled", "connect_config")
	allow("envoy.config.route.v3.RouteAction.UpgradeConfig.ConnectConfig", compiled)
	allow("envoy.config.route.v3.RouteAction.MaxStreamDuration", compiled, "max_stream_duration", "grpc_timeout_header_max")
	allow("envoy.config.route.v3.WeightedCluster", compiled, "clusters", "total_weight")
	allow("envoy.config.route.v3.WeightedCluster.ClusterWeight", compiled, "name", "weight", "request_headers_to_add",
		"request_headers_to_remove", "response_headers_to_add", "response_headers_to_remove")
	allow("envoy.config.route.v3.RetryPolicy", compiled, "retry_on", "num_retries", "per_try_timeout", "per_try_idle_timeout",
		"retry_host_predicate", "host_selection_retry_max_attempts", "retriable_status_codes", "retry_back_off")
	allow("envoy.config.route.v3.RetryPolicy.RetryHostPredicate", compiled, "name", "typed_config")
	allow("envoy.config.route.v3.RetryPolicy.RetryBackOff", compiled, "base_interval", "max_interval")
	allow("envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate", compiled)
	allow("envoy.config.route.v3.RedirectAction", compiled, "https_redirect", "scheme_redirect", "host_redirect", "port_redirect",
		"path_redirect", "prefix_rewrite", "response_code", "strip_query")
	allow("envoy.config.route.v3.DirectResponseAction", compiled, "status", "body")
	allow("envoy.config.core.v3.DataSource", compiled, "inline_string", "inline_bytes")
	allow("envoy.config.core.v3.HeaderValueOption", compiled, "header", "append", "append_action", "keep_empty_value")
	allow("envoy.config.core.v3.HeaderValue", compiled, "key", "value", "raw_value")
	allow("envoy.config.route.v3.HeaderMatcher", compiled, "name", "string_match", "present_match", "range_match",
		"invert_match", "treat_missing_header_as_empty")
	allow("envoy.config.route.v3.QueryParameterMatcher", compiled, "name", "string_match", "present_match")
	allow("envoy.type.v3.Int64Range", compiled, "start", "end")
	allow("envoy.type.matcher.v3.StringMatcher", compiled, "exact", "prefix", "suffix", "contains", "safe_regex", "ignore_case")
	allow("envoy.type.matcher.v3.RegexMatcher", compiled, "regex")
	allow("envoy.type.matcher.v3.RegexMatchAndSubstitute", compiled, "pattern", "substitution")

	// HTTP filters.
	allow("envoy.extensions.filters.http.router.v3.Router", compiled)
	allow("envoy.extensions.filters.http.router.v3.Router", telemetry, "start_child_span", "suppress_envoy_headers")
	allow("envoy.extensions.filters.http.fault.v3.HTTPFault", compiled)
	allow("envoy.extensions.filters.http.cors.v3.Cors", compiled)
	allow("envoy.extensions.filters.http.grpc_stats.v3.FilterConfig", telemetry, "emit_filter_state", "stats_for_all_methods")
	allow("envoy.extensions.filters.http.set_filter_state.v3.Config", compiled, "on_request_headers")
	allow("envoy.extensions.filters.network.set_filter_state.v3.Config", compiled, "on_new_connection")
	allow("envoy.extensions.filters.common.set_filter_state.v3.FilterStateValue", compiled, "object_key", "format_string")
	allow("envoy.extensions.filters.common.set_filter_state.v3.FilterStateValue", inert, "factory_key", "shared_with_upstream", "read_only")
	allow("envoy.config.core.v3.SubstitutionFormatString", compiled, "text_format_source")
	allow("stats.PluginConfig", compiled, "reporter", "disable_host_header_fallback")
	allow("stats.PluginConfig", telemetry, "tcp_reporting_duration", "metrics", "definitions",
		"stat_prefix", "rotation_interval", "debug", "max_peer_cache_size", "field_separator", "value_separator")
	// TypedStruct: only istio's peer-metadata filters (type_url checked by
	// the compiler). Their job, finding the peers' workloads, amber's data
	// path does from WDS itself, so their settings change nothing.
	allow("udpa.type.v1.TypedStruct", compiled, "type_url")
	allow("udpa.type.v1.TypedStruct", inert, "value")
	allow("xds.type.v3.TypedStruct", compiled, "type_url")
	allow("xds.type.v3.TypedStruct", inert, "value")

	// RBAC.
	allow("envoy.extensions.filters.http.rbac.v3.RBAC", compiled, "rules", "shadow_rules")
	allow("envoy.extensions.filters.http.rbac.v3.RBAC", telemetry, "rules_stat_prefix", "shadow_rules_stat_prefix", "track_per_rule_stats")
	allow("envoy.extensions.filters.network.rbac.v3.RBAC", compiled, "rules", "shadow_rules", "enforcement_type")
	allow("envoy.extensions.filters.network.rbac.v3.RBAC", telemetry, "stat_prefix", "shadow_rules_stat_prefix")
	allow("envoy.config.rbac.v3.RBAC", compiled, "action", "policies")
	allow("envoy.config.rbac.v3.Policy", compiled, "permissions", "principals")
	allow("envoy.config.rbac.v3.Permission", compiled, "and_rules", "or_rules", "any", "header", "url_path", "destination_ip",
		"destination_port", "destination_port_range", "not_rule", "requested_server_name")
	allow("envoy.config.rbac.v3.Permission.Set", compiled, "rules")
	allow("envoy.config.rbac.v3.Principal", compiled, "and_ids", "or_ids", "any", "authenticated", "source_ip",
		"direct_remote_ip", "remote_ip", "header", "url_path", "filter_state", "not_id")
	allow("envoy.config.rbac.v3.Principal.Set", compiled, "ids")
	allow("envoy.config.rbac.v3.Principal.Authenticated", compiled, "principal_name")
	allow("envoy.config.core.v3.CidrRange", compiled, "address_prefix", "prefix_len")
	allow("envoy.type.matcher.v3.PathMatcher", compiled, "path")
	allow("envoy.type.matcher.v3.FilterStateMatcher", compiled, "key", "string_match")

	// TCP.
	allow("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", compiled, "cluster", "weighted_clusters", "idle_timeout",
		"max_downstream_connection_duration", "tunneling_config")
	allow("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", inert, "stat_prefix")
	allow("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", telemetry, "access_log", "access_log_options")
	allow("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.WeightedCluster", compiled, "clusters")
	allow("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.WeightedCluster.ClusterWeight", compiled, "name", "weight")
	allow("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.TunnelingConfig", compiled, "hostname", "headers_to_add")

	// Clusters.
	allow("envoy.config.cluster.v3.Cluster", compiled, "name", "type", "eds_cluster_config", "connect_timeout", "lb_policy",
		"least_request_lb_config", "round_robin_lb_config", "circuit_breakers", "transport_socket",
		"typed_extension_protocol_options", "load_assignment", "original_dst_lb_config", "metadata", "common_lb_config")
	allow("envoy.config.cluster.v3.Cluster", compiled, "transport_socket_matches", "filters")
	allow("envoy.config.cluster.v3.Cluster", inert, "alt_stat_name", "cleanup_interval")
	allow("envoy.config.cluster.v3.Cluster.TransportSocketMatch", compiled, "name", "match", "transport_socket")
	allow("envoy.config.cluster.v3.Filter", compiled, "name", "typed_config")
	// istio.alpn: the ALPN of Istio mTLS to sidecars, which amber refuses.
	allow("istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig", inert, "alpn_override")
	allow("istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig.AlpnOverride", inert, "upstream_protocol", "alpn_override")
	allow("envoy.config.cluster.v3.Cluster", resilience, "outlier_detection", "upstream_connection_options")
	allow("envoy.config.cluster.v3.Cluster.EdsClusterConfig", compiled, "service_name")
	allow("envoy.config.cluster.v3.Cluster.EdsClusterConfig", inert, "eds_config")
	allow("envoy.config.cluster.v3.Cluster.LeastRequestLbConfig", compiled, "choice_count")
	allow("envoy.config.cluster.v3.Cluster.RoundRobinLbConfig", compiled)
	allow("envoy.config.cluster.v3.Cluster.OriginalDstLbConfig", compiled, "upstream_port_override", "metadata_key")
	allow("envoy.type.metadata.v3.MetadataKey", compiled, "key", "path")
	allow("envoy.type.metadata.v3.MetadataKey.PathSegment", compiled, "key")
	allow("envoy.config.cluster.v3.Cluster.CommonLbConfig", compiled, "healthy_panic_threshold")
	allow("envoy.config.cluster.v3.Cluster.CommonLbConfig", resilience, "locality_weighted_lb_config", "zone_aware_lb_config")
	allow("envoy.type.v3.Percent", compiled, "value")
	allow("envoy.config.cluster.v3.CircuitBreakers", compiled, "thresholds")
	allow("envoy.config.cluster.v3.CircuitBreakers.Thresholds", compiled, "priority", "max_connections", "max_pending_requests",
		"max_requests", "max_retries")
	allow("envoy.config.cluster.v3.CircuitBreakers.Thresholds", telemetry, "track_remaining")
	allow("envoy.extensions.upstreams.http.v3.HttpProtocolOptions", compiled, "common_http_protocol_options", "explicit_http_config",
		"use_downstream_protocol_config")
	allow("envoy.extensions.upstreams.http.v3.HttpProtocolOptions.ExplicitHttpConfig", compiled, "http_protocol_options", "http2_protocol_options")
	allow("envoy.extensions.upstreams.http.v3.HttpProtocolOptions.UseDownstreamHttpConfig", compiled, "http_protocol_options", "http2_protocol_options")

	// Endpoints.
	allow("envoy.config.endpoint.v3.ClusterLoadAssignment", compiled, "cluster_name", "endpoints")
	allow("envoy.config.endpoint.v3.ClusterLoadAssignment", resilience, "policy")
	allow("envoy.config.endpoint.v3.LocalityLbEndpoints", compiled, "locality", "lb_endpoints", "priority")
	allow("envoy.config.endpoint.v3.LocalityLbEndpoints", resilience, "load_balancing_weight")
	allow("envoy.config.core.v3.Locality", compiled, "region", "zone", "sub_zone")
	allow("envoy.config.endpoint.v3.LbEndpoint", compiled, "endpoint", "health_status", "metadata", "load_balancing_weight")
	allow("envoy.config.endpoint.v3.Endpoint", compiled, "address", "additional_addresses")

	// The types an Any may hold, as values so that each is linked into the
	// binary (the checker resolves Anys through the global registry).
	for _, m := range []protoMessage{
		&hcmv3.HttpConnectionManager{}, &tcpv3.TcpProxy{}, &rbacnetv3.RBAC{}, &sfsnetv3.Config{},
		&rbachttpv3.RBAC{}, &routerv3.Router{}, &faultv3.HTTPFault{}, &corsv3.Cors{}, &grpcstatsv3.FilterConfig{},
		&sfshttpv3.Config{},
		&originaldstv3.OriginalDst{}, &httpinspectorv3.HttpInspector{}, &tlsinspectorv3.TlsInspector{},
		&tlsv3.DownstreamTlsContext{}, &tlsv3.UpstreamTlsContext{}, &internalv3.InternalUpstreamTransport{},
		&rawbufferv3.RawBuffer{}, &httpv3.HttpProtocolOptions{},
		&networkinputv3.DestinationIPInput{}, &networkinputv3.DestinationPortInput{},
		&networkinputv3.ApplicationProtocolInput{}, &networkinputv3.FilterStateInput{},
		&previoushostsv3.PreviousHostsPredicate{}, &uuidv3.UuidRequestIdConfig{},
		&xdsmatcherv3.IPMatcher{}, &udpatypev1.TypedStruct{}, &xdstypev3.TypedStruct{}, &statsv1.PluginConfig{},
		&wrapperspb.StringValue{}, &alpnv2alpha1.FilterConfig{},
	} {
		anyTypes[m.ProtoReflect().Descriptor().FullName()] = true
	}
}
