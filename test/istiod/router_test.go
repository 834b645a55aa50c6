package istiod_test

import (
	"context"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/test/istiod"
	"github.com/amber-mesh/amber/test/kube"
	"github.com/amber-mesh/amber/test/waypointgolden"
	"github.com/amber-mesh/amber/waypoint/node"
)

// The walkthrough's ingress gateway (legacy chart, istio-system) and a
// Gateway API gateway's pod (class istio), as the kubelet and the
// EndpointSlice controller would leave them. Addresses are fixed so that
// the goldens are too.
const (
	ingressPod   = "istio-ingressgateway-5d8f7c9b4-abcde"
	ingressIP    = "10.244.0.30"
	ingressVIP   = "10.96.10.30"
	gwapiPod     = "bookinfo-gateway-istio-6c9f8d7b5-fghij"
	gwapiIP      = "10.244.0.31"
	gwapiVIP     = "10.96.10.31"
	gwapiGateway = "bookinfo-gateway"
)

// ingressNode is the legacy chart's gateway pod as pilot-agent describes
// it (ISTIO_META_UNPRIVILEGED_POD from the chart).
func ingressNode() node.Node {
	return node.Node{
		Type: node.Router, IP: netip.MustParseAddr(ingressIP), PodName: ingressPod, Namespace: istiod.Namespace,
		ServiceAccount: istiod.IngressServiceAccount, NodeName: nodeName, WorkloadName: istiod.IngressName,
		Labels: istiod.IngressLabels(), Extra: map[string]string{"UNPRIVILEGED_POD": "true"},
	}
}

// gwapiNode is the kube-gateway template's pod of Gateway bookinfo-gateway.
func gwapiNode() node.Node {
	return node.Node{
		Type: node.Router, IP: netip.MustParseAddr(gwapiIP), PodName: gwapiPod, Namespace: meshNS,
		ServiceAccount: istiod.GatewayAPIName(gwapiGateway), NodeName: nodeName, TrustDomain: "cluster.local",
		WorkloadName: istiod.GatewayAPIName(gwapiGateway), Labels: istiod.GatewayAPILabels(gwapiGateway),
	}
}

// setupIngress creates the two gateways' service accounts, pods and
// Services.
func setupIngress(t *testing.T, ctx context.Context, cp *kube.ControlPlane) (ingress, gwapi *corev1.Pod) {
	t.Helper()
	c := cp.Client.CoreV1()
	for _, sa := range []struct{ ns, name string }{{istiod.Namespace, istiod.IngressServiceAccount}, {meshNS, istiod.GatewayAPIName(gwapiGateway)}} {
		_, err := c.ServiceAccounts(sa.ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa.name}}, metav1.CreateOptions{})
		must(t, err)
	}
	ingress = runningPod(t, ctx, cp, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: ingressPod, Namespace: istiod.Namespace, Labels: istiod.IngressLabels()},
		Spec: corev1.PodSpec{NodeName: nodeName, ServiceAccountName: istiod.IngressServiceAccount,
			Containers: []corev1.Container{{Name: "istio-proxy", Image: "amber"}}},
	}, ingressIP)
	svc := istiod.IngressService()
	svc.Spec.ClusterIP = ingressVIP
	createService(t, ctx, cp, svc, []*corev1.Pod{ingress})

	gwapi = runningPod(t, ctx, cp, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: gwapiPod, Namespace: meshNS, Labels: istiod.GatewayAPILabels(gwapiGateway)},
		Spec: corev1.PodSpec{NodeName: nodeName, ServiceAccountName: istiod.GatewayAPIName(gwapiGateway),
			Containers: []corev1.Container{{Name: "istio-proxy", Image: "amber"}}},
	}, gwapiIP)
	gsvc := istiod.GatewayAPIService(meshNS, gwapiGateway, 80, 443)
	gsvc.Spec.ClusterIP = gwapiVIP
	createService(t, ctx, cp, gsvc, []*corev1.Pod{gwapi})
	return ingress, gwapi
}

// routerScenario is one router golden: what to apply (cumulative, in
// order), which gateway pod's node captures it, and what shows it.
type routerScenario struct {
	name  string
	apply func(t *testing.T, ctx context.Context, cp *kube.ControlPlane)
	node  func() node.Node
	pod   func(ingress, gwapi *corev1.Pod) *corev1.Pod
	shows func(map[string][]byte) error
}

