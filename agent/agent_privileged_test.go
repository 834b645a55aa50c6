package agent_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/test/agentbed"
)

// TestPrivilegedEnrolment follows a namespace through the mesh: running
// pods are captured and annotated when it is labelled, new pods are
// captured before their first packet, pods are released when the label
// goes, and a deleted pod leaves nothing behind.
func TestPrivilegedEnrolment(t *testing.T) {
	e := newEnv(t, agentbed.Options{})
	e.Namespace("app", nil)
	running := e.StartPod("app", "before", nil)
	optOut := e.StartPod("app", "optout", map[string]string{"istio.io/dataplane-mode": "none"})
	if !e.HasProgram(running.TB) {
		t.Fatal("pod outside the mesh: veth has no program (inbound capture needs every veth)")
	}
	e.mustDirect(running)

	// Label the namespace: the running pod is captured and annotated.
	e.Namespace("app", ambient)
	testutil.Eventually(t, "running pod captured", func() bool { return e.Captured(running) })
	e.mustCaptured(running)
	testutil.Eventually(t, "running pod annotated", func() bool { return e.annotated(running) })
	e.mustDirect(optOut)

	// A new pod: its very first connection, started the moment CNI ADD
	// returns, is captured.
	p := e.CreatePod("app", "new", nil)
	if out, err := e.CNI("ADD", p); err != nil {
		t.Fatalf("CNI ADD: %v\n%s", err, out)
	}
	ok, err := e.connect(p)
	if err != nil || !ok {
		t.Fatalf("first connection of a new pod not captured: proxied=%v err=%v", ok, err)
	}
	e.Running(p)
	testutil.Eventually(t, "new pod annotated", func() bool { return e.annotated(p) })

	// Remove the label: released, annotation removed.
	e.Namespace("app", nil)
	testutil.Eventually(t, "released", func() bool { return !e.InMaps(running) && !e.InMaps(p) })
	e.mustDirect(running)
	e.mustDirect(p)
	testutil.Eventually(t, "annotation removed", func() bool { return !e.annotated(running) && !e.annotated(p) })

	// Pod-level enrolment, then deletion: the map entry goes.
	e.LabelPod(p, ambient)
	testutil.Eventually(t, "pod label captured", func() bool { return e.Captured(p) })
	e.mustCaptured(p)
	e.DeletePod(p)
	if e.InMaps(p) {
		t.Fatal("deleted pod still in the maps")
	}
	if v := e.Agent.Metric(t, "amber_agent_enrolled_pods"); v != "0" {
		t.Errorf("amber_agent_enrolled_pods = %q after everything left", v)
	}
	if len(e.events(running, "VethNotFound")) > 0 {
		t.Error("spurious warning events")
	}
}

// TestPrivilegedCNIWithoutAgent: with the agent down, the plugin fails the
// ADD of a pod that must be captured and lets a pod outside the mesh
// start, uncaptured; with the agent back the refused pod starts
// captured.
func TestPrivilegedCNIWithoutAgent(t *testing.T) {
	e := newEnv(t, agentbed.Options{})
	e.Namespace("mesh", ambient)
	e.Namespace("plain", nil)
	e.Agent.Stop(9)

	in := e.CreatePod("mesh", "in", nil)
	out, err := e.CNI("ADD", in)
	if err == nil {
		t.Fatalf("ADD of an enrolled pod succeeded without the agent:\n%s", out)
	}
	if !strings.Contains(out, "enrolled") {
		t.Errorf("error does not say why: %s", out)
	}
	podLabel := e.CreatePod("plain", "opted-in", ambient)
	if out, err := e.CNI("ADD", podLabel); err == nil {
		t.Fatalf("ADD of a pod enrolled by its own label succeeded without the agent:\n%s", out)
	}
	outside := e.CreatePod("plain", "outside", nil)
	if out, err := e.CNI("ADD", outside); err != nil {
		t.Fatalf("ADD of a pod outside the mesh failed without the agent: %v\n%s", err, out)
	}
	e.Running(outside)
	e.mustDirect(outside)
	if !e.HasProgram(outside.TB) {
		t.Fatal("pod started without the agent: no program on its veth (inbound capture of same-node pods needs it)")
	}
	// DEL without agent succeeds.
	if out, err := e.CNI("DEL", in); err != nil {
		t.Fatalf("DEL without agent: %v\n%s", err, out)
	}

	// The kubelet retries; the agent is back.
	e.Agent = e.StartAgent()
	if out, err := e.CNI("ADD", in); err != nil {
		t.Fatalf("ADD with the agent back: %v\n%s", err, out)
	}
	e.Running(in)
	e.mustCaptured(in)
	e.mustDirect(outside)
}

// TestPrivilegedLeastCapabilities runs the agent as the DaemonSet does —
// in the node's network namespace, root with only the capabilities
// deploy/manifests/daemonset.yaml grants it — and checks that capture,
// CNI ADD and quarantine all work with them.
func TestPrivilegedLeastCapabilities(t *testing.T) {
	caps := daemonSetCaps(t, "amber-agent")
	t.Logf("capabilities from the DaemonSet: %v", caps)
	e := newEnv(t, agentbed.Options{Caps: caps, MaxPods: 2})
	e.Namespace("app", nil)
	running := e.StartPod("app", "before", nil)
	e.mustDirect(running)
	e.Namespace("app", ambient)
	testutil.Eventually(t, "running pod captured", func() bool { return e.Captured(running) })
	e.mustCaptured(running)
	testutil.Eventually(t, "annotated", func() bool { return e.annotated(running) })

	p := e.CreatePod("app", "new", nil)
	if out, err := e.CNI("ADD", p); err != nil {
		t.Fatalf("CNI ADD: %v\n%s", err, out)
	}
	if ok, err := e.connect(p); err != nil || !ok {
		t.Fatalf("first connection: proxied=%v err=%v", ok, err)
	}
	// Over capacity: refused and quarantined (policy routing rules).
	over := e.CreatePod("app", "over", nil)
	if out, err := e.CNI("ADD", over); err == nil {
		t.Fatalf("ADD over capacity succeeded:\n%s", out)
	}
	if _, err := e.connect(over); err == nil {
		t.Fatal("quarantined pod connected")
	}
	e.DeletePod(p)
	if e.InMaps(p) {
		t.Fatal("deleted pod still in the maps")
	}
}

