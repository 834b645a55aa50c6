// Package telemetry is amber-waypoint's Prometheus metrics: Istio's
// istio_requests_* and istio_tcp_* with the label set an Envoy waypoint
// reports (istio/proxy testdata/metric/server_waypoint_proxy_request_total.yaml.tmpl),
// in Istio's label order, and amber's own counters.
package telemetry

import (
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Unknown is the value of a label whose value is not known, as in Istio.
const Unknown = "unknown"

// Values of Labels fields.
const (
	ReporterWaypoint = "waypoint"
	// ReporterSource is an ingress gateway's: its listeners are
	// outbound, and istiod sets no reporter for them, which Istio's
	// stats filter reads as the client side.
	ReporterSource = "source"
	MutualTLS      = "mutual_tls"
	ProtocolHTTP   = "http"
	ProtocolGRPC   = "grpc"
	ProtocolTCP    = "tcp"
	NoFlags        = "-"
)

// requestLabels are the labels of istio_requests_* in Istio's order; the
// TCP metrics have the same without response_code and
// grpc_response_status.
var requestLabels = []string{
	"reporter",
	"source_workload",
	"source_canonical_service",
	"source_canonical_revision",
	"source_workload_namespace",
	"source_principal",
	"source_app",
	"source_version",
	"source_cluster",
	"destination_workload",
	"destination_workload_namespace",
	"destination_principal",
	"destination_app",
	"destination_version",
	"destination_service",
	"destination_canonical_service",
	"destination_canonical_revision",
	"destination_service_name",
	"destination_service_namespace",
	"destination_cluster",
	"request_protocol",
	"response_code",
	"grpc_response_status",
	"response_flags",
	"connection_security_policy",
}

// Peer is what telemetry says about one side: a workload from WDS, or only
// a principal.
type Peer struct {
	Workload, Namespace                 string
	CanonicalService, CanonicalRevision string
	Principal                           string
	App, Version                        string
	Cluster                             string
}

// Service is the destination service.
type Service struct {
	Host, Name, Namespace string
}

// Labels are one request's or connection's labels. Empty fields are
// reported as Unknown, except GRPCStatus, which is empty for HTTP as in
// Istio.
type Labels struct {
	// Reporter is ReporterWaypoint (zero) or ReporterSource.
	Reporter                 string
	Source, Destination      Peer
	Service                  Service
	Protocol                 string
	ResponseCode             int
	GRPCStatus               string
	ResponseFlags            string
	ConnectionSecurityPolicy string
}

func orUnknown(s string) string {
	if s == "" {
		return Unknown
	}
	return s
}

func (l *Labels) values(request bool) []string {
	s, d := &l.Source, &l.Destination
	reporter := l.Reporter
	if reporter == "" {
		reporter = ReporterWaypoint
	}
	v := []string{
		reporter,
		orUnknown(s.Workload), orUnknown(s.CanonicalService), orUnknown(s.CanonicalRevision),
		orUnknown(s.Namespace), orUnknown(s.Principal), orUnknown(s.App), orUnknown(s.Version), orUnknown(s.Cluster),
		orUnknown(d.Workload), orUnknown(d.Namespace), orUnknown(d.Principal), orUnknown(d.App), orUnknown(d.Version),
		orUnknown(l.Service.Host), orUnknown(d.CanonicalService), orUnknown(d.CanonicalRevision),
		orUnknown(l.Service.Name), orUnknown(l.Service.Namespace), orUnknown(d.Cluster),
		orUnknown(l.Protocol),
	}
	if request {
		code := "0"
		if l.ResponseCode != 0 {
			code = strconv.Itoa(l.ResponseCode)
		}
		v = append(v, code, l.GRPCStatus)
	}
	flags := l.ResponseFlags
	if flags == "" {
		flags = NoFlags
	}
	return append(v, flags, orUnknown(l.ConnectionSecurityPolicy))
}

// Istio's default buckets (istio/proxy extensions/stats): durations in
// milliseconds, sizes in bytes.
var (
	durationBuckets = []float64{0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000, 1800000, 3600000}
	sizeBuckets     = []float64{1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000, 1000000000}
)

// Metrics holds the waypoint's metric families. Its methods are safe for
// concurrent use.
type Metrics struct {
	requests               *prometheus.CounterVec
	duration, reqSz, rspSz *prometheus.HistogramVec
	tcpOpened, tcpClosed   *prometheus.CounterVec
	tcpRecv, tcpSent       *prometheus.CounterVec

	// series caches each request label set's four children, so that a
	// request hashes its labels once, not once per family with
	// validation. Series are never deleted, so a cached child stays the
	// registered one.
	series sync.Map // seriesKey(label values) -> *requestSeries
}

// seriesKey joins label values unambiguously, each prefixed by its
// length (a value may hold any byte).
func seriesKey(v []string) string {
	var b strings.Builder
	for _, s := range v {
		b.WriteString(strconv.Itoa(len(s)))
		b.WriteByte(':')
		b.WriteString(s)
	}
	return b.String()
}

// requestSeries is one label set's istio_request* children.
type requestSeries struct {
	requests               prometheus.Counter
	duration, reqSz, rspSz prometheus.Observer
}

// New registers the istio_requests_* and istio_tcp_* families with reg.
func New(reg prometheus.Registerer) (*Metrics, error) {
	tcpLabels := append(append([]string{}, requestLabels[:21]...), requestLabels[23:]...)
	m := &Metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_requests_total", Help: "Total requests"}, requestLabels),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "istio_request_duration_milliseconds", Help: "Request duration in milliseconds", Buckets: durationBuckets}, requestLabels),
		reqSz:    prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "istio_request_bytes", Help: "Request size in bytes (headers and body)", Buckets: sizeBuckets}, requestLabels),
		rspSz:    prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "istio_response_bytes", Help: "Response size in bytes (headers and body)", Buckets: sizeBuckets}, requestLabels),

		tcpOpened: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_connections_opened_total", Help: "Total TCP connections opened"}, tcpLabels),
		tcpClosed: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_connections_closed_total", Help: "Total TCP connections closed"}, tcpLabels),
		tcpRecv:   prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_received_bytes_total", Help: "Total bytes received by the destination of TCP connections"}, tcpLabels),
		tcpSent:   prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_sent_bytes_total", Help: "Total bytes sent by the destination of TCP connections"}, tcpLabels),
	}
	for _, c := range []prometheus.Collector{m.requests, m.duration, m.reqSz, m.rspSz, m.tcpOpened, m.tcpClosed, m.tcpRecv, m.tcpSent} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// Request records one completed request: duration, and the sizes of the
