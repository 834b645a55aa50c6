package kube

import (
	"net"
	"time"

	"github.com/amber-mesh/amber/test/pki"
)

// PKI holds the files of the control plane's throw-away certificate
// authority. Every certificate is ECDSA P-256 and valid for a day.
type PKI = pki.Cluster

// ServiceCIDR is the API server's --service-cluster-ip-range, and
// KubernetesServiceIP the address of the "kubernetes" service in it, which
// the serving certificate includes so that pods may use it.
const (
	ServiceCIDR         = "10.96.0.0/16"
	KubernetesServiceIP = "10.96.0.1"
)

// newPKI creates a CA, the API server's serving certificate, the
// service-account key pair and the API server's kubelet client certificate
// in dir.
func newPKI(dir string) (*PKI, error) {
	return pki.NewCluster(dir, pki.ClusterOptions{
		ServingIPs: []net.IP{net.IPv4(127, 0, 0, 1), net.ParseIP(KubernetesServiceIP)},
		Lifetime:   24 * time.Hour,
	})
}
