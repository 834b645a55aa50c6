package realnode

import (
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"

	"github.com/amber-mesh/amber/test/images"
)

// The workloads of Istio's ambient getting-started, from the local test
// images: productpage (the echo server on images.EchoPort) behind a
// Service, and two clients, sleep and notsleep, whose containers wait in
// `curl -sleep` for `kubectl exec deploy/sleep -- curl URL`. Each runs
// as its own service account, so each has its own SPIFFE identity.
const (
	Productpage = "productpage"
	Sleep       = "sleep"
	NotSleep    = "notsleep"
)

// WorkloadsYAML returns the manifests of productpage, sleep and notsleep
// in namespace ns.
func WorkloadsYAML(ns string) string {
	var b strings.Builder
	b.WriteString(appYAML(ns, workload{Name: Productpage, Image: images.Echo.Ref}))
	b.WriteString(SleepYAML(ns))
	fmt.Fprintf(&b, `apiVersion: v1
kind: Service
metadata: {name: %[1]s, namespace: %[2]s, labels: {app: %[1]s}}
spec:
  selector: {app: %[1]s}
  ports: [{name: http, port: %[3]d, targetPort: %[3]d}]
`, Productpage, ns, images.EchoPort)
	return b.String()
}

// SleepYAML returns the manifests of sleep and notsleep in namespace ns:
// Istio's samples/sleep and its notsleep copy, from the local curl image.
func SleepYAML(ns string) string {
	return appYAML(ns, workload{Name: Sleep, Image: images.Curl.Ref, Args: []string{"-sleep"}}) +
		appYAML(ns, workload{Name: NotSleep, Image: images.Curl.Ref, Args: []string{"-sleep"}})
}

// appYAML returns a service account named w.Name and w's Deployment, its
// app label and account w.Name too.
func appYAML(ns string, w workload) string {
	w.App, w.ServiceAccount = w.Name, w.Name
	return fmt.Sprintf("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: %s, namespace: %s}\n---\n", w.Name, ns) + w.yaml(ns)
}

// L4PolicyYAML is the getting-started's L4 AuthorizationPolicy: only
// sleep's identity may reach productpage.
func L4PolicyYAML(ns string) string {
	return fmt.Sprintf(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: productpage-viewer, namespace: %[1]s}
spec:
  selector: {matchLabels: {app: %[2]s}}
  action: ALLOW
  rules:
    - from: [{source: {principals: ["cluster.local/ns/%[1]s/sa/%[3]s"]}}]
`, ns, Productpage, Sleep)
}

// PeerAuthenticationYAML is a namespace-wide PeerAuthentication in ns
// requiring mutual TLS (mode STRICT): istiod turns it into an L4 policy
// for the ztunnels that refuses connections without a peer identity.
func PeerAuthenticationYAML(ns string) string {
	return fmt.Sprintf(`apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: %s}
spec:
  mtls: {mode: STRICT}
`, ns)
}

// PortPermissiveYAML is a PeerAuthentication for app's workloads in ns:
// STRICT, except port, which admits plaintext (PERMISSIVE).
func PortPermissiveYAML(ns, app string, port int) string {
	return fmt.Sprintf(`apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: %[2]s-port-%[3]d, namespace: %[1]s}
spec:
  selector: {matchLabels: {app: %[2]s}}
  mtls: {mode: STRICT}
  portLevelMtls:
    %[3]d: {mode: PERMISSIVE}
`, ns, app, port)
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}
