// Command amber-demo plays Istio ambient's getting-started walkthrough on
// one machine, in amber's local mode: two nodes and their pods as network
// namespaces, the datapath loaded on each node as the agent does, a real
// amber-ztunnel per node with workloads and policies from a mesh file, and
// a local CA. It prints each step, what it did and what it saw, and exits
// non-zero when an expectation fails.
//
// The Kubernetes edition (a real node, istiod, `kubectl label`) replaces
// this walkthrough once the agent, the real node and istiod integration are
// in place; the mesh behaviour shown here is the same code.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/amber-mesh/amber/test/meshbed"
	"github.com/amber-mesh/amber/test/testbed"
	"github.com/amber-mesh/amber/tunnel/ca"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "\n✗ demo failed: %v\n", err)
		os.Exit(1)
	}
	fmt.Println("\n✓ demo complete: everything above was observed, and has been torn down.")
}

var stepN int

func step(title string) {
	stepN++
	fmt.Printf("\n━━ %d. %s\n", stepN, title)
}

func say(format string, args ...any) { fmt.Printf("   "+format+"\n", args...) }

// logBuffer collects a ztunnel's JSON log.
type logBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) lines() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Split(l.b.String(), "\n")
}

func run() error {
	if os.Geteuid() != 0 {
		return errors.New("the demo creates network namespaces and loads BPF programs: run it as root")
	}
	tmp, err := os.MkdirTemp("", "amber-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)

	step("Build amber-ztunnel and amberctl")
	ztunnelBin, err := meshbed.BuildZtunnel(tmp)
	if err != nil {
		return err
	}
	amberctl := filepath.Join(tmp, "amberctl")
	if out, err := exec.Command("go", "build", "-o", amberctl, "github.com/amber-mesh/amber/cmd/amberctl").CombinedOutput(); err != nil {
		return fmt.Errorf("build amberctl: %v\n%s", err, out)
	}
	say("built into %s", tmp)

	step("Two nodes and three pods (network namespaces joined by veths)")
	bed, err := testbed.NewBed("demo")
	if err != nil {
		return err
	}
	defer bed.Close()
	n1, err := bed.AddNode("node1")
	if err != nil {
		return err
	}
	n2, err := bed.AddNode("node2")
	if err != nil {
		return err
	}
	sleep, err := n1.AddPod("sleep")
	if err != nil {
		return err
	}
	notsleep, err := n1.AddPod("notsleep")
	if err != nil {
		return err
	}
	productpage, err := n2.AddPod("productpage")
	if err != nil {
		return err
	}
	for _, p := range []*testbed.Pod{sleep, notsleep, productpage} {
		say("%-12s on %s  %s  %s  (host veth %s)", p.Name, p.Node.Name, p.IPv4, p.IPv6, p.HostVeth)
	}
	stopPP, err := serveProductpage(productpage)
	if err != nil {
		return err
	}
	defer stopPP()
	url := fmt.Sprintf("http://%s/", netip.AddrPortFrom(productpage.IPv4, 9080))

	step("Before the mesh: sleep → productpage in plaintext")
	body, err := curl(sleep, url)
	if err != nil {
		return fmt.Errorf("plaintext request: %w", err)
	}
	say("$ curl %s  (from sleep)\n   %s", url, body)

	step("Load amber's datapath on both nodes (what amber-agent does on each node)")
	var nodes []*meshbed.Node
	defer func() {
		for _, nd := range nodes {
			nd.Close()
		}
	}()
	for _, n := range []*testbed.Node{n1, n2} {
		nd, err := meshbed.LoadDatapath(n, "amber-demo")
		if err != nil {
			return err
		}
		nodes = append(nodes, nd)
		say("%s: TCX programs on the uplink and every pod veth, maps pinned at %s", n.Name, nd.Root)
	}

	step("Enrol the pods: kubectl label namespace default istio.io/dataplane-mode=ambient")
	say("(local mode: the agent's part is Capture in the BPF maps, the mesh file plays istiod)")
	for _, p := range []*testbed.Pod{sleep, notsleep} {
		if err := nodes[0].Capture(p); err != nil {
			return err
		}
	}
	if err := nodes[1].Capture(productpage); err != nil {
		return err
	}
	workloads := []meshbed.Workload{
		{Name: "sleep", ServiceAccount: "sleep", Pod: sleep, HBONE: true},
		{Name: "notsleep", ServiceAccount: "notsleep", Pod: notsleep, HBONE: true},
		{Name: "productpage", ServiceAccount: "productpage", Pod: productpage, HBONE: true, Labels: map[string]string{"app": "productpage"}},
	}
	meshFile := filepath.Join(tmp, "mesh.yaml")
	if err := os.WriteFile(meshFile, []byte(meshbed.MeshYAML(workloads, "")), 0o644); err != nil {
		return err
	}
	caDir := filepath.Join(tmp, "ca")
	if _, err := ca.OpenLocal(caDir, "cluster.local"); err != nil {
		return err
	}
	logs := map[string]*logBuffer{}
	var zs []*meshbed.Ztunnel
	defer func() {
		for _, z := range zs {
			z.Stop()
		}
	}()
	for _, nd := range nodes {
		lb := &logBuffer{}
		z, err := meshbed.StartZtunnel(nd, ztunnelBin, meshFile, caDir, lb)
		if err != nil {
			return err
		}
		zs = append(zs, z)
		logs[nd.Name] = lb
		say("%s: amber-ztunnel ready (listeners 15001/15006/15008 registered in the datapath)", nd.Name)
	}

	step("sleep and notsleep → productpage, now through the mesh (HBONE, mTLS)")
	for _, c := range []*testbed.Pod{sleep, notsleep} {
		body, err := curl(c, url)
		if err != nil {
			return fmt.Errorf("%s through the mesh: %w", c.Name, err)
		}
		say("$ kubectl exec deploy/%s -- curl %s\n   %s", c.Name, url, body)
	}
	for _, sa := range []string{"sleep", "notsleep"} {
		v, line, err := metric(zs[1], "istio_tcp_connections_opened_total", map[string]string{
			"reporter": "destination", "connection_security_policy": "mutual_tls",
			"source_principal": "spiffe://cluster.local/ns/default/sa/" + sa,
		})
		if err != nil {
			return err
		}
		if v < 1 {
			return fmt.Errorf("no mutual_tls connection from %s in node2's metrics", sa)
		}
		say("node2 :15020/stats/prometheus → %s", line)
	}

	step("Apply an L4 AuthorizationPolicy: only sleep's principal may reach productpage")
	policy := `policies:
  - name: productpage-viewer
    selector:
      matchLabels: {app: productpage}
    action: ALLOW
    rules:
      - from:
          - source:
              principals: [cluster.local/ns/default/sa/sleep]
`
	say("%s", strings.ReplaceAll(strings.TrimSpace(policy), "\n", "\n   "))
	if err := os.WriteFile(meshFile, []byte(meshbed.MeshYAML(workloads, policy)), 0o644); err != nil {
		return err
	}
	// The ztunnels reload the mesh file; wait until notsleep is refused.
	deadline := time.Now().Add(15 * time.Second)
	for {
		if _, err := curl(notsleep, url); err != nil {
			break
		}
		if time.Now().After(deadline) {
			return errors.New("notsleep still reaches productpage 15 s after the policy")
		}
		time.Sleep(200 * time.Millisecond)
	}
	body, err = curl(sleep, url)
	if err != nil {
		return fmt.Errorf("sleep after the policy: %w", err)
	}
	say("$ kubectl exec deploy/sleep -- curl %s\n   %s", url, body)
	_, err = curl(notsleep, url)
	say("$ kubectl exec deploy/notsleep -- curl %s\n   refused: %v", url, err)
	denial := ""
	for _, l := range logs["node2"].lines() {
		if strings.Contains(l, "notsleep") && strings.Contains(l, "denied by policy") {
			denial = l
			break
		}
	}
	if denial == "" {
		return errors.New("node2's access log has no denial for notsleep")
	}
	say("node2 access log: %s", summarize(denial))
	v, line, err := metric(zs[1], "istio_tcp_connections_opened_total", map[string]string{
		"reporter": "destination", "source_principal": "spiffe://cluster.local/ns/default/sa/notsleep", "response_flags": "DENY",
	})
	if err != nil {
		return err
	}
	if v < 1 {
		return errors.New("no DENY in node2's metrics")
	}
	say("node2 metrics: %s", line)

	step("Inspect node1: amberctl and bpftool")
	out, err := nodes[0].Command(context.Background(), amberctl, "-pin-root", nodes[0].Root).CombinedOutput()
	if err != nil {
		return fmt.Errorf("amberctl: %v\n%s", err, out)
	}
	say("$ amberctl\n%s", indent(string(out)))
	out, err = exec.Command("bpftool", "map", "dump", "pinned", filepath.Join(nodes[0].Root, "amber_pods")).CombinedOutput()
	if err != nil {
		return fmt.Errorf("bpftool: %v\n%s", err, out)
	}
	say("$ bpftool map dump pinned %s/amber_pods\n%s", nodes[0].Root, indent(string(out)))

	step("Tear down: ztunnels stopped, datapath uninstalled, namespaces removed")
	return nil
}

// serveProductpage answers HTTP on :9080 in the pod with who asked.
func serveProductpage(p *testbed.Pod) (func(), error) {
	ln, err := p.Listen("tcp", "[::]:9080")
	if err != nil {
		return nil, err
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "productpage: hello %s", r.RemoteAddr)
	})}
	go srv.Serve(ln)
	return func() { srv.Close() }, nil
}

