// Package metrics is the ztunnel's Prometheus registry: Istio's
// istio_tcp_* connection metrics, with Istio's label set, and amber's own
// counters.
package metrics

import (
	"net/http"
	"reflect"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Unknown is the value of a label whose value is not known, as in Istio.
const Unknown = "unknown"

// Values of Labels fields.
const (
	ReporterSource      = "source"
	ReporterDestination = "destination"
	MutualTLS           = "mutual_tls"
	NoTLS               = "none"
	ProtocolTCP         = "tcp"
)

// labelNames are Istio's TCP metric labels (docs/facts.md §3, Metrics), in
// Labels order.
var labelNames = []string{
	"reporter",
	"source_workload",
	"source_workload_namespace",
	"source_principal",
	"destination_workload",
	"destination_workload_namespace",
	"destination_principal",
	"destination_service",
	"request_protocol",
	"connection_security_policy",
	"response_flags",
}

// Labels are the labels of one connection. Empty fields are reported as
// Unknown; principals are SPIFFE URIs ("spiffe://td/ns/NS/sa/SA").
type Labels struct {
	Reporter                     string
	SourceWorkload               string
	SourceWorkloadNamespace      string
	SourcePrincipal              string
	DestinationWorkload          string
	DestinationWorkloadNamespace string
	DestinationPrincipal         string
	DestinationService           string
	RequestProtocol              string
	ConnectionSecurityPolicy     string
	ResponseFlags                string
}

func (l Labels) values() []string {
	v := []string{
		l.Reporter, l.SourceWorkload, l.SourceWorkloadNamespace, l.SourcePrincipal,
		l.DestinationWorkload, l.DestinationWorkloadNamespace, l.DestinationPrincipal,
		l.DestinationService, l.RequestProtocol, l.ConnectionSecurityPolicy, l.ResponseFlags,
	}
	for i := range v {
		if v[i] == "" {
			v[i] = Unknown
		}
	}
	return v
}

// Metrics holds the registry. Its methods are safe for concurrent use.
type Metrics struct {
	reg                        *prometheus.Registry
	opened, closed, recv, sent *prometheus.CounterVec

	mu     sync.RWMutex // guards the field below
	series map[Labels]*series
}

// series are the four counters of one label set. Looked up once and kept
// (the vectors keep every label set too, so this bounds nothing new), they
// save each connection four vector lookups, each hashing all eleven
// label values, and its handle their four counters.
type series struct{ opened, closed, recv, sent prometheus.Counter }

// New returns a registry with the ztunnel's istio_tcp_* metrics and the
// Go and process collectors.
func New() *Metrics {
	m := NewRegistry()
	vec := func(name, help string) *prometheus.CounterVec {
		v := prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, labelNames)
		m.reg.MustRegister(v)
		return v
	}
	m.opened = vec("istio_tcp_connections_opened_total", "Total TCP connections opened")
	m.closed = vec("istio_tcp_connections_closed_total", "Total TCP connections closed")
	m.recv = vec("istio_tcp_received_bytes_total", "Total bytes received by the destination of TCP connections")
	m.sent = vec("istio_tcp_sent_bytes_total", "Total bytes sent by the destination of TCP connections")
	return m
}

