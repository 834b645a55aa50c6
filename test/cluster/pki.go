package cluster

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	testpki "github.com/amber-mesh/amber/test/pki"
)

// pki is the cluster's throw-away certificate authority and the files
// the components read. Certificates are ECDSA P-256, valid for a week.
type pki struct {
	*testpki.Cluster
	dir string
}

// newPKI creates the CA, the API server's serving and kubelet-client
// certificates and the service-account key pair in dir.
func newPKI(dir string) (*pki, error) {
	c, err := testpki.NewCluster(dir, testpki.ClusterOptions{
		CAName:     "amber-cluster-ca",
		ServingIPs: []net.IP{net.ParseIP(NodeIP), net.IPv4(127, 0, 0, 1), net.ParseIP(KubernetesServiceIP)},
		Lifetime:   7 * 24 * time.Hour,
	})
	if err != nil {
		return nil, fmt.Errorf("create pki: %w", err)
	}
	return &pki{Cluster: c, dir: dir}, nil
}

// kubeconfig writes DIR/<name>.kubeconfig for user in groups (the API
// server maps CN to the user and O to groups) and returns its path.
func (p *pki) kubeconfig(name, server, user string, groups ...string) (string, error) {
	certPEM, keyPEM, err := p.ClientCert(user, groups...)
	if err != nil {
		return "", fmt.Errorf("kubeconfig %s: %w", name, err)
	}
	path := filepath.Join(p.dir, name+".kubeconfig")
	if err := os.WriteFile(path, p.Kubeconfig("amber", server, user, certPEM, keyPEM), 0o600); err != nil {
		return "", fmt.Errorf("kubeconfig %s: %w", name, err)
	}
	return path, nil
}
