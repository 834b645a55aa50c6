package proxy

import (
	"strings"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/amber-mesh/amber/tunnel/metrics"
	"github.com/amber-mesh/amber/waypoint/config"
)

// Causes of amber_waypoint_refused_total: why a stream, connection or
// request got a local reply or was closed instead of served. The HTTP/1
// reader's causes (waypoint/http1 Cause*) and the HTTP/2 guard's
// (waypoint/h2guard Cause*) count under their own names; the HTTP/2
// server's own refusals as "h2_" plus x/net's error name.
const (
	causeNoConfig         = "no_config"               // no configuration, or no connect_terminate/main_internal in it
	causeNoChain          = "no_filter_chain"         // the CONNECT's destination matches no chain
	causeChainRefused     = "chain_refused"           // the chain failed to compile: fail closed
	causeNotTLS           = "not_tls"                 // the HBONE connection has no peer certificate
	causeRBAC             = "rbac_denied"             // an RBAC filter denied (HTTP 403, TCP close)
	causeNoRoute          = "no_route"                // 404 NR
	causeNoCluster        = "no_cluster"              // the route's cluster does not exist, or weights are all zero
	causeClusterRefused   = "cluster_refused"         // the cluster failed to compile: 503
	causeNoHealthy        = "no_healthy_upstream"     // 503 UH
	causeOverflow         = "upstream_overflow"       // circuit breaker: 503 UO
	causeConnectFailure   = "upstream_connect_error"  // 503 UF
	causeUpstreamIdentity = "upstream_identity"       // no WDS identity for the endpoint, or the peer is not it
	causeSidecarMTLS      = "upstream_sidecar_mtls"   // a gateway's endpoint needs Istio mTLS to a sidecar: 503
	causeUpstreamReset    = "upstream_reset"          // 503 UC, or a reset after the response started
	causeTimeout          = "upstream_timeout"        // 504 UT
	causePath             = "path_normalization"      // 400 (or 307) from the HCM's path rules
	causeHTTP10           = "http10_refused"          // 426
	causeAbsolutePath     = "absolute_path"           // 404: not origin-form
	causeUnderscore       = "header_with_underscore"  // headers_with_underscores_action REJECT_REQUEST
	causeHeaderSize       = "header_too_large"        // HTTP/2 header over the limit: 431
	causeBodySize         = "body_too_large"          // 413
	causeHeaderTimeout    = "header_timeout"          // 408 slowloris
	causeH2Malformed      = "h2_malformed_request"    // RST_STREAM(PROTOCOL_ERROR) from the HTTP/2 server
	causeClientReset      = "client_reset"            // the client went away before the response (DC)
	causeStreamIdle       = "stream_idle_timeout"     // 504/408 "stream timeout" (SI), or the stream reset
	causeRequestTimeout   = "request_timeout"         // 408 "request timeout": the request not complete in time
	causeStreamDuration   = "max_stream_duration"     // 504/408 "downstream duration timeout", or the stream reset
	causeConnDuration     = "max_connection_duration" // the inner connection drained at its maximum age
)

// counters are amber_waypoint_*.
type counters struct {
	refused  *prometheus.CounterVec
	degraded *prometheus.GaugeVec
	problems prometheus.Gauge
}

func newCounters(p *Proxy) (*counters, error) {
	c := &counters{
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "amber_waypoint_refused_total",
			Help: "Streams, connections and requests refused or ended by the waypoint, by cause.",
		}, []string{"cause"}),
		degraded: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "amber_waypoint_config_degraded_fields",
			Help: "Fields of the current configuration accepted but not honoured (Config.Degraded), by reason.",
		}, []string{"reason"}),
		problems: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "amber_waypoint_config_problems",
			Help: "Parts of the current configuration refused (Config.Problems); their traffic fails closed.",
		}),
	}
	hbone := func(name, help string, stats any) prometheus.Collector {
		return &statsCollector{desc: prometheus.NewDesc(name, help, []string{"event"}, nil), read: func() map[string]uint64 { return metrics.AtomicFields(stats) }}
	}
	for _, col := range []prometheus.Collector{
		c.refused, c.degraded, c.problems,
		hbone("amber_waypoint_hbone_server_total", "Events of the HBONE server on :15008.", &p.hstats),
		hbone("amber_waypoint_hbone_client_total", "Events of the HBONE client pool towards endpoints.", &p.pstats),
	} {
		if err := p.reg.Register(col); err != nil {
			return nil, err
		}
	}
	return c, nil
}

func (c *counters) refuse(cause string) { c.refused.WithLabelValues(cause).Inc() }

// h2Error is x/net/http2's CountError. Stream errors are counted by the
// guard from the RST_STREAM they produce (h2_malformed_request); the
// rest end the inner connection.
func (c *counters) h2Error(name string) {
	if strings.HasPrefix(name, "stream_") {
		return
	}
	c.refuse("h2_" + name)
}

func (c *counters) setDegraded(cfg *config.Config) {
	c.degraded.Reset()
	if cfg == nil {
		c.problems.Set(0)
		return
	}
	for _, d := range cfg.Degraded {
		c.degraded.WithLabelValues(d.Reason).Inc()
	}
	c.problems.Set(float64(len(cfg.Problems)))
}

// statsCollector reports a Stats struct of atomic counters as one
// labelled counter family, read at scrape time.
type statsCollector struct {
	desc *prometheus.Desc
	read func() map[string]uint64
}

func (s *statsCollector) Describe(ch chan<- *prometheus.Desc) { ch <- s.desc }

func (s *statsCollector) Collect(ch chan<- prometheus.Metric) {
	for k, v := range s.read() {
		ch <- prometheus.MustNewConstMetric(s.desc, prometheus.CounterValue, float64(v), k)
	}
}