// curl GETs url from inside pod p.
func curl(p *testbed.Pod, url string) (string, error) {
	c := &http.Client{
		Timeout: 3 * time.Second,
		Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				return p.Dial(ctx, network, addr)
			},
		},
	}
	resp, err := c.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("status %s", resp.Status)
	}
	return string(b), nil
}

// metric sums the samples of name carrying every wanted label and returns
// one matching line to show.
func metric(z *meshbed.Ztunnel, name string, want map[string]string) (float64, string, error) {
	_, body, err := z.Get(15020, "/stats/prometheus")
	if err != nil {
		return 0, "", err
	}
	var sum float64
	var shown string
	sc := bufio.NewScanner(strings.NewReader(body))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"{") {
			continue
		}
		ok := true
		for k, v := range want {
			if !strings.Contains(line, fmt.Sprintf("%s=%q", k, v)) {
				ok = false
			}
		}
		if !ok {
			continue
		}
		var v float64
		fmt.Sscanf(line[strings.LastIndexByte(line, ' ')+1:], "%g", &v)
		sum += v
		if shown == "" {
			shown = line
		}
	}
	return sum, shown, nil
}

// summarize keeps the access-log fields a reader cares about.
func summarize(line string) string {
	var m map[string]any
	if json.Unmarshal([]byte(line), &m) != nil {
		return line
	}
	var parts []string
	for _, k := range []string{"msg", "reporter", "src.identity", "dst.identity", "src.addr", "dst.addr", "error"} {
		if v, ok := m[k]; ok {
			parts = append(parts, fmt.Sprintf("%s=%v", k, v))
		}
	}
	return strings.Join(parts, " ")
}

func indent(s string) string {
	return "     " + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n     ")
}