var routerScenarios = []routerScenario{
	{
		// The 2022 walkthrough's bookinfo-gateway.yaml: server port 80, the
		// legacy chart's Service maps it to listener 8080.
		name: "router-bookinfo-gateway",
		apply: func(t *testing.T, ctx context.Context, cp *kube.ControlPlane) {
			applyYAML(t, ctx, cp, "bookinfo-gateway", istiod.BookinfoGatewayYAML(meshNS))
		},
		node:  ingressNode,
		pod:   func(ingress, _ *corev1.Pod) *corev1.Pod { return ingress },
		shows: contains("rds.json", "outbound|9080||productpage.default.svc.cluster.local", "/api/v1/products"),
	},
	{
		// samples/bookinfo/gateway-api/bookinfo-gateway.yaml.
		name: "router-gateway-api",
		apply: func(t *testing.T, ctx context.Context, cp *kube.ControlPlane) {
			applyYAML(t, ctx, cp, "gateway-api-bookinfo", istiod.GatewayAPIBookinfoYAML(meshNS))
		},
		node:  gwapiNode,
		pod:   func(_, gwapi *corev1.Pod) *corev1.Pod { return gwapi },
		shows: contains("rds.json", "outbound|9080||productpage.default.svc.cluster.local", "path_separated_prefix"),
	},
	{
		// An HTTPS listener terminating TLS with a Secret (certificateRefs):
		// istiod serves the Secret to the gateway's pod over SDS.
		name: "router-gateway-api-tls",
		apply: func(t *testing.T, ctx context.Context, cp *kube.ControlPlane) {
			applyYAML(t, ctx, cp, "gateway-api-tls", istiod.BookinfoTLSYAML(meshNS))
		},
		node:  gwapiNode,
		pod:   func(_, gwapi *corev1.Pod) *corev1.Pod { return gwapi },
		shows: contains("sds.json", "bookinfo-cert", "certificate_chain", "private_key"),
	},
	{
		// istio.io/ingress-use-waypoint on productpage's Service: the
		// gateway's EDS for productpage names the waypoint.
		name: "router-ingress-use-waypoint",
		apply: func(t *testing.T, ctx context.Context, cp *kube.ControlPlane) {
			svcs := cp.Client.CoreV1().Services(meshNS)
			s, err := svcs.Get(ctx, "productpage", metav1.GetOptions{})
			must(t, err)
			s.Labels["istio.io/ingress-use-waypoint"] = "true"
			_, err = svcs.Update(ctx, s, metav1.UpdateOptions{})
			must(t, err)
		},
		node:  ingressNode,
		pod:   func(ingress, _ *corev1.Pod) *corev1.Pod { return ingress },
		shows: contains("eds.json", `"waypoint": "`+waypointIP+`:15008"`),
	},
}

// TestIntegrationRouterGoldens regenerates, from a real istiod, the
// configuration it sends an ingress gateway (node type router) for each
// scenario and compares it with the committed goldens, as
// TestIntegrationWaypointGoldens does for the waypoint (-update rewrites
// them).
func TestIntegrationRouterGoldens(t *testing.T) {
	bin := istiod.Binaries(t)
	version := istioVersion(t)
	cp := kube.Start(t, kube.Options{})
	d := istiod.Start(t, cp, istiod.Options{BinDir: bin, GatewayAPI: true})

	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	setupWaypointMesh(t, ctx, cp)
	waitGatewayAddress(t, ctx, cp)
	ingress, gwapi := setupIngress(t, ctx, cp)

	dir := filepath.Join(waypointgolden.Dir(), version)
	for _, sc := range routerScenarios {
		ok := t.Run(sc.name, func(t *testing.T) {
			sc.apply(t, ctx, cp)
			pod := sc.pod(ingress, gwapi)
			token, err := d.TokenFor(ctx, pod.Namespace, pod.Spec.ServiceAccountName, pod)
			must(t, err)
			n, err := sc.node().Proto()
			must(t, err)
			snap := func() (map[string][]byte, error) { return captureFiles(ctx, d, token, n, true) }
			testutil.EventuallyNil(t, "istiod's router config showing "+sc.name, func() error {
				files, err := snap()
				if err != nil {
					return err
				}
				return sc.shows(files)
			})
			compareGolden(t, filepath.Join(dir, sc.name), stableCapture(t, sc.name, snap))
		})
		if !ok {
			t.FailNow()
		}
	}
}
