package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/test/istiod"
	"github.com/amber-mesh/amber/test/kube"
	"github.com/amber-mesh/amber/test/meshbed"
	"github.com/amber-mesh/amber/test/testbed"
)

// Kubernetes names the istiod-mode tests use, as Istio's ambient install
// and node agent spell them.
const (
	meshNamespace        = "default"
	dataplaneModeLabel   = "istio.io/dataplane-mode"
	redirectionAnnot     = "ambient.istio.io/redirection"
	istiodForwardAddress = "127.0.0.1:15012" // istiod's port, inside each node
)

// istiodMesh is the bed of the istiod-mode tests: two testbed nodes with
// the datapath loaded, a real kube-apiserver holding the objects a kubelet
// and amber's node agent would leave behind (an ambient Namespace, running
// Pods with the testbed pods' addresses, a ztunnel Pod per node), and in
// each node a Forwarder on 127.0.0.1:15012 through which its ztunnel
// reaches istiod on the host's loopback (see meshbed.Forwarder for why).
//
// Everything lives as long as the test that called newIstiodMesh, also
// ztunnels started from one of its subtests: the restart test starts them
// next to an istiod whose life is one subtest.
type istiodMesh struct {
	t         *testing.T
	cp        *kube.ControlPlane
	istiodBin string
	n1, n2    *meshbed.Node
	dir       string

	fwd      map[*meshbed.Node]*meshbed.Forwarder
	rootFile string
	root     []byte
	tokens   map[*meshbed.Node]string // token file per node

	mu  sync.Mutex // guards zts
	zts map[*meshbed.Node]*ztunnel
}

// newIstiodMesh builds the nodes, the datapath, the API server and the
// forwarders; istiod and the ztunnels come later (connect, startZtunnels).
func newIstiodMesh(t *testing.T) *istiodMesh {
	t.Helper()
	n1, n2 := testbed.MustTwoNodes(t) // root gate first: no control plane for a skip
	m := &istiodMesh{
		t:         t,
		istiodBin: istiod.Binaries(t),
		cp:        kube.Start(t, kube.Options{}),
		dir:       t.TempDir(),
		fwd:       map[*meshbed.Node]*meshbed.Forwarder{},
		tokens:    map[*meshbed.Node]string{},
		zts:       map[*meshbed.Node]*ztunnel{},
	}
	m.n1 = meshbed.MustLoadDatapath(t, n1, "amber-e2e-istiod")
	m.n2 = meshbed.MustLoadDatapath(t, n2, "amber-e2e-istiod")
	for _, nd := range []*meshbed.Node{m.n1, m.n2} {
		m.fwd[nd] = meshbed.MustForward(t, nd.Node, istiodForwardAddress, "")
	}
	t.Cleanup(m.stopZtunnels)

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := m.cp.Client.CoreV1()
	for _, nd := range []*meshbed.Node{m.n1, m.n2} {
		node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: nd.Name}}
		if _, err := c.Nodes().Create(ctx, node, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create node %s: %v", nd.Name, err)
		}
	}
	ns, err := c.Namespaces().Get(ctx, meshNamespace, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if ns.Labels == nil {
		ns.Labels = map[string]string{}
	}
	ns.Labels[dataplaneModeLabel] = "ambient"
	if _, err := c.Namespaces().Update(ctx, ns, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("label namespace %s ambient: %v", meshNamespace, err)
	}
	return m
}

