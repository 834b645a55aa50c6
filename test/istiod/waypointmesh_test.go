package istiod_test

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/amber-mesh/amber/test/istiod"
	"github.com/amber-mesh/amber/test/kube"
	"github.com/amber-mesh/amber/waypoint/node"
)

// The L7 half of Istio ambient's walkthrough as the API server holds it
// once the kubelet, the EndpointSlice controller and `istioctl waypoint
// apply --enroll-namespace` have run: bookinfo (productpage, reviews v1/v2
// behind reviews and reviews-v1/-v2, ratings, details), sleep, and the
// waypoint's pod, Service and Gateway. Addresses are fixed so that the
// goldens are too.
const (
	meshNS       = "default"
	waypointName = "waypoint"
	waypointPod  = "waypoint-7d5c9b8f6-x2x7q"
	waypointIP   = "10.244.0.20"
	waypointVIP  = "10.96.10.20"
)

type meshPod struct {
	name, sa, ip string
	labels       map[string]string
}

type meshService struct {
	name, vip string
	selector  map[string]string
	port      int32
}

var (
	meshPods = []meshPod{
		{"sleep", "sleep", "10.244.0.5", map[string]string{"app": "sleep"}},
		{"productpage-v1", "bookinfo-productpage", "10.244.0.10", map[string]string{"app": "productpage", "version": "v1"}},
		{"reviews-v1", "bookinfo-reviews", "10.244.0.11", map[string]string{"app": "reviews", "version": "v1"}},
		{"reviews-v2", "bookinfo-reviews", "10.244.0.12", map[string]string{"app": "reviews", "version": "v2"}},
		{"ratings-v1", "bookinfo-ratings", "10.244.0.13", map[string]string{"app": "ratings", "version": "v1"}},
		{"details-v1", "bookinfo-details", "10.244.0.14", map[string]string{"app": "details", "version": "v1"}},
	}
	meshServices = []meshService{
		{"productpage", "10.96.10.1", map[string]string{"app": "productpage"}, 9080},
		{"reviews", "10.96.10.2", map[string]string{"app": "reviews"}, 9080},
		{"reviews-v1", "10.96.10.3", map[string]string{"app": "reviews", "version": "v1"}, 9080},
		{"reviews-v2", "10.96.10.4", map[string]string{"app": "reviews", "version": "v2"}, 9080},
		{"ratings", "10.96.10.5", map[string]string{"app": "ratings"}, 9080},
		{"details", "10.96.10.6", map[string]string{"app": "details"}, 9080},
	}
	// waypointLabels and waypointAnnotations are what istiod's waypoint
	// template renders for the pod.
	waypointLabels      = istiod.WaypointLabels(waypointName)
	waypointAnnotations = istiod.WaypointAnnotations()
)

// waypointNode is the waypoint pod as pilot-agent would describe it.
func waypointNode() node.Node {
	return node.Node{
		IP:             netip.MustParseAddr(waypointIP),
		PodName:        waypointPod,
		Namespace:      meshNS,
		ServiceAccount: waypointName,
		NodeName:       nodeName,
		TrustDomain:    "cluster.local",
		Labels:         waypointLabels,
		Annotations:    waypointAnnotations,
	}
}

// gatewayYAML is what `istioctl waypoint apply --enroll-namespace` applies,
// the namespace label aside.
var gatewayYAML = istiod.GatewayYAML(meshNS, waypointName)

