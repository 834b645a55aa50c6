package realnode

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/amber-mesh/amber/bpf"
)

// The access log as amber's ztunnel writes it, through slog's own
// handlers in both -log-format values.
func TestParseLogLine(t *testing.T) {
	attrs := []any{
		"reporter", "destination",
		"src.addr", "10.244.1.5:41234",
		"src.identity", "spiffe://cluster.local/ns/amber-e2e/sa/notsleep",
		"bytes_sent", int64(0),
		"duration", 1500 * time.Microsecond,
		"error", `connection denied by policy: "deny" (no rule matched)`,
	}
	want := map[string]string{
		"msg":          "connection complete",
		"reporter":     "destination",
		"src.addr":     "10.244.1.5:41234",
		"src.identity": "spiffe://cluster.local/ns/amber-e2e/sa/notsleep",
		"bytes_sent":   "0",
		"error":        `connection denied by policy: "deny" (no rule matched)`,
	}
	for _, format := range []string{"text", "json"} {
		t.Run(format, func(t *testing.T) {
			var buf bytes.Buffer
			var h slog.Handler = slog.NewTextHandler(&buf, nil)
			if format == "json" {
				h = slog.NewJSONHandler(&buf, nil)
			}
			slog.New(h).Info("connection complete", attrs...)
			line := strings.TrimSpace(buf.String())
			r, ok := ParseLogLine(line)
			if !ok {
				t.Fatalf("not parsed: %s", line)
			}
			for k, v := range want {
				if r[k] != v {
					t.Errorf("%s = %q, want %q (line %s)", k, r[k], v, line)
				}
			}
			if r["time"] == "" || r["level"] != "INFO" || r["duration"] == "" {
				t.Errorf("time/level/duration missing: %v", r)
			}
		})
	}
	for _, junk := range []string{"", "goroutine 7 [running]:", "panic: boom", `key="unterminated`, "a=b c", "{not json"} {
		if r, ok := ParseLogLine(junk); ok {
			t.Errorf("%q parsed as %v", junk, r)
		}
	}
	log := "Defaulted container \"amber-ztunnel\"\n" +
		`time=2026-08-01T10:00:00Z level=INFO msg="connection complete" src.workload=sleep-1` + "\n" +
		`time=2026-08-01T10:00:01Z level=INFO msg="connection complete" src.workload=first-connection error=EOF` + "\n"
	line, ok := FindLogLine(log, func(r LogRecord) bool { return r["src.workload"] == "first-connection" })
	if !ok || !strings.Contains(line, "error=EOF") {
		t.Errorf("FindLogLine = %q, %v", line, ok)
	}
	if _, ok := FindLogLine(log, func(r LogRecord) bool { return r["src.workload"] == "first" }); ok {
		t.Error("FindLogLine matched a prefix")
	}
}

func TestParseMetrics(t *testing.T) {
	const text = `# HELP istio_tcp_connections_opened_total Connections opened.
# TYPE istio_tcp_connections_opened_total counter
istio_tcp_connections_opened_total{reporter="destination",source_principal="spiffe://cluster.local/ns/a/sa/sleep",response_flags="-"} 3
istio_tcp_connections_opened_total{reporter="source",destination_service="say \"hi\"",response_flags="DENY"} 1 1700000000000
process_open_fds 12
`
	ms, err := parseMetrics(strings.NewReader(text), []string{"istio_tcp_connections_opened_total"})
	if err != nil {
		t.Fatal(err)
	}
	want := []Metric{
		{Name: "istio_tcp_connections_opened_total", Value: 3, Labels: map[string]string{
			"reporter": "destination", "source_principal": "spiffe://cluster.local/ns/a/sa/sleep", "response_flags": "-"}},
		{Name: "istio_tcp_connections_opened_total", Value: 1, Labels: map[string]string{
			"reporter": "source", "destination_service": `say \"hi\"`, "response_flags": "DENY"}},
	}
	if !reflect.DeepEqual(ms, want) {
		t.Errorf("parseMetrics =\n%v\nwant\n%v", ms, want)
	}
	if got := Sum(ms, map[string]string{"response_flags": "DENY"}); got != 1 {
		t.Errorf("Sum(DENY) = %v, want 1", got)
	}
	all, err := parseMetrics(strings.NewReader(text), nil)
	if err != nil || len(all) != 3 || all[2].Name != "process_open_fds" || all[2].Value != 12 {
		t.Errorf("all samples: %v, %v", all, err)
	}
	if _, err := parseMetrics(strings.NewReader(`x{a="1" 2`+"\n"), nil); err == nil {
		t.Error("bad line accepted")
	}
}

