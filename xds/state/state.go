// Package state is the ztunnel's immutable view of the mesh (workloads,
// services and compiled authorization policies) built from workload API
// resources.
package state

import (
	"net/netip"

	"github.com/amber-mesh/amber/xds/workloadapi"
)

// Defaults for fields the workload API lets istiod elide.
const (
	DefaultTrustDomain    = "cluster.local"
	DefaultServiceAccount = "default"
	DefaultClusterID      = "Kubernetes"
)

// Protocol is how a workload is reached.
type Protocol uint8

const (
	// ProtocolTCP is plain TCP to the workload (TunnelProtocol NONE): the
	// workload is not in the mesh, or the tunnel is terminated elsewhere.
	ProtocolTCP Protocol = iota
	// ProtocolHBONE is HTTP/2 CONNECT over mTLS to the workload's :15008.
	ProtocolHBONE
	// ProtocolLegacyIstioMTLS is a sidecar workload that speaks Istio mTLS
	// without a tunnel. A ztunnel never originates it (upstream rule), so
	// for outbound traffic it behaves like ProtocolTCP.
	ProtocolLegacyIstioMTLS
)

func (p Protocol) String() string {
	switch p {
	case ProtocolTCP:
		return "TCP"
	case ProtocolHBONE:
		return "HBONE"
	case ProtocolLegacyIstioMTLS:
		return "LEGACY_ISTIO_MTLS"
	}
	return "unknown"
}

// NetworkAddr is an IP on a network; the empty network is the default one.
// It is how the workload API keys addresses ("network/IP").
type NetworkAddr struct {
	Network string
	Addr    netip.Addr
}

func (a NetworkAddr) String() string { return a.Network + "/" + a.Addr.String() }

// NetworkPrefix is a CIDR on a network. A single VIP is a full-length prefix.
type NetworkPrefix struct {
	Network string
	Prefix  netip.Prefix
}

func (p NetworkPrefix) String() string { return p.Network + "/" + p.Prefix.String() }

// NamespacedHostname names a service; its String form "namespace/hostname"
// is the service's resource name and the key of Workload.Services.
type NamespacedHostname struct {
	Namespace string
	Hostname  string
}

func (n NamespacedHostname) String() string { return n.Namespace + "/" + n.Hostname }

// GatewayAddress is where a waypoint or network gateway is reached: by
// service hostname or by address (exactly one is set).
type GatewayAddress struct {
	// Hostname is set when the gateway is named by its service.
	Hostname NamespacedHostname
	// Address is set (Addr valid) when the gateway is named by IP.
	Address NetworkAddr
	// HBONEPort is the gateway's mTLS HBONE port, usually 15008.
	HBONEPort uint16
}

// ByHostname reports whether the gateway is named by service hostname.
func (g *GatewayAddress) ByHostname() bool { return !g.Address.Addr.IsValid() }

// ApplicationTunnel says the workload accepts tunnel metadata from the
// ztunnel on its last hop.
type ApplicationTunnel struct {
	// PROXY is true when a PROXY protocol header must prefix the stream.
	PROXY bool
	// Port, if non-zero, is where to deliver instead of the original port.
	Port uint16
}

// Locality is where a workload runs.
type Locality struct {
	Region, Zone, Subzone string
}

// Workload is one endpoint (a pod, a VM). Values are shared between
// snapshots and must not be modified.
type Workload struct {
	UID       string
	Name      string
	Namespace string
	// ServiceAccount is DefaultServiceAccount when the resource left it empty.
	ServiceAccount string
	// TrustDomain is DefaultTrustDomain when the resource left it empty.
	TrustDomain string
	Node        string
	Network     string
	// ClusterID is DefaultClusterID when the resource left it empty.
	ClusterID string
	// Hostname is set for workloads resolved by DNS (may have no Addresses).
	Hostname string
	// Addresses are the workload's IPs, IPv4 in 4-byte form.
	Addresses []netip.Addr
	Protocol  Protocol
	// HostNetwork workloads share their IP with the node; they are never
	// found by address.
	HostNetwork       bool
	NativeTunnel      bool
	ApplicationTunnel *ApplicationTunnel
	// Waypoint, if set, must receive all traffic to the workload.
	Waypoint       *GatewayAddress
	NetworkGateway *GatewayAddress
	// Services maps each service this workload backs to its port mapping
	// (service port to target port; a zero target means the service's own
	// target port).
	Services map[NamespacedHostname]map[uint16]uint16
	// AuthorizationPolicies are keys ("namespace/name") of the
	// selector-scoped policies that apply; see authz.Policies.Applicable.
	AuthorizationPolicies []string
	Healthy               bool
	Locality              Locality
	// Capacity is the relative share of traffic, 1 when absent.
	Capacity uint32

	CanonicalName     string
	CanonicalRevision string
	WorkloadName      string
	// WorkloadType is the lower-case workload type ("deployment", "pod"...).
	WorkloadType string
}

// Port is one service port.
type Port struct {
	ServicePort uint16
	// TargetPort is 0 when it depends on the workload (named target ports);
	// then the workload's Services entry has it.
	TargetPort  uint16
	AppProtocol workloadapi.AppProtocol
}

// WeightedWaypoint is one waypoint of a weighted set.
type WeightedWaypoint struct {
	Waypoint GatewayAddress
	Weight   uint32
}

// LoadBalancing is a service's endpoint selection policy.
type LoadBalancing struct {
	RoutingPreference []workloadapi.LoadBalancing_Scope
	Mode              workloadapi.LoadBalancing_Mode
	HealthPolicy      workloadapi.LoadBalancing_HealthPolicy
}

// Service is a group of workloads reached through VIPs or a hostname.
// Values are shared between snapshots and must not be modified.
type Service struct {
	Name      string
	Namespace string
	Hostname  string
	// VIPs are the service's virtual IPs (full-length prefixes) or ranges.
	// Headless services have none.
	VIPs []NetworkPrefix
	// Ports is keyed by service port.
	Ports           map[uint16]Port
	SubjectAltNames []string
	// Waypoint, if set, must receive all traffic to the service.
	Waypoint           *GatewayAddress
	WeightedWaypoints  []WeightedWaypoint
	LoadBalancing      *LoadBalancing
	IPFamilies         workloadapi.IPFamilies
	Canonical          bool
	IngressUseWaypoint bool
	// NamespaceOnly services may be used only by clients in Namespace.
	NamespaceOnly bool
}

// Key is the service's resource name and Workload.Services key.
func (s *Service) Key() NamespacedHostname {
	return NamespacedHostname{Namespace: s.Namespace, Hostname: s.Hostname}
}

// Endpoint is a workload backing a service, with its port mapping.
type Endpoint struct {
	Workload *Workload
	// Ports maps service port to target port for this workload.
	Ports map[uint16]uint16
}

// TargetPort returns where a connection to the service's servicePort goes
// on this endpoint: the workload's mapping, else the service's, else
// servicePort itself.
func (e Endpoint) TargetPort(svc *Service, servicePort uint16) uint16 {
	if p := e.Ports[servicePort]; p != 0 {
		return p
	}
	if p := svc.Ports[servicePort].TargetPort; p != 0 {
		return p
	}
	return servicePort
}
