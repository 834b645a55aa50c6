package istiod

import (
	"context"
	"fmt"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/amber-mesh/amber/test/kube"
	"github.com/amber-mesh/amber/waypoint/node"
)

// The objects of a waypoint as the API server holds them once `istioctl
// waypoint apply` and istiod's deployment controller ran, for tests that
// play the kubelet and the EndpointSlice controller for its pod.

// GatewayYAML is what `istioctl waypoint apply -n namespace --name name`
// applies (istioctl/pkg/waypoint/waypoint.go): a waypoint for services.
func GatewayYAML(namespace, name string) string {
	return fmt.Sprintf(`apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: %s
  namespace: %s
  labels:
    istio.io/waypoint-for: service
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
`, name, namespace)
}

// WaitGatewayAddress waits until istiod's gateway status controller has
// given the Gateway namespace/name an address and returns its status
// addresses. Only then does istiod publish it as a waypoint
// (ambient/waypoints.go gatewayToWaypointTransform), and it writes one
// only once the waypoint's Service has ready endpoints on every listener
// port (gatewaycommon/context.go ResolveGatewayInstances).
func WaitGatewayAddress(ctx context.Context, cp *kube.ControlPlane, namespace, name string) (string, error) {
	for {
		out, err := cp.Kubectl(ctx, "get", "gateway", "-n", namespace, name, "-o", "jsonpath={.status.addresses[*].value}")
		if addrs := strings.TrimSpace(string(out)); err == nil && addrs != "" {
			return addrs, nil
		}
		select {
		case <-ctx.Done():
			status, _ := cp.Kubectl(context.Background(), "get", "gateway", "-n", namespace, name, "-o", "jsonpath={.status}")
			return "", fmt.Errorf("gateway %s/%s has no status address: %v; status: %s", namespace, name, err, status)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// WaypointLabels are the pod labels istiod's waypoint template renders for
// the Gateway name
// (manifests/charts/istio-control/istio-discovery/files/waypoint.yaml):
// outside the mesh's capture (dataplane-mode none), named for istiod by
// the gateway-name label.
func WaypointLabels(name string) map[string]string {
	return map[string]string{
		"sidecar.istio.io/inject":                      "false",
		"istio.io/dataplane-mode":                      "none",
		"service.istio.io/canonical-name":              name,
		"service.istio.io/canonical-revision":          "latest",
		node.GatewayNameLabel:                          name,
		"gateway.networking.k8s.io/gateway-class-name": "istio-waypoint",
		"gateway.istio.io/managed":                     "istio.io-mesh-controller",
	}
}

// WaypointAnnotations are the pod annotations the template renders.
func WaypointAnnotations() map[string]string {
	return map[string]string{
		"istio.io/rev":         "default",
		"prometheus.io/path":   "/stats/prometheus",
		"prometheus.io/port":   "15020",
		"prometheus.io/scrape": "true",
	}
}

// WaypointService is the waypoint's Service as the deployment controller
// applies it: the template's labels and annotation, and the managed-by
// label its apply adds to every object (gatewaycommon/deploymentcontroller.go
// apply), which keeps a namespace's use-waypoint label from binding the
// waypoint to itself (ambient/waypoints.go fetchWaypointForService). The
// API server allocates its cluster IP unless the caller sets one.
func WaypointService(namespace, name string) *corev1.Service {
	hbone := "istio.io/hbone"
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{
			Name: name, Namespace: namespace,
			Labels: map[string]string{
				node.GatewayNameLabel: name, "gateway.networking.k8s.io/gateway-class-name": "istio-waypoint",
				"gateway.istio.io/managed": "istio.io-mesh-controller",
				"istio.io/waypoint-for":    "service",
			},
			Annotations: map[string]string{"networking.istio.io/traffic-distribution": "PreferClose"},
		},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{node.GatewayNameLabel: name},
			Ports: []corev1.ServicePort{
				{Name: "status-port", Port: 15021, TargetPort: intstr.FromInt32(15021), Protocol: corev1.ProtocolTCP},
				{Name: "mesh", Port: 15008, TargetPort: intstr.FromInt32(15008), Protocol: corev1.ProtocolTCP, AppProtocol: &hbone},
			},
		},
	}
}

// WaypointContainerSpec is the waypoint pod's container as the template
// declares it: its name and the ports it serves.
func WaypointContainerSpec(image string) corev1.Container {
	return corev1.Container{Name: WaypointContainer, Image: image, Ports: []corev1.ContainerPort{
		{Name: "metrics", ContainerPort: 15020, Protocol: corev1.ProtocolTCP},
		{Name: "status-port", ContainerPort: 15021, Protocol: corev1.ProtocolTCP},
	}}
}

// The walkthrough's L7 objects (istio.io ambient getting-started and the
// 2022 walkthrough), shared by the golden configurations and the
// end-to-end tests.

// ViewerPolicy is the walkthrough's L7 policy in its current form,
// named <service>-viewer in namespace ns: an ALLOW attached to the Service
// (targetRefs; a waypoint ignores selector policies), enforced by its
// waypoint, admitting sleep's identity for methods.
func ViewerPolicy(ns, service string, methods ...string) string {
	return fmt.Sprintf(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: %[1]s-viewer
  namespace: %[3]s
spec:
  targetRefs:
  - kind: Service
    group: ""
    name: %[1]s
  action: ALLOW
  rules:
  - from:
    - source:
        principals:
        - cluster.local/ns/%[3]s/sa/sleep
    to:
    - operation:
        methods: ["%[2]s"]
`, service, strings.Join(methods, `", "`), ns)
}

// ReviewsRoute starts an HTTPRoute for the reviews Service of namespace ns
// (GAMMA: parentRef to the Service and its port); the caller adds the
// rules.
func ReviewsRoute(ns string) string {
	return fmt.Sprintf(reviewsRoute, ns)
}

const reviewsRoute = `apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: reviews
  namespace: %[1]s
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: reviews
    port: 9080
  rules:
`

// ReviewsRoute9010 is the walkthrough's traffic split in its current
// form: reviews 90/10 between the Services reviews-v1 and reviews-v2.
func ReviewsRoute9010(ns string) string {
	return ReviewsRoute(ns) + reviewsRoute9010
}

const reviewsRoute9010 = `  - backendRefs:
    - name: reviews-v1
      port: 9080
      weight: 90
    - name: reviews-v2
      port: 9080
      weight: 10
`

// ReviewsVirtualService9010 is the 2022 walkthrough's form of the split:
// virtual-service-reviews-90-10.yaml and destination-rule-reviews.yaml
// (subsets of reviews by the version label, RANDOM).
func ReviewsVirtualService9010(ns string) string {
	return fmt.Sprintf(reviewsVirtualService9010, ns)
}

const reviewsVirtualService9010 = `apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: %[1]s
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      simple: RANDOM
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: %[1]s
spec:
  hosts:
  - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v1
      weight: 90
    - destination:
        host: reviews
        subset: v2
      weight: 10
`
