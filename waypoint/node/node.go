// Package node describes an amber-waypoint to istiod the way pilot-agent
// describes an Envoy waypoint: the xDS node id and the node metadata
// istiod reads to pick the proxy's type, identity, version-gated config
// shapes and the services it serves (docs/waypoint.md, "Node").
package node

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/types/known/structpb"
)

// IstioVersion is the ISTIO_VERSION amber-waypoint claims: the version of
// the istiod amber is tested against (istio.io/istio's VERSION file at the
// pinned commit, with the "-dev" suffix Istio's Makefile adds). istiod
// gates config shapes on it (model.ParseIstioVersion reads "1.31" and
// takes an unknown patch as the highest), so claiming it gets the shapes
// the committed goldens show; a bump of the pinned istiod bumps it.
const IstioVersion = "1.31-dev"

// ClusterID is Istio's default cluster name (CLUSTER_ID's default, and the
// waypoint template's ISTIO_META_CLUSTER_ID default).
const ClusterID = "Kubernetes"

// Errors from Validate.
var (
	ErrNoIP        = errors.New("node: no pod IP")
	ErrNoPod       = errors.New("node: pod name and namespace are required")
	ErrNoAccount   = errors.New("node: no service account")
	ErrNoGatewayID = errors.New("node: no gateway.networking.k8s.io/gateway-name label")
)

// Node types: the first field of the node id, which makes istiod build a
// waypoint's listeners or a gateway's (pilot/pkg/model/context.go
// NodeType: Waypoint, Router).
const (
	Waypoint = "waypoint"
	Router   = "router"
)

// ErrType is Validate's error for a node type other than Waypoint and
// Router.
var ErrType = errors.New("node: type must be waypoint or router")

// GatewayNameLabel is the pod label istiod's waypoint template sets to the
// Gateway's name; the waypoint's Service selects on it, which is how
// istiod finds the services a waypoint serves.
const GatewayNameLabel = "gateway.networking.k8s.io/gateway-name"

// Node is what pilot-agent learns from the waypoint pod's environment and
// downward-API files (the Deployment istiod renders from its "waypoint"
// template: POD_NAME, POD_NAMESPACE, INSTANCE_IP, SERVICE_ACCOUNT,
// ISTIO_META_*, the istio-podinfo labels and annotations).
type Node struct {
	// Type is Waypoint (zero) or Router: an ingress gateway pod
	// (`proxy router`), which istiod configures as an Envoy gateway.
	Type string
	// IP is the pod's IP (INSTANCE_IP). Required.
	IP netip.Addr
	// PodName and Namespace name the pod. Required.
	PodName   string
	Namespace string
	// ServiceAccount is the pod's service account; istiod checks it
	// against the token's identity. Required.
	ServiceAccount string
	// NodeName is the Kubernetes node (ISTIO_META_NODE_NAME). Empty sends
	// none.
	NodeName string
	// ClusterID is ISTIO_META_CLUSTER_ID. Empty means ClusterID.
	ClusterID string
	// TrustDomain becomes MESH_ID, as the waypoint template sets it from
	// the mesh config's trust domain. Empty sends no MESH_ID.
	TrustDomain string
	// WorkloadName is the Deployment's name (ISTIO_META_WORKLOAD_NAME and
	// OWNER). Empty means the Gateway's name from Labels, as the template
	// names the Deployment after the Gateway; for a router, the pod's
	// "app" label (what the gateway charts name the Deployment), else the
	// pod's name.
	WorkloadName string
	// Labels are the pod's labels, without pod-template-hash (pilot-agent
	// drops it). A waypoint's must carry GatewayNameLabel.
	Labels map[string]string
	// Annotations are the pod's annotations. Nil sends none.
	Annotations map[string]string
	// IstioVersion is ISTIO_VERSION. Empty means the package's
	// IstioVersion.
	IstioVersion string
	// Extra is more metadata, sent as strings: what pilot-agent passes
	// through from ISTIO_META_<KEY> variables (NETWORK, DNS_CAPTURE...).
	// The keys Metadata sets from the fields above take precedence.
	Extra map[string]string
}