// setupWaypointMesh creates the walkthrough's objects and returns the
// waypoint pod. istiod's deployment controller cannot render the waypoint
// (test/istiod runs it without an injector config: "no waypoint
// template"), so the test plays the kubelet and the EndpointSlice
// controller for the objects it would have created.
func setupWaypointMesh(t *testing.T, ctx context.Context, cp *kube.ControlPlane) *corev1.Pod {
	t.Helper()
	c := cp.Client.CoreV1()
	_, err := c.Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: nodeName}}, metav1.CreateOptions{})
	must(t, err)
	ns, err := c.Namespaces().Get(ctx, meshNS, metav1.GetOptions{})
	must(t, err)
	if ns.Labels == nil {
		ns.Labels = map[string]string{}
	}
	ns.Labels["istio.io/dataplane-mode"] = "ambient"
	ns.Labels["istio.io/use-waypoint"] = waypointName
	_, err = c.Namespaces().Update(ctx, ns, metav1.UpdateOptions{})
	must(t, err)

	accounts := map[string]bool{waypointName: true}
	for _, p := range meshPods {
		accounts[p.sa] = true
	}
	for sa := range accounts {
		_, err := c.ServiceAccounts(meshNS).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{})
		must(t, err)
	}

	pods := map[string]*corev1.Pod{}
	for _, p := range meshPods {
		pods[p.name] = runningPod(t, ctx, cp, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{
				Name: p.name, Namespace: meshNS, Labels: p.labels,
				// What the node agent writes once it captured the pod.
				Annotations: map[string]string{"ambient.istio.io/redirection": "enabled"},
			},
			Spec: corev1.PodSpec{
				NodeName: nodeName, ServiceAccountName: p.sa,
				Containers: []corev1.Container{{Name: "app", Image: p.labels["app"], Ports: []corev1.ContainerPort{{ContainerPort: 9080, Protocol: corev1.ProtocolTCP}}}},
			},
		}, p.ip)
	}
	wp := runningPod(t, ctx, cp, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: waypointPod, Namespace: meshNS, Labels: waypointLabels, Annotations: waypointAnnotations},
		Spec: corev1.PodSpec{
			NodeName: nodeName, ServiceAccountName: waypointName,
			Containers: []corev1.Container{istiod.WaypointContainerSpec("amber-waypoint")},
		},
	}, waypointIP)

	for _, s := range meshServices {
		var backends []*corev1.Pod
		for _, p := range meshPods {
			if selects(s.selector, p.labels) {
				backends = append(backends, pods[p.name])
			}
		}
		createService(t, ctx, cp, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: s.name, Namespace: meshNS, Labels: map[string]string{"app": s.selector["app"], "service": s.name}},
			Spec: corev1.ServiceSpec{
				ClusterIP: s.vip, Selector: s.selector,
				Ports: []corev1.ServicePort{{Name: "http", Port: s.port, TargetPort: intstr.FromInt32(s.port), Protocol: corev1.ProtocolTCP}},
			},
		}, backends)
	}
	svc := istiod.WaypointService(meshNS, waypointName)
	svc.Spec.ClusterIP = waypointVIP
	createService(t, ctx, cp, svc, []*corev1.Pod{wp})

	applyYAML(t, ctx, cp, "gateway", gatewayYAML)
	return wp
}

func selects(selector, labels map[string]string) bool {
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// createService creates svc and the EndpointSlice the EndpointSlice
// controller would derive from its ready backends.
func createService(t *testing.T, ctx context.Context, cp *kube.ControlPlane, svc *corev1.Service, backends []*corev1.Pod) {
	t.Helper()
	_, err := kube.CreateService(ctx, cp.Client, svc, backends)
	must(t, err)
}

// applyYAML applies manifest with kubectl.
func applyYAML(t *testing.T, ctx context.Context, cp *kube.ControlPlane, name, manifest string) {
	t.Helper()
	if err := cp.Apply(ctx, manifest); err != nil {
		t.Fatalf("apply %s: %v", name, err)
	}
}

// deleteYAML deletes the objects of manifest and waits until they are gone.
func deleteYAML(t *testing.T, ctx context.Context, cp *kube.ControlPlane, name, manifest string) {
	t.Helper()
	f := filepath.Join(t.TempDir(), name+".yaml")
	must(t, os.WriteFile(f, []byte(manifest), 0o644))
	if out, err := cp.Kubectl(ctx, "delete", "--wait", "-f", f); err != nil {
		t.Fatalf("kubectl delete %s: %v\n%s", name, err, out)
	}
}

// waitGatewayAddress waits until istiod has given the waypoint's
// Gateway an address.
func waitGatewayAddress(t *testing.T, ctx context.Context, cp *kube.ControlPlane) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	addrs, err := istiod.WaitGatewayAddress(ctx, cp, meshNS, waypointName)
	if err != nil {
		t.Fatal(err)
	}
	return addrs
}