// request and the response (headers and body, as Istio counts them).
func (m *Metrics) Request(l *Labels, d time.Duration, reqBytes, rspBytes int64) {
	v := l.values(true)
	key := seriesKey(v)
	c, ok := m.series.Load(key)
	if !ok {
		c, _ = m.series.LoadOrStore(key, &requestSeries{
			requests: m.requests.WithLabelValues(v...),
			duration: m.duration.WithLabelValues(v...),
			reqSz:    m.reqSz.WithLabelValues(v...),
			rspSz:    m.rspSz.WithLabelValues(v...),
		})
	}
	rs := c.(*requestSeries)
	rs.requests.Inc()
	rs.duration.Observe(float64(d) / float64(time.Millisecond))
	rs.reqSz.Observe(float64(reqBytes))
	rs.rspSz.Observe(float64(rspBytes))
}

// TCPConn is the metric state of one TCP connection.
type TCPConn struct {
	closed, recv, sent prometheus.Counter
}

// OpenTCP counts a TCP connection opened with labels l.
func (m *Metrics) OpenTCP(l *Labels) *TCPConn {
	v := l.values(false)
	m.tcpOpened.WithLabelValues(v...).Inc()
	return &TCPConn{closed: m.tcpClosed.WithLabelValues(v...), recv: m.tcpRecv.WithLabelValues(v...), sent: m.tcpSent.WithLabelValues(v...)}
}

// Received counts n bytes from the client towards the destination.
func (c *TCPConn) Received(n int64) {
	if n > 0 {
		c.recv.Add(float64(n))
	}
}

// Sent counts n bytes from the destination towards the client.
func (c *TCPConn) Sent(n int64) {
	if n > 0 {
		c.sent.Add(float64(n))
	}
}

// Close counts the connection closed; call it once.
func (c *TCPConn) Close() { c.closed.Inc() }
