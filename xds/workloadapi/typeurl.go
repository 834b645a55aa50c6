package workloadapi

// Type URLs of the workload API's resource types. They are the Any type
// URLs of the messages and also the DeltaDiscoveryRequest type_url a
// client subscribes to; istiod serves them over one delta-ADS stream. A
// ztunnel asks for addresses and authorizations; an Envoy waypoint's
// workload discovery asks for workloads, the Address type's workloads
// without its services (istio pilot/pkg/xds/workload.go appendAddress).
const (
	AddressTypeURL       = "type.googleapis.com/istio.workload.Address"
	AuthorizationTypeURL = "type.googleapis.com/istio.security.Authorization"
	WorkloadTypeURL      = "type.googleapis.com/istio.workload.Workload"
)
