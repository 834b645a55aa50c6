package capture

import (
	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	enrolled    prometheus.Gauge
	quarantined prometheus.Gauge
	errors      *prometheus.CounterVec
	syncLatency prometheus.Histogram
	fullLatency prometheus.Histogram
	cniLatency  prometheus.Histogram
	pruned      prometheus.Counter
}

func newMetrics(reg prometheus.Registerer, capacity int) *metrics {
	buckets := []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5}
	m := &metrics{
		enrolled: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "amber_agent_enrolled_pods", Help: "Pods on this node whose traffic is captured.",
		}),
		quarantined: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "amber_agent_quarantined_addresses", Help: "Pod addresses quarantined because their pod could not be captured.",
		}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "amber_agent_errors_total", Help: "Failures by reason.",
		}, []string{"reason"}),
		syncLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "amber_agent_pod_reconcile_duration_seconds", Help: "Time to bring one pod's datapath state in line with its view.", Buckets: buckets,
		}),
		fullLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "amber_agent_full_reconcile_duration_seconds", Help: "Time of a full reconciliation of every pod on the node.", Buckets: buckets,
		}),
		cniLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "amber_agent_cni_add_duration_seconds", Help: "Time the agent took to answer a CNI ADD.", Buckets: buckets,
		}),
		pruned: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "amber_agent_pruned_entries_total", Help: "Stale datapath entries removed by reconciliation.",
		}),
	}
	for _, r := range []string{ReasonVethNotFound, ReasonMapFull, ReasonCaptureFailed, ReasonAttachFailed, ReasonReleaseFailed, ReasonQuarantine, ReasonAnnotate, ReasonDrift} {
		m.errors.WithLabelValues(r)
	}
	if reg != nil {
		capGauge := prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "amber_agent_capacity_pods", Help: "Pods the membership maps can hold.",
		})
		capGauge.Set(float64(capacity))
		reg.MustRegister(m.enrolled, m.quarantined, m.errors, m.syncLatency, m.fullLatency, m.cniLatency, m.pruned, capGauge)
	}
	return m
}

// MapCollector reports the datapath's membership maps as they are in the
// kernel at scrape time.
type MapCollector struct {
	Datapath Datapath
	Capacity int
}

var (
	mapEntriesDesc = prometheus.NewDesc("amber_agent_map_entries", "Entries in a membership map, read from the kernel.", []string{"map"}, nil)
	mapUsageDesc   = prometheus.NewDesc("amber_agent_map_usage_ratio", "Entries in a membership map over its capacity.", []string{"map"}, nil)
)

// Describe implements prometheus.Collector.
func (m MapCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- mapEntriesDesc
	ch <- mapUsageDesc
}

// Collect implements prometheus.Collector.
func (m MapCollector) Collect(ch chan<- prometheus.Metric) {
	if members, err := m.Datapath.Members(); err == nil {
		ch <- prometheus.MustNewConstMetric(mapEntriesDesc, prometheus.GaugeValue, float64(len(members)), "amber_pods")
		ch <- prometheus.MustNewConstMetric(mapUsageDesc, prometheus.GaugeValue, float64(len(members))/float64(2*m.Capacity), "amber_pods")
	}
	if ifaces, err := m.Datapath.CapturedIfaces(); err == nil {
		ch <- prometheus.MustNewConstMetric(mapEntriesDesc, prometheus.GaugeValue, float64(len(ifaces)), "amber_ifaces")
		ch <- prometheus.MustNewConstMetric(mapUsageDesc, prometheus.GaugeValue, float64(len(ifaces))/float64(m.Capacity), "amber_ifaces")
	}
}
