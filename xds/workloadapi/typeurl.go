package workloadapi

// Type URLs of the two resource types of the workload API. They are the Any
// type URLs of the messages and also the DeltaDiscoveryRequest type_url a
// ztunnel subscribes to; istiod serves both over one delta-ADS stream.
const (
	AddressTypeURL       = "type.googleapis.com/istio.workload.Address"
	AuthorizationTypeURL = "type.googleapis.com/istio.security.Authorization"
)