// KubeNodes against a fake API (pods) and a fake kubectl that answers as
// amberctl, the pod proxy and kubectl logs would for each pod: each call
// must go to the pod on the node it names.
func TestUnitKubeNodes(t *testing.T) {
	ctx := context.Background()
	ztunnel := func(name, node string, phase corev1.PodPhase, deleting bool) *corev1.Pod {
		p := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: Namespace, Labels: map[string]string{"app": DaemonSet}},
			Spec:       corev1.PodSpec{NodeName: node},
			Status:     corev1.PodStatus{Phase: phase},
		}
		if deleting {
			now := metav1.Now()
			p.DeletionTimestamp = &now
			p.Finalizers = []string{"test"}
		}
		return p
	}
	client := fake.NewClientset(
		ztunnel("ztunnel-a", "node-a", corev1.PodRunning, false),
		ztunnel("ztunnel-b", "node-b", corev1.PodRunning, false),
		ztunnel("ztunnel-b-old", "node-b", corev1.PodRunning, true),
		ztunnel("ztunnel-c", "node-c", corev1.PodPending, false),
	)
	member := map[string]string{"ztunnel-a": "10.244.0.7", "ztunnel-b": "10.244.1.9"}
	var calls []string
	kubectl := func(_ context.Context, args ...string) ([]byte, error) {
		calls = append(calls, strings.Join(args, " "))
		switch {
		case len(args) >= 8 && args[2] == "exec" && args[5] == "amber-agent" && args[7] == "amberctl":
			ip, ok := member[args[3]]
			if !ok {
				return nil, fmt.Errorf("exec into %s", args[3])
			}
			if strings.Join(args[8:], " ") != "-o json" {
				return []byte("POD ADDRESS ...\n"), nil
			}
			return json.Marshal(&bpf.Status{PinRoot: bpf.DefaultPinRoot, Routing: "ok",
				Members:  []bpf.Member{{Addr: netip.MustParseAddr(ip), Ifindex: 4}},
				Counters: bpf.Counters{"assign_outbound": 2}})
		case len(args) == 3 && args[0] == "get" && args[1] == "--raw":
			for pod := range member {
				if args[2] == "/api/v1/namespaces/istio-system/pods/"+pod+":15020/proxy/metrics" {
					return fmt.Appendf(nil, "istio_tcp_connections_opened_total{pod=%q} 1\n", pod), nil
				}
			}
		case len(args) >= 6 && args[2] == "logs" && args[4] == "-c" && args[5] == "amber-ztunnel":
			return fmt.Appendf(nil, "level=INFO msg=\"connection complete\" reporter=%s\n", args[3]), nil
		case len(args) == 3 && args[0] == "apply" && args[1] == "-f":
			return nil, nil
		}
		return nil, fmt.Errorf("unexpected kubectl %s", strings.Join(args, " "))
	}
	k := &KubeNodes{Kubectl: kubectl, Client: client}
	tg := &Target{Kubectl: kubectl, Client: client, Manifests: filepath.Join(t.TempDir(), "manifests"), Nodes: k}

	st, err := k.Datapath(ctx, "node-b")
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Members) != 1 || st.Members[0].Addr != netip.MustParseAddr("10.244.1.9") || st.Counters["assign_outbound"] != 2 {
		t.Errorf("Datapath(node-b) = %+v", st)
	}
	for _, c := range []struct {
		node, ip string
		want     bool
	}{{"node-a", "10.244.0.7", true}, {"node-b", "10.244.0.7", false}, {"node-b", "10.244.1.9", true}} {
		if got, err := tg.Captured(ctx, c.node, c.ip); err != nil || got != c.want {
			t.Errorf("Captured(%s, %s) = %v, %v; want %v", c.node, c.ip, got, err, c.want)
		}
	}
	if _, err := k.Datapath(ctx, "node-c"); err == nil || !strings.Contains(err.Error(), "node-c") {
		t.Errorf("Datapath on a node without a running pod: %v", err)
	}
	if _, err := k.Datapath(ctx, ""); err == nil {
		t.Error("Datapath without a node succeeded")
	}

	ms, err := k.Metrics(ctx, "node-a", "istio_tcp_connections_opened_total")
	if err != nil || len(ms) != 1 || ms[0].Labels["pod"] != "ztunnel-a" {
		t.Errorf("Metrics(node-a) = %v, %v", ms, err)
	}
	ms, err = k.Metrics(ctx, "")
	if err != nil || Sum(ms, nil) != 2 {
		t.Errorf("Metrics(every node) = %v, %v", ms, err)
	}

	logs, err := k.ZtunnelLogs(ctx, "", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	var from []string
	for _, line := range strings.Split(strings.TrimSpace(logs), "\n") {
		r, _ := ParseLogLine(line)
		from = append(from, r["reporter"])
	}
	if !reflect.DeepEqual(from, []string{"ztunnel-a", "ztunnel-b"}) {
		t.Errorf("ZtunnelLogs(every node) read %v", from)
	}

	dump, err := k.MembershipDump(ctx, "node-a")
	if err != nil {
		t.Fatal(err)
	}
	var members []bpf.Member
	if err := json.Unmarshal([]byte(dump), &members); err != nil || len(members) != 1 || members[0].Addr.String() != "10.244.0.7" {
		t.Errorf("MembershipDump = %s (%v)", dump, err)
	}
	if out, err := k.Amberctl(ctx, "node-b"); err != nil || !strings.HasPrefix(out, "POD ADDRESS") {
		t.Errorf("Amberctl = %q, %v", out, err)
	}

	cmds, err := k.Commands(ctx, "node-b")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []string{cmds.Metrics, cmds.Logs, cmds.Amberctl, cmds.Membership} {
		if !strings.Contains(c, "ztunnel-b") || strings.Contains(c, "ztunnel-b-old") {
			t.Errorf("command %q is not for node-b's running pod", c)
		}
	}

	if err := tg.Apply(ctx, "x.yaml", "kind: List\n"); err != nil {
		t.Fatal(err)
	}
	f := filepath.Join(tg.Manifests, "x.yaml")
	if b, err := os.ReadFile(f); err != nil || string(b) != "kind: List\n" {
		t.Errorf("manifest file: %q, %v", b, err)
	}
	if last := calls[len(calls)-1]; last != "apply -f "+f {
		t.Errorf("last kubectl call %q", last)
	}
}