// NewRegistry returns a registry with only the Go and process collectors
// and amber's counters registered later: for a proxy whose istio_*
// families have another label set (amber-waypoint registers its own
// istio_tcp_* with an Envoy waypoint's labels). Open panics on it.
func NewRegistry() *Metrics {
	m := &Metrics{reg: prometheus.NewRegistry(), series: make(map[Labels]*series)}
	m.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Registry returns the registry, for registering more collectors.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Handler serves the registry in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

// Conn is the metric state of one connection: opened at creation, bytes
// counted as they flow, closed once.
type Conn struct {
	*series
	done atomic.Bool
}

// Open counts a new connection with labels l, and makes c (a zero Conn)
// its handle. c is usually a field of the connection's own state rather
// than an allocation of its own: an idle connection holds it.
func (m *Metrics) Open(c *Conn, l Labels) {
	c.series = m.seriesOf(l)
	c.opened.Inc()
}

// seriesOf returns l's counters.
func (m *Metrics) seriesOf(l Labels) *series {
	m.mu.RLock()
	s := m.series[l]
	m.mu.RUnlock()
	if s != nil {
		return s
	}
	v := l.values()
	s = &series{
		opened: m.opened.WithLabelValues(v...),
		closed: m.closed.WithLabelValues(v...),
		recv:   m.recv.WithLabelValues(v...),
		sent:   m.sent.WithLabelValues(v...),
	}
	m.mu.Lock()
	m.series[l] = s // the same counters as any concurrent first lookup's
	m.mu.Unlock()
	return s
}

// Received counts n bytes from the client towards the destination.
func (c *Conn) Received(n int64) {
	if n > 0 {
		c.recv.Add(float64(n))
	}
}

// Sent counts n bytes from the destination back to the client.
func (c *Conn) Sent(n int64) {
	if n > 0 {
		c.sent.Add(float64(n))
	}
}

// Close counts the connection closed; later calls do nothing.
func (c *Conn) Close() {
	if c.done.CompareAndSwap(false, true) {
		c.closed.Inc()
	}
}

// Sample is one value of a labelled counter family.
type Sample struct {
	Labels []string // label values, in the family's label order
	Value  uint64
}

// funcCollector reports values read from a function at scrape time.
type funcCollector struct {
	desc *prometheus.Desc
	kind prometheus.ValueType
	read func() []Sample
}

func (f *funcCollector) Describe(ch chan<- *prometheus.Desc) { ch <- f.desc }

func (f *funcCollector) Collect(ch chan<- prometheus.Metric) {
	for _, s := range f.read() {
		ch <- prometheus.MustNewConstMetric(f.desc, f.kind, float64(s.Value), s.Labels...)
	}
}

// RegisterCounterFunc registers a counter family name{label=key} whose
// values read returns at every scrape (for counters kept elsewhere: the
// datapath's per-CPU map, a library's Stats). read may return nil.
func (m *Metrics) RegisterCounterFunc(name, help, label string, read func() map[string]uint64) error {
	return m.RegisterCounterSamples(name, help, []string{label}, func() []Sample {
		var out []Sample
		for k, v := range read() {
			out = append(out, Sample{Labels: []string{k}, Value: v})
		}
		return out
	})
}

// RegisterCounterSamples is RegisterCounterFunc for a family with several
// labels.
func (m *Metrics) RegisterCounterSamples(name, help string, labels []string, read func() []Sample) error {
	return m.reg.Register(&funcCollector{desc: prometheus.NewDesc(name, help, labels, nil), kind: prometheus.CounterValue, read: read})
}

// RegisterGaugeSamples registers a gauge family whose values read returns
// at every scrape (a count of what is the case now, e.g. the parts of a
// configuration refused).
func (m *Metrics) RegisterGaugeSamples(name, help string, labels []string, read func() []Sample) error {
	return m.reg.Register(&funcCollector{desc: prometheus.NewDesc(name, help, labels, nil), kind: prometheus.GaugeValue, read: read})
}

var camel = regexp.MustCompile(`([a-z0-9])([A-Z])`)

// SnakeCase turns a Go field name into a label value: "StreamsOpened" →
// "streams_opened".
func SnakeCase(s string) string { return strings.ToLower(camel.ReplaceAllString(s, "${1}_${2}")) }

// AtomicFields reads every exported sync/atomic.Uint64 field of the struct
// *p points to, keyed by SnakeCase(field name): a Stats struct of counters
// becomes one labelled family without listing its fields twice.
func AtomicFields(p any) map[string]uint64 {
	v := reflect.ValueOf(p).Elem()
	out := make(map[string]uint64)
	for i := range v.NumField() {
		f := v.Type().Field(i)
		if !f.IsExported() {
			continue
		}
		if a, ok := v.Field(i).Addr().Interface().(*atomic.Uint64); ok {
			out[SnakeCase(f.Name)] = a.Load()
		}
	}
	return out
}
