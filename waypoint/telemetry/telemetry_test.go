package telemetry

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// TestRequestSeries checks that requests land in their own label set's
// series, also when cached, and that label values which would join to
// the same string with a separator stay apart.
func TestRequestSeries(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := New(reg)
	if err != nil {
		t.Fatal(err)
	}
	a := &Labels{Source: Peer{Workload: "a\x00b", Namespace: "c"}, ResponseCode: 200}
	b := &Labels{Source: Peer{Workload: "a", Namespace: "b\x00c"}, ResponseCode: 200}
	denied := &Labels{Source: Peer{Workload: "a\x00b", Namespace: "c"}, ResponseCode: 403}
	for range 3 {
		m.Request(a, time.Millisecond, 10, 20)
	}
	m.Request(b, time.Millisecond, 10, 20)
	m.Request(denied, time.Millisecond, 10, 20)

	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{} // source workload/namespace/code -> count
	series := map[string]int{}
	for _, f := range families {
		series[f.GetName()] = len(f.GetMetric())
		if f.GetName() != "istio_requests_total" {
			continue
		}
		for _, mt := range f.GetMetric() {
			got[label(mt, "source_workload")+"/"+label(mt, "source_workload_namespace")+"/"+label(mt, "response_code")] = mt.GetCounter().GetValue()
		}
	}
	want := map[string]float64{"a\x00b/c/200": 3, "a/b\x00c/200": 1, "a\x00b/c/403": 1}
	if len(got) != len(want) {
		t.Errorf("istio_requests_total series %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("istio_requests_total{%q} = %v, want %v", k, got[k], v)
		}
	}
	if n := series["istio_request_duration_milliseconds"]; n != 3 {
		t.Errorf("istio_request_duration_milliseconds has %d series, want 3", n)
	}
}

func label(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}
