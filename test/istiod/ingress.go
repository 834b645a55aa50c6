package istiod

import (
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// The objects of the walkthrough's ingress gateway as Istio's legacy
// gateway chart (manifests/charts/gateways/istio-ingress) creates them in
// istio-system, and the walkthrough's Gateway and VirtualService, for
// tests that play the kubelet and the EndpointSlice controller for its
// pod.

// Names of the legacy chart's ingress gateway.
const (
	IngressName           = "istio-ingressgateway"
	IngressServiceAccount = "istio-ingressgateway-service-account"
)

// IngressLabels are the legacy chart's pod labels (its Deployment's
// template, with the chart's default labels; dataplane-mode none keeps
// ambient from capturing the gateway).
func IngressLabels() map[string]string {
	return map[string]string{
		"app": IngressName, "istio": "ingressgateway",
		"istio.io/dataplane-mode":             "none",
		"service.istio.io/canonical-name":     IngressName,
		"service.istio.io/canonical-revision": "latest",
		"sidecar.istio.io/inject":             "false",
	}
}

// IngressService is the legacy chart's Service: status port, 80 → 8080
// and 443 → 8443, selecting the pod by its app and istio labels. The API
// server allocates its cluster IP unless the caller sets one.
func IngressService() *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{
			Name: IngressName, Namespace: Namespace,
			Labels: map[string]string{"app": IngressName, "istio": "ingressgateway"},
		},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": IngressName, "istio": "ingressgateway"},
			Ports: []corev1.ServicePort{
				{Name: "status-port", Port: 15021, TargetPort: intstr.FromInt32(15021), Protocol: corev1.ProtocolTCP},
				{Name: "http2", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP},
				{Name: "https", Port: 443, TargetPort: intstr.FromInt32(8443), Protocol: corev1.ProtocolTCP},
			},
		},
	}
}

// BookinfoGatewayYAML is the 2022 walkthrough's bookinfo-gateway.yaml in
// namespace ns: an Istio Gateway selecting istio=ingressgateway on server
// port 80 (the Service maps it to listener 8080) and the VirtualService
// routing bookinfo's paths to productpage:9080.
func BookinfoGatewayYAML(ns string) string {
	return fmt.Sprintf(`apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: bookinfo-gateway
  namespace: %[1]s
spec:
  selector:
    istio: ingressgateway
  servers:
  - port:
      number: 80
      name: http
      protocol: HTTP
    hosts:
    - "*"
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: bookinfo
  namespace: %[1]s
spec:
  hosts:
  - "*"
  gateways:
  - bookinfo-gateway
  http:
  - match:
    - uri:
        exact: /productpage
    - uri:
        prefix: /static
    - uri:
        exact: /login
    - uri:
        exact: /logout
    - uri:
        prefix: /api/v1/products
    route:
    - destination:
        host: productpage
        port:
          number: 9080
`, ns)
}

// GatewayAPIBookinfoYAML is samples/bookinfo/gateway-api/bookinfo-gateway.yaml
// in namespace ns: a Gateway of class istio listening on 80 and its
// HTTPRoute to productpage:9080.
func GatewayAPIBookinfoYAML(ns string) string {
	return fmt.Sprintf(`apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: bookinfo-gateway
  namespace: %[1]s
  annotations:
    networking.istio.io/service-type: ClusterIP
spec:
  gatewayClassName: istio
  listeners:
  - name: http
    port: 80
    protocol: HTTP
    allowedRoutes:
      namespaces:
        from: Same
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: bookinfo
  namespace: %[1]s
spec:
  parentRefs:
  - name: bookinfo-gateway
  rules:
  - matches:
    - path:
        type: Exact
        value: /productpage
    - path:
        type: PathPrefix
        value: /static
    - path:
        type: Exact
        value: /login
    - path:
        type: Exact
        value: /logout
    - path:
        type: PathPrefix
        value: /api/v1/products
    backendRefs:
    - name: productpage
      port: 9080
`, ns)
}

// GatewayAPIName is the name istiod's deployment controller gives the
// Deployment, Service and service account of Gateway gw of class istio
// (gatewaycommon/gateway_utils.go GetDefaultName).
func GatewayAPIName(gw string) string { return gw + "-istio" }

// GatewayAPILabels are the pod labels istiod's kube-gateway template
// renders for Gateway gw.
func GatewayAPILabels(gw string) map[string]string {
	return map[string]string{
		"gateway.networking.k8s.io/gateway-name":       gw,
		"gateway.networking.k8s.io/gateway-class-name": "istio",
		"gateway.istio.io/managed":                     "istio.io-gateway-controller",
		"istio.io/dataplane-mode":                      "none",
		"service.istio.io/canonical-name":              GatewayAPIName(gw),
		"service.istio.io/canonical-revision":          "latest",
		"sidecar.istio.io/inject":                      "false",
	}
}