// Validate reports what istiod would need and is missing.
func (n Node) Validate() error {
	switch {
	case n.Type != "" && n.Type != Waypoint && n.Type != Router:
		return ErrType
	case !n.IP.IsValid():
		return ErrNoIP
	case n.PodName == "" || n.Namespace == "":
		return ErrNoPod
	case n.ServiceAccount == "":
		return ErrNoAccount
	case n.Labels[GatewayNameLabel] == "" && !n.IsRouter():
		return ErrNoGatewayID
	}
	return nil
}

// IsRouter reports whether n is an ingress gateway node.
func (n Node) IsRouter() bool { return n.Type == Router }

func (n Node) nodeType() string {
	if n.Type == "" {
		return Waypoint
	}
	return n.Type
}

// ID is the node id pilot-agent gives the pod's Envoy:
// <type>~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local
// (pkg/istio-agent/agent.go ServiceNode; the first field is the node
// type, which makes istiod build waypoint or gateway listeners).
func (n Node) ID() string {
	return fmt.Sprintf("%s~%s~%s.%s~%s.svc.cluster.local", n.nodeType(), n.IP.Unmap(), n.PodName, n.Namespace, n.Namespace)
}

// Metadata is the node metadata, with the keys pilot-agent sends for the
// environment istiod's waypoint template gives the pod
// (pkg/bootstrap GetNodeMetaData: ISTIO_META_* passed through, POD_NAME →
// NAME, POD_NAMESPACE → NAMESPACE, SERVICE_ACCOUNT, INSTANCE_IPS, the
// podinfo labels and annotations, ISTIO_VERSION).
func (n Node) Metadata() (*structpb.Struct, error) {
	if err := n.Validate(); err != nil {
		return nil, err
	}
	cluster := n.ClusterID
	if cluster == "" {
		cluster = ClusterID
	}
	version := n.IstioVersion
	if version == "" {
		version = IstioVersion
	}
	workload := n.WorkloadName
	switch {
	case workload != "":
	case n.IsRouter():
		workload = cmp.Or(n.Labels["app"], n.PodName)
	default:
		workload = n.Labels[GatewayNameLabel]
	}
	m := map[string]any{}
	for k, v := range n.Extra {
		m[k] = v
	}
	for k, v := range map[string]any{
		"NAME":              n.PodName,
		"NAMESPACE":         n.Namespace,
		"SERVICE_ACCOUNT":   n.ServiceAccount,
		"CLUSTER_ID":        cluster,
		"INSTANCE_IPS":      n.IP.Unmap().String(),
		"ISTIO_VERSION":     version,
		"INTERCEPTION_MODE": "REDIRECT",
		"WORKLOAD_NAME":     workload,
		"OWNER":             fmt.Sprintf("kubernetes://apis/apps/v1/namespaces/%s/deployments/%s", n.Namespace, workload),
		"LABELS":            stringMap(n.Labels),
		// pilot-agent's status and Prometheus ports; istiod reads them for
		// nothing a waypoint gets, but sends them back in config dumps.
		"ENVOY_STATUS_PORT":     15021,
		"ENVOY_PROMETHEUS_PORT": 15090,
	} {
		m[k] = v
	}
	if n.NodeName != "" {
		m["NODE_NAME"] = n.NodeName
	}
	if n.TrustDomain != "" {
		m["MESH_ID"] = n.TrustDomain
	}
	if len(n.Annotations) > 0 {
		m["ANNOTATIONS"] = stringMap(n.Annotations)
	}
	// Round-trip through JSON so that the struct holds exactly what
	// pilot-agent's json.Marshal of its metadata would.
	raw, err := json.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("node metadata: %w", err)
	}
	s := &structpb.Struct{}
	if err := s.UnmarshalJSON(raw); err != nil {
		return nil, fmt.Errorf("node metadata: %w", err)
	}
	return s, nil
}

// Proto is the xDS Node: ID and Metadata.
func (n Node) Proto() (*corev3.Node, error) {
	md, err := n.Metadata()
	if err != nil {
		return nil, err
	}
	return &corev3.Node{Id: n.ID(), Metadata: md}, nil
}

func stringMap(m map[string]string) map[string]any {
	out := make(map[string]any, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}