// addPod adds a testbed pod on nd and the running Pod object for it
// (service account and app label = name). An enrolled pod is captured by
// the datapath and annotated ambient.istio.io/redirection=enabled, as the
// node agent leaves it.
func (m *istiodMesh) addPod(t *testing.T, nd *meshbed.Node, name string, enrolled bool) *testbed.Pod {
	t.Helper()
	p, err := nd.AddPod(name)
	if err != nil {
		t.Fatal(err)
	}
	if err := nd.Attach(p); err != nil {
		t.Fatal(err)
	}
	if enrolled {
		nd.MustCapture(t, p)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c := m.cp.Client.CoreV1()
	if _, err := c.ServiceAccounts(meshNamespace).Create(ctx, &corev1.ServiceAccount{
		ObjectMeta: metav1.ObjectMeta{Name: name},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create service account %s: %v", name, err)
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: meshNamespace, Labels: map[string]string{"app": name}},
		Spec: corev1.PodSpec{
			NodeName:           nd.Name,
			ServiceAccountName: name,
			Containers:         []corev1.Container{{Name: name, Image: name}},
		},
	}
	if enrolled {
		pod.Annotations = map[string]string{redirectionAnnot: "enabled"}
	}
	m.runningPod(t, ctx, pod, nd, p.IPv4, p.IPv6)
	return p
}

// runningPod creates pod and sets the status a kubelet on nd would
// report.
func (m *istiodMesh) runningPod(t *testing.T, ctx context.Context, pod *corev1.Pod, nd *meshbed.Node, ips ...netip.Addr) *corev1.Pod {
	t.Helper()
	p, err := kube.RunningPod(ctx, m.cp.Client, pod, []netip.Addr{nd.IPv4, nd.IPv6}, ips...)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// enroll does what the node agent does when a pod joins the mesh:
// capture it, then annotate it.
func (m *istiodMesh) enroll(t *testing.T, nd *meshbed.Node, p *testbed.Pod) {
	t.Helper()
	nd.MustCapture(t, p)
	patch := fmt.Sprintf(`{"metadata":{"annotations":{%q:"enabled"}}}`, redirectionAnnot)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := m.cp.Client.CoreV1().Pods(meshNamespace).Patch(ctx, p.Name, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatalf("annotate pod %s: %v", p.Name, err)
	}
}

// deletePod deletes a pod's object from the API server, at once (there is
// no kubelet to finish a graceful deletion).
func (m *istiodMesh) deletePod(t *testing.T, name string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := m.cp.Client.CoreV1().Pods(meshNamespace).Delete(ctx, name, *metav1.NewDeleteOptions(0)); err != nil {
		t.Fatalf("delete pod %s: %v", name, err)
	}
}

// connect points both nodes' forwarders at d. The first call also writes
// the mesh root certificate for the ztunnels and creates each node's
// ztunnel Pod and its pod-bound token; later calls (a restarted istiod)
// check that the root is still the same, which it is because istiod keeps
// its self-signed CA in the istio-ca-secret Secret.
func (m *istiodMesh) connect(t *testing.T, d *istiod.Istiod) {
	t.Helper()
	if m.rootFile != "" {
		if !bytes.Equal(d.RootPEM, m.root) {
			t.Fatalf("istiod's root certificate changed across the restart:\nbefore:\n%s\nafter:\n%s", m.root, d.RootPEM)
		}
	} else {
		m.root = d.RootPEM
		m.rootFile = filepath.Join(m.dir, "root-cert.pem")
		if err := os.WriteFile(m.rootFile, d.RootPEM, 0o644); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		for _, nd := range []*meshbed.Node{m.n1, m.n2} {
			zp := m.runningPod(t, ctx, &corev1.Pod{
				ObjectMeta: metav1.ObjectMeta{Name: "ztunnel-" + nd.Name, Namespace: istiod.Namespace},
				Spec: corev1.PodSpec{
					NodeName: nd.Name, ServiceAccountName: istiod.ZtunnelServiceAccount, HostNetwork: true,
					Containers: []corev1.Container{{Name: "istio-proxy", Image: "amber"}},
				},
			}, nd, nd.IPv4, nd.IPv6)
			tok, err := d.Token(ctx, zp)
			if err != nil {
				t.Fatal(err)
			}
			// In the mesh's directory, not the (sub)test's: the ztunnel
			// reads it again on every stream to istiod, also after the
			// istiod it was minted against has gone.
			m.tokens[nd] = filepath.Join(m.dir, "token-"+nd.Name)
			if err := os.WriteFile(m.tokens[nd], []byte(tok), 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, f := range m.fwd {
		f.SetTarget(d.Address)
	}
}

// startZtunnels starts amber-ztunnel in istiod mode on both nodes. They
// live until the mesh's test ends, even when t is one of its subtests.
func (m *istiodMesh) startZtunnels(t *testing.T) (z1, z2 *ztunnel) {
	t.Helper()
	for _, nd := range []*meshbed.Node{m.n1, m.n2} {
		log := &syncBuffer{}
		z, err := meshbed.StartZtunnelIstiod(nd, ztunnelBin, meshbed.IstiodConfig{
			Address:      m.fwd[nd].Addr.String(),
			ServerName:   istiod.ServerName,
			RootCertFile: m.rootFile,
			TokenFile:    m.tokens[nd],
			PodName:      "ztunnel-" + nd.Name,
			PodNamespace: istiod.Namespace,
		}, log)
		if err != nil {
			t.Fatalf("%v\n%s", err, log)
		}
		m.mu.Lock()
		m.zts[nd] = &ztunnel{Ztunnel: z, log: log}
		m.mu.Unlock()
	}
	return m.zts[m.n1], m.zts[m.n2]
}

func (m *istiodMesh) stopZtunnels() {
	m.mu.Lock()
	defer m.mu.Unlock()
	for nd, z := range m.zts {
		if err := z.Stop(); err != nil {
			m.t.Errorf("ztunnel on %s: %v\n%s", nd.Name, err, z.log)
		}
		if m.t.Failed() {
			m.t.Logf("ztunnel %s log:\n%s", nd.Name, z.log)
		}
	}
	m.zts = nil
}

// kubectlApply applies a manifest.
func (m *istiodMesh) kubectlApply(t *testing.T, manifest string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := m.cp.Apply(ctx, manifest); err != nil {
		t.Fatal(err)
	}
}

// deletePolicy deletes an AuthorizationPolicy in the mesh namespace.
func (m *istiodMesh) deletePolicy(t *testing.T, name string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if out, err := m.cp.Kubectl(ctx, "delete", "-n", meshNamespace, "authorizationpolicies.security.istio.io", name); err != nil {
		t.Errorf("%v\n%s", err, out)
	}
}

// configDump is the part of the ztunnel's /config_dump the tests read.
type configDump struct {
	Workloads []struct {
		Name      string       `json:"name"`
		Namespace string       `json:"namespace"`
		Identity  string       `json:"identity"`
		Node      string       `json:"node"`
		Protocol  string       `json:"protocol"`
		Addresses []netip.Addr `json:"addresses"`
		// AuthorizationPolicies are "namespace/name" keys.
		Policies []string `json:"authorization_policies"`
	} `json:"workloads"`
	Policies []struct {
		Name      string
		Namespace string
		Groups    []json.RawMessage
	} `json:"policies"`
	Certificates []struct {
		Identity string    `json:"identity"`
		NotAfter time.Time `json:"not_after"`
		Error    string    `json:"error"`
	} `json:"certificates"`
	XDS struct {
		Connected bool
		Connects  uint64
	} `json:"xds"`
}

func (z *ztunnel) configDump() (*configDump, error) {
	body, err := z.ConfigDump()
	if err != nil {
		return nil, err
	}
	var d configDump
	if err := json.Unmarshal([]byte(body), &d); err != nil {
		return nil, fmt.Errorf("config_dump: %w", err)
	}
	return &d, nil
}

// protocolOf returns the protocol of the workload named name in the
// meshNamespace, or "" when the ztunnel does not know it.
func (d *configDump) protocolOf(name string) string {
	for _, w := range d.Workloads {
		if w.Namespace == meshNamespace && w.Name == name {
			return w.Protocol
		}
	}
	return ""
}

// policy returns the number of rule groups of the named policy in the mesh
// namespace, or -1 when the ztunnel does not have it.
func (d *configDump) policy(name string) int {
	for _, p := range d.Policies {
		if p.Namespace == meshNamespace && p.Name == name {
			return len(p.Groups)
		}
	}
	return -1
}

// waitProtocol waits until z knows the workload name with protocol want
// ("" = unknown).
func waitProtocol(tb testing.TB, z *ztunnel, name, want string) {
	tb.Helper()
	testutil.EventuallyNil(tb, fmt.Sprintf("workload %s with protocol %q on %s", name, want, z.Node.Name), func() error {
		d, err := z.configDump()
		if err != nil {
			return err
		}
		if got := d.protocolOf(name); got != want {
			return fmt.Errorf("protocol %q", got)
		}
		return nil
	})
}

// waitPolicy waits until z holds the named policy and the workload
// selected by it lists it (present), or neither does: a workload-selector
// policy applies to a workload once both have arrived.
func waitPolicy(tb testing.TB, z *ztunnel, name, workload string, present bool) *configDump {
	tb.Helper()
	var d *configDump
	testutil.EventuallyNil(tb, fmt.Sprintf("policy %s on %s present=%v on %s", name, workload, present, z.Node.Name), func() error {
		var err error
		if d, err = z.configDump(); err != nil {
			return err
		}
		if got := d.policy(name) >= 0; got != present {
			return fmt.Errorf("policy present=%v", got)
		}
		if got := d.workloadHasPolicy(workload, name); got != present {
			return fmt.Errorf("workload %s lists it: %v", workload, got)
		}
		return nil
	})
	return d
}

// workloadHasPolicy reports whether the named workload lists the policy.
func (d *configDump) workloadHasPolicy(workload, policy string) bool {
	for _, w := range d.Workloads {
		if w.Namespace == meshNamespace && w.Name == workload {
			return slices.Contains(w.Policies, meshNamespace+"/"+policy)
		}
	}
	return false
}

// mustHoldingEcho is mustEcho whose connections stay open until the
// client closes them or the test ends (mustEcho's give up after 10 s, too
// short to outlive an istiod restart).
func mustHoldingEcho(tb testing.TB, p *testbed.Pod, port int) *echoServer {
	return startEcho(tb, p, port, 0)
}

// held is a long-lived connection from a pod through the mesh.
type held struct {
	net.Conn
	name string
}

// mustHold dials addr from p and checks one echo; the connection is
// closed when the test ends.
func mustHold(tb testing.TB, p *testbed.Pod, addr netip.AddrPort) *held {
	tb.Helper()
	h, err := hold(p, addr)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { h.Close() })
	return h
}

// hold dials addr from p and checks one echo; the caller closes it.
func hold(p *testbed.Pod, addr netip.AddrPort) (*held, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := p.Dial(ctx, "tcp", addr.String())
	if err != nil {
		return nil, fmt.Errorf("%s → %s: %w", p.Name, addr, err)
	}
	h := &held{Conn: c, name: fmt.Sprintf("%s → %s", p.Name, addr)}
	if err := h.echo("hello"); err != nil {
		c.Close()
		return nil, err
	}
	return h, nil
}

// echo sends msg and expects it back.
func (h *held) echo(msg string) error {
	h.SetDeadline(time.Now().Add(5 * time.Second))
	defer h.SetDeadline(time.Time{})
	if _, err := h.Write([]byte(msg)); err != nil {
		return fmt.Errorf("%s: write: %w", h.name, err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(h, buf); err != nil {
		return fmt.Errorf("%s: read: %w", h.name, err)
	}
	if string(buf) != msg {
		return fmt.Errorf("%s: echo %q, want %q", h.name, buf, msg)
	}
	return nil
}

// closedWithin reports nil once the peer closes the connection (EOF or
// reset) within d, and an error if it stays open or sends data.
func (h *held) closedWithin(d time.Duration) error {
	h.SetReadDeadline(time.Now().Add(d))
	defer h.SetReadDeadline(time.Time{})
	var buf [64]byte
	n, err := h.Read(buf[:])
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return fmt.Errorf("%s: still open after %v", h.name, d)
	case err == nil:
		return fmt.Errorf("%s: got %q instead of a close", h.name, buf[:n])
	}
	return nil
}

// uplinkCapture records every TCP packet on a node's uplink with tcpdump.
type uplinkCapture struct {
	file string
	cmd  interface{ Signal(os.Signal) error }
	done chan error
	log  *syncBuffer
	once sync.Once
}

func mustCaptureUplink(tb testing.TB, n *testbed.Node, dir string) *uplinkCapture {
	tb.Helper()
	c := &uplinkCapture{file: filepath.Join(dir, n.Name+"-uplink.pcap"), done: make(chan error, 1), log: &syncBuffer{}}
	cmd := n.Command(context.Background(), "tcpdump", "--immediate-mode", "-Z", "root", "-i", n.Uplink, "-U", "-n", "-s", "0", "-w", c.file, "tcp")
	cmd.Stderr = c.log
	if err := cmd.Start(); err != nil {
		tb.Fatalf("tcpdump: %v", err)
	}
	c.cmd = cmd.Process
	go func() { c.done <- cmd.Wait() }()
	tb.Cleanup(func() { c.stop() })
	testutil.Eventually(tb, "tcpdump to listen", func() bool { return strings.Contains(c.log.String(), "listening on") })
	return c
}

// stop ends the capture and returns the pcap file's contents.
func (c *uplinkCapture) stop() ([]byte, error) {
	c.once.Do(func() {
		c.cmd.Signal(syscall.SIGINT)
		select {
		case <-c.done:
		case <-time.After(5 * time.Second):
			c.cmd.Signal(syscall.SIGKILL)
			<-c.done
		}
	})
	return os.ReadFile(c.file)
}

// peerChain completes a TLS handshake with addr's HBONE listener from the
// node nd, without a client certificate, and returns the chain the server
// presented: the destination workload's certificate.
func peerChain(nd *testbed.Node, addr netip.AddrPort) ([]*x509.Certificate, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	nc, err := nd.Dial(ctx, "tcp", addr.String())
	if err != nil {
		return nil, err
	}
	defer nc.Close()
	var chain []*x509.Certificate
	tc := tls.Client(nc, &tls.Config{
		// The chain is verified by the caller against istiod's root; the
		// handshake itself only has to get far enough to receive it.
		InsecureSkipVerify: true,
		NextProtos:         []string{"h2"},
		MinVersion:         tls.VersionTLS13,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			for _, der := range raw {
				c, err := x509.ParseCertificate(der)
				if err != nil {
					return err
				}
				chain = append(chain, c)
			}
			return nil
		},
	})
	// In TLS 1.3 the server checks the (missing) client certificate after
	// the client finished, so the handshake may fail or not: the chain was
	// received either way.
	_ = tc.HandshakeContext(ctx)
	if len(chain) == 0 {
		return nil, fmt.Errorf("tls to %s: no certificate received", addr)
	}
	return chain, nil
}
