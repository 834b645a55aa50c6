package contract

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/amber-mesh/amber/waypoint/node"
)

// legacyArgs are the args of Istio's legacy gateway chart
// (manifests/charts/gateways/istio-ingress templates/deployment.yaml) with
// its default values, after the kubelet expanded $(POD_NAMESPACE): the
// `--x=v` form.
var legacyArgs = []string{
	"proxy", "router", "--domain", "istio-system.svc.cluster.local",
	"--proxyLogLevel=warning", "--proxyComponentLogLevel=misc:error", "--log_output_level=default:info",
}

// legacyEnv is that chart's env for the walkthrough's ingress gateway.
func legacyEnv() []string {
	return []string{
		"PILOT_CERT_PROVIDER=istiod",
		"CA_ADDR=istiod.istio-system.svc:15012",
		"NODE_NAME=node-1",
		"POD_NAME=istio-ingressgateway-5d8f7c9b4-abcde",
		"POD_NAMESPACE=istio-system",
		"INSTANCE_IP=10.244.0.30",
		"HOST_IP=192.168.1.10",
		"ISTIO_CPU_LIMIT=2",
		"SERVICE_ACCOUNT=istio-ingressgateway-service-account",
		"ISTIO_META_WORKLOAD_NAME=istio-ingressgateway",
		"ISTIO_META_OWNER=kubernetes://apis/apps/v1/namespaces/istio-system/deployments/istio-ingressgateway",
		"ISTIO_META_UNPRIVILEGED_POD=true",
		"ISTIO_META_CLUSTER_ID=Kubernetes",
		"ISTIO_META_NODE_NAME=node-1",
	}
}

// routerFiles writes the legacy chart's mounted files: token, roots,
// podinfo with the gateway's labels, and the mesh config ConfigMap.
func routerFiles(t *testing.T, mesh string) string {
	t.Helper()
	root := t.TempDir()
	write := fileWriter(t, root)
	write(TokenFile, "token")
	write(RootCertFile, "-----BEGIN CERTIFICATE-----\n")
	write(LabelsFile, strings.Join([]string{
		`app="istio-ingressgateway"`, `istio="ingressgateway"`, `istio.io/dataplane-mode="none"`,
		`pod-template-hash="5d8f7c9b4"`, `service.istio.io/canonical-name="istio-ingressgateway"`,
	}, "\n"))
	if mesh != "" {
		write(MeshConfigFile, mesh)
	}
	return root
}

func TestRouterContract(t *testing.T) {
	root := routerFiles(t, `defaultConfig:
  discoveryAddress: istiod.istio-system.svc:15012
  proxyMetadata:
    ISTIO_META_DNS_CAPTURE: "true"
  terminationDrainDuration: 7s
trustDomain: cluster.local
enablePrometheusMerge: true
`)
	c, err := Load(legacyArgs, legacyEnv(), root)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	n := c.Config.Node
	if n.Type != node.Router || n.PodName != "istio-ingressgateway-5d8f7c9b4-abcde" || n.Namespace != "istio-system" ||
		n.ServiceAccount != "istio-ingressgateway-service-account" || n.IP != netip.MustParseAddr("10.244.0.30") ||
		n.WorkloadName != "istio-ingressgateway" || n.Labels["istio"] != "ingressgateway" {
		t.Errorf("node %+v", n)
	}
	if got, want := n.ID(), "router~10.244.0.30~istio-ingressgateway-5d8f7c9b4-abcde.istio-system~istio-system.svc.cluster.local"; got != want {
		t.Errorf("id %q, want %q", got, want)
	}
	if n.Extra["UNPRIVILEGED_POD"] != "true" || n.Extra["DNS_CAPTURE"] != "true" {
		t.Errorf("extra metadata %v", n.Extra)
	}
	if c.Config.TrustDomain != "cluster.local" || c.Config.DrainTimeout.Seconds() != 7 || c.Config.XDSAddress != "istiod.istio-system.svc:15012" {
		t.Errorf("config from the mesh file: trust domain %q, drain %v, xds %q", c.Config.TrustDomain, c.Config.DrainTimeout, c.Config.XDSAddress)
	}
	if c.LogLevel != "info" {
		t.Errorf("log level %q", c.LogLevel)
	}
}

// PROXY_CONFIG overrides the mesh file's defaultConfig; the `--x v` form
// of the injected templates is read too; a trust-changing defaultConfig
// in the mesh file is refused like the same field in PROXY_CONFIG.
func TestRouterMeshOverride(t *testing.T) {
	root := routerFiles(t, "defaultConfig:\n  terminationDrainDuration: 7s\n  discoveryAddress: a:1\n")
	args := []string{"proxy", "router", "--domain", "istio-system.svc.cluster.local", "--proxyLogLevel", "warning", "--log_output_level", "default:debug"}
	c, err := Load(args, append(legacyEnv(), `PROXY_CONFIG={"discoveryAddress":"b:2"}`), root)
	if err != nil {
		t.Fatal(err)
	}
	if c.Config.XDSAddress != "b:2" || c.Config.DrainTimeout.Seconds() != 7 || c.LogLevel != "debug" {
		t.Errorf("xds %q drain %v level %q", c.Config.XDSAddress, c.Config.DrainTimeout, c.LogLevel)
	}
	root = routerFiles(t, "defaultConfig:\n  caCertificatesPem: [\"x\"]\n")
	if _, err := Load(legacyArgs, legacyEnv(), root); !errors.Is(err, ErrRefused) {
		t.Errorf("caCertificatesPem in the mesh file: %v, want refused", err)
	}
	if _, err := Load(append(legacyArgs, "--meshConfig", "/tmp/other"), legacyEnv(), routerFiles(t, "")); !errors.Is(err, ErrRefused) {
		t.Errorf("--meshConfig elsewhere: %v, want refused", err)
	}
	if _, err := Load([]string{"proxy", "sidecar"}, legacyEnv(), routerFiles(t, "")); !errors.Is(err, ErrRefused) {
		t.Errorf("proxy sidecar: %v, want refused", err)
	}
}