func daemonSetCaps(t *testing.T, container string) []string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("..", "deploy", "manifests", "daemonset.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var ds appsv1.DaemonSet
	if err := yaml.UnmarshalStrict(data, &ds); err != nil {
		t.Fatal(err)
	}
	for _, c := range ds.Spec.Template.Spec.Containers {
		if c.Name != container {
			continue
		}
		sc := c.SecurityContext
		if sc == nil || sc.Capabilities == nil || sc.Privileged != nil && *sc.Privileged {
			t.Fatalf("%s: no capability list, or privileged", container)
		}
		if len(sc.Capabilities.Drop) != 1 || sc.Capabilities.Drop[0] != "ALL" {
			t.Fatalf("%s drops %v, want ALL", container, sc.Capabilities.Drop)
		}
		var out []string
		for _, c := range sc.Capabilities.Add {
			out = append(out, string(c))
		}
		return out
	}
	t.Fatalf("no container %s", container)
	return nil
}

// TestPrivilegedInstallUninstall: the agent chains amber-cni into the
// node's configuration; stopping for a restart leaves the plugin and the
// capture in place; stopping because the DaemonSet was deleted removes
// both.
func TestPrivilegedInstallUninstall(t *testing.T) {
	const ptp = `{"cniVersion":"1.0.0","name":"kindnet","plugins":[{"type":"ptp","ipam":{"type":"host-local"}}]}`
	e := newEnv(t, agentbed.Options{})
	ctx := context.Background()
	e.Namespace("mesh", ambient)
	p := e.StartPod("mesh", "p", nil)
	e.mustCaptured(p)

	// The agent as the DaemonSet runs it: its own pod, owned by the
	// DaemonSet, and the node's CNI directories.
	ds, err := e.Admin.AppsV1().DaemonSets("istio-system").Create(ctx, &appsv1.DaemonSet{
		ObjectMeta: metav1.ObjectMeta{Name: "ztunnel", Namespace: "istio-system"},
		Spec: appsv1.DaemonSetSpec{
			Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "ztunnel"}},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{"app": "ztunnel"}},
				Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "a", Image: "registry.invalid/amber:1"}}},
			},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = e.Admin.CoreV1().Pods("istio-system").Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "ztunnel-x", Namespace: "istio-system",
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "DaemonSet", Name: ds.Name, UID: ds.UID}}},
		Spec: corev1.PodSpec{NodeName: agentbed.NodeName, HostNetwork: true, Containers: []corev1.Container{{Name: "a", Image: "registry.invalid/amber:1"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	binDir, confDir := filepath.Join(e.Dir, "opt-cni-bin"), filepath.Join(e.Dir, "net.d")
	os.MkdirAll(confDir, 0o755)
	conf := filepath.Join(confDir, "10-kindnet.conflist")
	if err := os.WriteFile(conf, []byte(ptp), 0o644); err != nil {
		t.Fatal(err)
	}
	e.Agent.Stop(syscall.SIGKILL)
	e.ExtraArgs = []string{"-pod-name", "ztunnel-x", "-pod-namespace", "istio-system",
		"-cni-bin-dir", binDir, "-cni-conf-dir", confDir, "-cni-plugin", cniBin}
	e.Agent = e.StartAgent()
	chained := func() bool {
		data, err := os.ReadFile(conf)
		return err == nil && strings.Contains(string(data), `"amber-cni"`) && strings.Contains(string(data), `"ptp"`)
	}
	if !chained() {
		t.Fatalf("not chained after ready:\n%s", readFile(conf))
	}
	if _, err := os.Stat(filepath.Join(binDir, "amber-cni")); err != nil {
		t.Fatal(err)
	}

	// The primary CNI rewrites its configuration: re-chained.
	os.WriteFile(conf, []byte(ptp), 0o644)
	testutil.Eventually(t, "re-chained", chained)

	// A restart: SIGTERM with the DaemonSet in place.
	e.Agent.Stop(syscall.SIGTERM)
	if !chained() {
		t.Fatal("plugin removed on a restart")
	}
	e.mustCaptured(p)

	// Uninstall: the DaemonSet goes, then its pods.
	e.Agent = e.StartAgent()
	if err := e.Admin.AppsV1().DaemonSets("istio-system").Delete(ctx, "ztunnel", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	e.Agent.Stop(syscall.SIGTERM)
	if chained() || strings.Contains(readFile(conf), "amber") {
		t.Fatalf("plugin still chained after uninstall:\n%s", readFile(conf))
	}
	if !strings.Contains(readFile(conf), `"ptp"`) {
		t.Fatalf("primary CNI configuration damaged:\n%s", readFile(conf))
	}
	if _, err := os.Stat(filepath.Join(binDir, "amber-cni")); !os.IsNotExist(err) {
		t.Fatal("plugin binary left behind")
	}
	if _, err := os.Stat(e.Root); !os.IsNotExist(err) {
		t.Fatal("pins left behind")
	}
	if e.HasProgram(p.TB) {
		t.Fatal("program left on a pod veth")
	}
	e.mustDirectNoMaps(p)
}

func readFile(path string) string {
	data, _ := os.ReadFile(path)
	return string(data)
}
