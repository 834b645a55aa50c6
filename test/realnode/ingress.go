package realnode

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/amber-mesh/amber/test/cluster"
	"github.com/amber-mesh/amber/test/images"
)

// The walkthrough's ingress gateway, in Istio's two deployment forms, with
// amber's image in place of Envoy's (docs/gateway-pod.md):
//
//   - the classic istio-ingressgateway in istio-system, installed with
//     Istio's own chart (manifests/charts/gateways/istio-ingress of the
//     pinned module, the chart `istioctl install` uses for
//     components.ingressGateways) and `--set global.proxy.image=` amber's
//     image; configured by an Istio Gateway + VirtualService
//     (samples/bookinfo/networking/bookinfo-gateway.yaml);
//   - a Gateway API Gateway of class istio with an HTTPRoute
//     (samples/bookinfo/gateway-api/bookinfo-gateway.yaml), deployed by
//     istiod from its kube-gateway template with amber's chart's
//     GatewayClass defaults (gateway.enabled=true).
//
// hack/istiod-bin.sh copies the chart and both samples next to istiod
// (cluster.Istiod.BinDir), from the module istiod is built from.
const (
	// IngressRelease is the Helm release of the classic gateway, the name
	// Istio's chart README installs it under.
	IngressRelease = "istio-ingress"
	// IngressGateway is its Deployment and Service.
	IngressGateway = "istio-ingressgateway"
	// IngressServiceAccount is its service account, the principal the
	// walkthrough's L4 policy names.
	IngressServiceAccount = "istio-ingressgateway-service-account"
	// IngressSelector selects its pods (and is what bookinfo-gateway.yaml's
	// Gateway selects).
	IngressSelector = "istio=ingressgateway"
	// IngressChart is Istio's chart in cluster.Istiod.BinDir.
	IngressChart = "istio-ingress"
	// BookinfoGatewaySample and BookinfoGatewayAPISample are Istio's
	// sample files in cluster.Istiod.BinDir.
	BookinfoGatewaySample    = "samples/bookinfo/networking/bookinfo-gateway.yaml"
	BookinfoGatewayAPISample = "samples/bookinfo/gateway-api/bookinfo-gateway.yaml"
	// BookinfoGatewayAPI is the Gateway of BookinfoGatewayAPISample;
	// istiod names its Deployment, Service and service account
	// BookinfoGatewayAPI + "-istio".
	BookinfoGatewayAPI = "bookinfo-gateway"
	// IngressStatsPath is where the gateway serves Istio's metrics, on
	// its port 15020, through the API server's pod proxy.
	IngressStatsPath = WaypointStatsPath
)

// IngressURL is the walkthrough's URL of productpage through the classic
// gateway: its Service's port 80, which the chart maps to the pod's 8080.
const IngressURL = "http://" + IngressGateway + "." + Namespace + "/productpage"

// IngressPrincipal is the identity the classic gateway presents to
// productpage's ztunnel over HBONE.
const IngressPrincipal = "cluster.local/ns/" + Namespace + "/sa/" + IngressServiceAccount

// IngressHelmArgs returns the `helm install` command line (after "helm")
// that installs the classic gateway from Istio's chart directory chart
// with amber's image: the ambient profile (as `istioctl install --set
// profile=ambient` gives its gateways: ISTIO_META_ENABLE_HBONE), amber's
// image, and — for this node only — a ClusterIP Service (there is no load
// balancer), no HorizontalPodAutoscaler (there is no metrics API: it would
// only log an error every 15 s) and pull policy Never (the image is
// imported, not pulled).
func IngressHelmArgs(chart string) []string {
	return []string{"install", IngressRelease, chart, "--namespace", Namespace,
		"--set", "profile=ambient",
		"--set", "global.proxy.image=" + images.Amber.Ref,
		"--set", "global.imagePullPolicy=Never",
		"--set", "gateways.istio-ingressgateway.type=ClusterIP",
		"--set", "gateways.istio-ingressgateway.autoscaleEnabled=false",
	}
}

// IngressChartDir returns Istio's ingress chart on c (which runs istiod).
func IngressChartDir(c *cluster.Cluster) (string, error) {
	if c.Istiod == nil {
		return "", fmt.Errorf("the ingress gateway needs the node's istiod (cluster.Options.Istiod)")
	}
	return filepath.Join(c.Istiod.BinDir, IngressChart), nil
}

// InstallIngress installs the classic istio-ingressgateway with Istio's
// chart and amber's image (IngressHelmArgs); it does not wait for the pod.
func (a *Amber) InstallIngress(ctx context.Context) error {
	chart, err := IngressChartDir(a.c)
	if err != nil {
		return err
	}
	_, err = a.Helm(ctx, IngressHelmArgs(chart)...)
	return err
}

// UninstallIngress removes the classic gateway (`helm uninstall --wait`).
func (a *Amber) UninstallIngress(ctx context.Context) error {
	_, err := a.Helm(ctx, "uninstall", IngressRelease, "--namespace", Namespace, "--wait", "--timeout", "2m")
	return err
}

// IngressPolicyYAML is the walkthrough's L4 policy as the 2022
// walkthrough wrote it: productpage admits sleep and the principals
// given (the ingress gateway's).
func IngressPolicyYAML(ns string, principals ...string) string {
	all := append([]string{fmt.Sprintf("cluster.local/ns/%s/sa/%s", ns, Sleep)}, principals...)
	return fmt.Sprintf(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: productpage-viewer, namespace: %s}
spec:
  selector: {matchLabels: {app: %s}}
  action: ALLOW
  rules:
    - from: [{source: {principals: ["%s"]}}]
`, ns, Productpage, strings.Join(all, `", "`))
}
