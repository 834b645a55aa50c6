package meshbed

import (
	"errors"
	"io"
)

// ErrIstiodConfig reports an IstiodConfig without a required field.
var ErrIstiodConfig = errors.New("istiod mode needs Address and RootCertFile")

// IstiodConfig is how a ztunnel in istiod mode reaches istiod and which
// ztunnel Pod it is. The zero value of each optional field keeps the
// ztunnel's default.
type IstiodConfig struct {
	// Address is istiod's xDS and CA endpoint (istiod's 15012) as dialled
	// from inside the node, such as a Forwarder's Addr. Required.
	Address string
	// ServerName is the name istiod's serving certificate is verified
	// against. Zero means the host of Address.
	ServerName string
	// RootCertFile holds the mesh root certificates in PEM. Required.
	RootCertFile string
	// TokenFile holds the ztunnel's service-account token (audience
	// istio-ca). istiod issues certificates for the node's pods only when
	// it is bound to the ztunnel's Pod object. Zero sends none.
	TokenFile string
	// ClusterID is sent as the clusterid header. Zero means the ztunnel's
	// default, Istio's "Kubernetes".
	ClusterID string
	// PodName and PodNamespace name the ztunnel's Pod object, sent to
	// istiod in the xDS node id. Zero sends empty names.
	PodName, PodNamespace string
}

// StartZtunnelIstiod starts bin on nd in istiod mode: workloads and
// policies from istiod's xDS, certificates from istiod's CA. It serves the
// workloads whose node is nd.Name, reports nd's uplink IPv4 address as its
// own, logs JSON to log and waits until /healthz/ready, which needs the
// first sync from istiod.
func StartZtunnelIstiod(nd *Node, bin string, cfg IstiodConfig, log io.Writer, args ...string) (*Ztunnel, error) {
	if cfg.Address == "" || cfg.RootCertFile == "" {
		return nil, ErrIstiodConfig
	}
	flags := []string{
		"-node-name", nd.Name,
		"-node-ip", nd.IPv4.String(),
		"-xds-address", cfg.Address,
		"-root-cert", cfg.RootCertFile,
		"-pin-root", nd.Root,
		"-log-format", "json",
	}
	for _, f := range []struct{ name, value string }{
		{"-istiod-server-name", cfg.ServerName},
		{"-token-file", cfg.TokenFile},
		{"-cluster-id", cfg.ClusterID},
		{"-pod-name", cfg.PodName},
		{"-pod-namespace", cfg.PodNamespace},
	} {
		if f.value != "" {
			flags = append(flags, f.name, f.value)
		}
	}
	return startZtunnel(nd, bin, log, istiodReadyTimeout, append(flags, args...))
}
