package node

import (
	"errors"
	"net/netip"
	"testing"
)

func waypoint() Node {
	return Node{
		IP: netip.MustParseAddr("10.244.0.20"), PodName: "waypoint-7d5c9b8f6-x2x7q", Namespace: "default",
		ServiceAccount: "waypoint", NodeName: "node-1", TrustDomain: "cluster.local",
		Labels: map[string]string{GatewayNameLabel: "waypoint", "gateway.istio.io/managed": "istio.io-mesh-controller"},
	}
}

func TestID(t *testing.T) {
	// istiod parses type~ip~pod.namespace~domain (pkg/model ParseServiceNodeWithMetadata).
	if got, want := waypoint().ID(), "waypoint~10.244.0.20~waypoint-7d5c9b8f6-x2x7q.default~default.svc.cluster.local"; got != want {
		t.Errorf("ID %q, want %q", got, want)
	}
	n := waypoint()
	n.IP = netip.MustParseAddr("::ffff:10.244.0.20")
	if got := n.ID(); got != "waypoint~10.244.0.20~waypoint-7d5c9b8f6-x2x7q.default~default.svc.cluster.local" {
		t.Errorf("mapped address: ID %q", got)
	}
}

func TestMetadata(t *testing.T) {
	md, err := waypoint().Metadata()
	if err != nil {
		t.Fatal(err)
	}
	f := md.GetFields()
	for key, want := range map[string]string{
		"NAME": "waypoint-7d5c9b8f6-x2x7q", "NAMESPACE": "default", "SERVICE_ACCOUNT": "waypoint",
		"CLUSTER_ID": ClusterID, "INSTANCE_IPS": "10.244.0.20", "ISTIO_VERSION": IstioVersion,
		"NODE_NAME": "node-1", "MESH_ID": "cluster.local", "WORKLOAD_NAME": "waypoint",
		"OWNER": "kubernetes://apis/apps/v1/namespaces/default/deployments/waypoint", "INTERCEPTION_MODE": "REDIRECT",
	} {
		if got := f[key].GetStringValue(); got != want {
			t.Errorf("%s = %q, want %q", key, got, want)
		}
	}
	if got := f["LABELS"].GetStructValue().GetFields()[GatewayNameLabel].GetStringValue(); got != "waypoint" {
		t.Errorf("LABELS[%s] = %q", GatewayNameLabel, got)
	}
	if _, ok := f["ANNOTATIONS"]; ok {
		t.Error("ANNOTATIONS sent without annotations")
	}
	if got := f["ENVOY_STATUS_PORT"].GetNumberValue(); got != 15021 {
		t.Errorf("ENVOY_STATUS_PORT = %v", got)
	}
}

// Extra metadata is passed through as strings; the node's own keys win.
func TestMetadataExtra(t *testing.T) {
	n := waypoint()
	n.Extra = map[string]string{"NETWORK": "net-1", "NAMESPACE": "spoofed"}
	md, err := n.Metadata()
	if err != nil {
		t.Fatal(err)
	}
	f := md.GetFields()
	if got := f["NETWORK"].GetStringValue(); got != "net-1" {
		t.Errorf("NETWORK = %q", got)
	}
	if got := f["NAMESPACE"].GetStringValue(); got != "default" {
		t.Errorf("NAMESPACE = %q, want the node's own", got)
	}
}

func TestValidate(t *testing.T) {
	cases := map[string]struct {
		mut  func(*Node)
		want error
	}{
		"no IP":           {func(n *Node) { n.IP = netip.Addr{} }, ErrNoIP},
		"no pod":          {func(n *Node) { n.PodName = "" }, ErrNoPod},
		"no account":      {func(n *Node) { n.ServiceAccount = "" }, ErrNoAccount},
		"no gateway name": {func(n *Node) { delete(n.Labels, GatewayNameLabel) }, ErrNoGatewayID},
	}
	for name, c := range cases {
		n := waypoint()
		n.Labels = map[string]string{GatewayNameLabel: "waypoint"}
		c.mut(&n)
		if _, err := n.Metadata(); !errors.Is(err, c.want) {
			t.Errorf("%s: %v, want %v", name, err, c.want)
		}
	}
}

// A router is an ingress gateway pod: its own type in the id, no
// gateway-name label needed, the workload named after its app label.
func TestRouter(t *testing.T) {
	n := Node{
		Type: Router, IP: netip.MustParseAddr("10.244.0.30"), PodName: "istio-ingressgateway-5d8f7c9b4-abcde", Namespace: "istio-system",
		ServiceAccount: "istio-ingressgateway-service-account",
		Labels:         map[string]string{"app": "istio-ingressgateway", "istio": "ingressgateway"},
	}
	if err := n.Validate(); err != nil {
		t.Fatal(err)
	}
	if got, want := n.ID(), "router~10.244.0.30~istio-ingressgateway-5d8f7c9b4-abcde.istio-system~istio-system.svc.cluster.local"; got != want {
		t.Errorf("ID %q, want %q", got, want)
	}
	md, err := n.Metadata()
	if err != nil {
		t.Fatal(err)
	}
	if got := md.GetFields()["WORKLOAD_NAME"].GetStringValue(); got != "istio-ingressgateway" {
		t.Errorf("WORKLOAD_NAME %q", got)
	}
	n.Type = "sidecar"
	if err := n.Validate(); !errors.Is(err, ErrType) {
		t.Errorf("type sidecar: %v, want ErrType", err)
	}
}
