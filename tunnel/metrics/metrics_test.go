package metrics

import (
	"io"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
)

func scrape(t *testing.T, m *Metrics) string {
	t.Helper()
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	b, err := io.ReadAll(rec.Result().Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func line(body, prefix string) string {
	for _, l := range strings.Split(body, "\n") {
		if strings.HasPrefix(l, prefix) {
			return l
		}
	}
	return ""
}

// The four istio_tcp_* series carry exactly Istio's labels, unknown values
// say "unknown", and a connection is closed once however often Close is
// called — what dashboards built for Istio's ztunnel read.
func TestConnectionMetrics(t *testing.T) {
	m := New()
	l := Labels{
		Reporter:                 ReporterDestination,
		SourcePrincipal:          "spiffe://cluster.local/ns/default/sa/sleep",
		DestinationWorkload:      "productpage",
		ConnectionSecurityPolicy: MutualTLS,
		RequestProtocol:          ProtocolTCP,
	}
	var c Conn
	m.Open(&c, l)
	c.Received(60)
	c.Sent(42)
	c.Sent(-1) // ignored
	c.Close()
	c.Close()
	// A second connection with the same labels adds to the same series
	// (looked up once, then kept); one with other labels does not.
	var c2 Conn
	m.Open(&c2, l)
	c2.Received(40)
	c2.Close()
	other := l
	other.ResponseFlags = "DENY"
	var c3 Conn
	m.Open(&c3, other)
	c3.Close()
	body := scrape(t, m)

	if got := line(body, "istio_tcp_connections_closed_total{"); !strings.Contains(got, `response_flags="DENY"`) || !strings.HasSuffix(got, " 1") {
		t.Errorf("the other label set's series: %q", got)
	}
	want := `{connection_security_policy="mutual_tls",destination_principal="unknown",destination_service="unknown",destination_workload="productpage",destination_workload_namespace="unknown",reporter="destination",request_protocol="tcp",response_flags="unknown",source_principal="spiffe://cluster.local/ns/default/sa/sleep",source_workload="unknown",source_workload_namespace="unknown"}`
	for name, v := range map[string]string{
		"istio_tcp_connections_opened_total": "2",
		"istio_tcp_connections_closed_total": "2",
		"istio_tcp_received_bytes_total":     "100",
		"istio_tcp_sent_bytes_total":         "42",
	} {
		got := line(body, name+want+" ")
		if got != name+want+" "+v {
			t.Errorf("got  %s\nwant %s", got, name+want+" "+v)
		}
	}
}

func TestCounterFunc(t *testing.T) {
	m := New()
	var s struct {
		RapidResets  atomic.Uint64
		HeaderFloods atomic.Uint64
	}
	s.RapidResets.Add(3)
	if err := m.RegisterCounterFunc("amber_hbone_abuse_total", "abuse", "reason", func() map[string]uint64 { return AtomicFields(&s) }); err != nil {
		t.Fatal(err)
	}
	body := scrape(t, m)
	if l := line(body, `amber_hbone_abuse_total{reason="rapid_resets"}`); !strings.HasSuffix(l, " 3") {
		t.Errorf("rapid_resets: %q\n%s", l, body)
	}
	if l := line(body, `amber_hbone_abuse_total{reason="header_floods"}`); !strings.HasSuffix(l, " 0") {
		t.Errorf("header_floods: %q", l)
	}
}

func TestCounterSamples(t *testing.T) {
	m := New()
	err := m.RegisterCounterSamples("amber_accept_errors_total", "accept errors", []string{"listener", "errno"}, func() []Sample {
		return []Sample{{Labels: []string{"outbound", "EMFILE"}, Value: 7}}
	})
	if err != nil {
		t.Fatal(err)
	}
	if l := line(scrape(t, m), `amber_accept_errors_total{errno="EMFILE",listener="outbound"}`); !strings.HasSuffix(l, " 7") {
		t.Errorf("sample: %q", l)
	}
}

func TestGaugeSamples(t *testing.T) {
	m := New()
	n := uint64(2)
	err := m.RegisterGaugeSamples("amber_waypoint_config_problems", "refused parts", []string{"type"}, func() []Sample {
		return []Sample{{Labels: []string{"listener"}, Value: n}}
	})
	if err != nil {
		t.Fatal(err)
	}
	body := scrape(t, m)
	if !strings.Contains(body, "# TYPE amber_waypoint_config_problems gauge") {
		t.Errorf("not a gauge:\n%s", body)
	}
	n = 0
	if l := line(scrape(t, m), `amber_waypoint_config_problems{type="listener"}`); !strings.HasSuffix(l, " 0") {
		t.Errorf("a gauge goes down: %q", l)
	}
}