// GatewayAPIService is the Service the deployment controller renders for
// Gateway gw with one HTTP listener on port (extractServicePorts: no
// targetPort, so port → port), and an HTTPS one on each of https.
func GatewayAPIService(ns, gw string, port int32, https ...int32) *corev1.Service {
	http := "http"
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{
			Name: GatewayAPIName(gw), Namespace: ns,
			Labels: map[string]string{
				"gateway.networking.k8s.io/gateway-name": gw, "gateway.istio.io/managed": "istio.io-gateway-controller",
			},
		},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"gateway.networking.k8s.io/gateway-name": gw},
			Ports: []corev1.ServicePort{
				{Name: "status-port", Port: 15021, TargetPort: intstr.FromInt32(15021), Protocol: corev1.ProtocolTCP},
				{Name: "http", Port: port, TargetPort: intstr.FromInt32(port), Protocol: corev1.ProtocolTCP, AppProtocol: &http},
			},
		},
	}
	for _, p := range https {
		proto := "https"
		svc.Spec.Ports = append(svc.Spec.Ports, corev1.ServicePort{
			Name: fmt.Sprintf("https-%d", p), Port: p, TargetPort: intstr.FromInt32(p), Protocol: corev1.ProtocolTCP, AppProtocol: &proto,
		})
	}
	return svc
}

// The walkthrough's TLS certificate for the Gateway API form: a
// self-signed test certificate for bookinfo.example.com (valid until
// 2126), fixed so that the goldens holding istiod's SDS copy of it are
// stable. A test key, never a secret.
const (
	BookinfoHost    = "bookinfo.example.com"
	BookinfoCertPEM = `-----BEGIN CERTIFICATE-----
MIIBdzCCAR2gAwIBAgIBATAKBggqhkjOPQQDAjAfMR0wGwYDVQQDExRib29raW5m
by5leGFtcGxlLmNvbTAgFw0yNjAxMDEwMDAwMDBaGA8yMTI2MDEwMTAwMDAwMFow
HzEdMBsGA1UEAxMUYm9va2luZm8uZXhhbXBsZS5jb20wWTATBgcqhkjOPQIBBggq
hkjOPQMBBwNCAASz+wTrTaE2/rAPSc/CJj1tzN8qJGIJK729QF9p0AxTgedw3Sfc
x2z/EEbYbJGypV2SIGIEiqaj7nj1UlSMhpHeo0gwRjAOBgNVHQ8BAf8EBAMCB4Aw
EwYDVR0lBAwwCgYIKwYBBQUHAwEwHwYDVR0RBBgwFoIUYm9va2luZm8uZXhhbXBs
ZS5jb20wCgYIKoZIzj0EAwIDSAAwRQIhAK53AW/bQu/PdrAMulY47UxXLB9hhzqS
TcGdD6YtK2qZAiAxtOzzMMlVC+o4UAsDU1gNLmfXigUWYMqwtxkRKbtHfg==
-----END CERTIFICATE-----
`
	BookinfoKeyPEM = `-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIKVl2luW/9VYMZ8E2VFI3BWRlwQkRvhPsvD9FQ/e1+iFoAoGCCqGSM49
AwEHoUQDQgAEs/sE602hNv6wD0nPwiY9bczfKiRiCSu9vUBfadAMU4HncN0n3Mds
/xBG2GyRsqVdkiBiBIqmo+549VJUjIaR3g==
-----END EC PRIVATE KEY-----
`
)

// BookinfoTLSYAML is the Secret bookinfo-cert in namespace ns and the
// Gateway API form with an HTTPS listener on 443 terminating TLS with it
// (certificateRefs: istiod serves the Secret to the gateway's pod over
// SDS), its HTTPRoute attached to both listeners.
func BookinfoTLSYAML(ns string) string {
	indent := func(pem string) string {
		return "    " + strings.ReplaceAll(strings.TrimSpace(pem), "\n", "\n    ")
	}
	return fmt.Sprintf(`apiVersion: v1
kind: Secret
metadata:
  name: bookinfo-cert
  namespace: %[1]s
type: kubernetes.io/tls
stringData:
  tls.crt: |
%[2]s
  tls.key: |
%[3]s
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: bookinfo-gateway
  namespace: %[1]s
  annotations:
    networking.istio.io/service-type: ClusterIP
spec:
  gatewayClassName: istio
  listeners:
  - name: http
    port: 80
    protocol: HTTP
    allowedRoutes:
      namespaces:
        from: Same
  - name: https
    port: 443
    protocol: HTTPS
    hostname: %[4]s
    tls:
      mode: Terminate
      certificateRefs:
      - name: bookinfo-cert
    allowedRoutes:
      namespaces:
        from: Same
`, ns, indent(BookinfoCertPEM), indent(BookinfoKeyPEM), BookinfoHost)
}
