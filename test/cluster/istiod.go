package cluster

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/amber-mesh/amber/test/istiod"
)

// istiod runs as a host process, like CoreDNS, published as the
// istio-system/istiod Service (IstiodServiceIP) through a hand-made
// EndpointSlice: a ztunnel reaches it at istiod.istio-system.svc:15012
// through cluster DNS and kube-proxy, as in any Istio install. Its TLS
// gRPC port (xDS and CA) is on NodeIP; its other ports on loopback.
//
// Everything else is installed as users install Istio's ambient mode
// (istio.io's Helm instructions): Istio's CRDs (the base chart's), the
// Gateway API CRDs, and the two ConfigMaps istiod's own chart renders with
// profile=ambient — the mesh configuration (istio) and the injector
// configuration (istio-sidecar-injector) with the waypoint template —
// created before istiod starts, from which istiod reads its mesh
// configuration and renders the Deployment of every waypoint
// (test/istiod.RenderConfigMaps). istiod itself is unmodified; no admission
// webhook points at it (the API server cannot reach its loopback webhook
// port), so it patches none (INJECTION_WEBHOOK_CONFIG_NAME and
// VALIDATION_WEBHOOK_CONFIG_NAME empty).
const (
	// IstiodServiceIP is the istio-system/istiod Service.
	IstiodServiceIP = "198.18.16.12"
	// IstiodPort is istiod's TLS xDS and CA port, on NodeIP and on the
	// Service.
	IstiodPort = 15012
	// IstiodService is the address a ztunnel is configured with.
	IstiodService = istiod.ServerName + ":15012"

	istiodHTTP       = "127.0.0.1:18090"
	istiodPlainGRPC  = "127.0.0.1:18091"
	istiodHTTPS      = "127.0.0.1:18092"
	istiodMonitoring = "127.0.0.1:18093"
	istiodCtrlz      = "127.0.0.1:18094"
)

// Istiod is the node's istiod.
type Istiod struct {
	// Address is its TLS gRPC endpoint for xDS and the CA on NodeIP.
	Address string
	// HTTPAddr serves /ready and istiod's /debug endpoints.
	HTTPAddr string
	// ServerName is the name in its serving certificate.
	ServerName string
	// RootPEM is the mesh root certificate.
	RootPEM []byte
	// Log is its log file.
	Log string
	// BinDir holds pilot-discovery, Istio's CRDs and istiod's chart
	// (hack/istiod-bin.sh); Istioctl builds istioctl into it.
	BinDir string
}

func (l layout) istiodDir() string { return l.path("istiod") }

// istiodEnabled reports whether this cluster was started with istiod.
func istiodEnabled(l layout) bool {
	_, err := os.Stat(l.istiodDir())
	return err == nil
}

// istiodBins runs hack/istiod-bin.sh, which builds the Istio binaries
// named (pilot-discovery: ≈ 3.5 min, istioctl ≈ 1 min more) once and prints
// their directory, or returns $AMBER_ISTIOD_BIN_DIR.
func istiodBins(ctx context.Context, opts Options, names ...string) (string, error) {
	if dir := os.Getenv(istiod.BinDirEnv); dir != "" {
		return dir, nil
	}
	dir, err := hackScript(ctx, opts, "istiod-bin.sh", names...)
	if err != nil {
		return "", fmt.Errorf("build %s: %w", strings.Join(names, ", "), err)
	}
	return dir, nil
}

// helmBin runs hack/helm.sh, which builds Helm once, and returns the
// binary.
func helmBin(ctx context.Context, opts Options) (string, error) {
	if _, err := hackScript(ctx, opts, "helm.sh"); err != nil {
		return "", fmt.Errorf("build helm: %w", err)
	}
	return filepath.Join(opts.RepoRoot, ".cache", "bin", "helm"), nil
}

// installIstio does what a user's install does before istiod runs:
// Istio's and the Gateway API's CRDs, istio-system, and the ConfigMaps of
// istiod's chart, which istiod must find at start (it looks for its
// injector configuration only then). ConfigMaps already there (a restart
// of istiod) are left as they are, as Helm leaves an installed release.
func (c *Cluster) installIstio(ctx context.Context, opts Options, binDir string) error {
	if err := istiod.Prepare(ctx, c.Kubectl, c.Client, filepath.Join(binDir, istiod.CRDFile)); err != nil {
		return err
	}
	if err := istiod.ApplyCRDs(ctx, c.Kubectl, filepath.Join(binDir, istiod.GatewayAPICRDFile)); err != nil {
		return fmt.Errorf("gateway api: %w", err)
	}
	helm, err := helmBin(ctx, opts)
	if err != nil {
		return err
	}
	cms, err := istiod.RenderConfigMaps(ctx, helm, filepath.Join(binDir, istiod.ChartDir), istiod.ChartValues...)
	if err != nil {
		return err
	}
	for i := range cms {
		if _, err := c.Client.CoreV1().ConfigMaps(istiod.Namespace).Create(ctx, &cms[i], metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("create %s/%s: %w", istiod.Namespace, cms[i].Name, err)
		}
	}
	return nil
}

// ensureIstiod starts istiod unless it runs, then waits until it is ready
// and has published the mesh root certificate.
func (c *Cluster) ensureIstiod(ctx context.Context, opts Options, binDir string) error {
	l := layout{c.Dir}
	t0 := time.Now()
	if daemonPid(l, "istiod") == 0 {
		if err := os.MkdirAll(l.istiodDir(), 0o755); err != nil {
			return fmt.Errorf("istiod: %w", err)
		}
		if err := c.installIstio(ctx, opts, binDir); err != nil {
			return fmt.Errorf("istiod: %w", err)
		}
		opts.Logger.Info("istio installed: CRDs, Gateway API CRDs, istiod's chart ConfigMaps", "took", time.Since(t0).Round(time.Millisecond))
		if err := publishHostService(ctx, c.Client, istiod.Namespace, "istiod", IstiodServiceIP, map[string]string{"app": "istiod", "istio": "pilot"}, []corev1.ServicePort{
			{Name: "https-dns", Port: IstiodPort, Protocol: corev1.ProtocolTCP},
		}); err != nil {
			return err
		}
		args, env, err := istiod.Command(c.Kubeconfig, l.istiodDir(), c.istiodListen(), "")
		if err != nil {
			return fmt.Errorf("istiod: %w", err)
		}
		if err := startDaemon(l, "istiod", filepath.Join(binDir, istiod.BinaryName), args, env); err != nil {
			return err
		}
	}
	d := &Istiod{Address: c.istiodListen().SecureGRPC, HTTPAddr: istiodHTTP, ServerName: istiod.ServerName,
		Log: filepath.Join(l.logs(), "istiod.log"), BinDir: binDir}
	if err := waitFor(ctx, opts.ReadyTimeout, l, "istiod", func(ctx context.Context) error {
		if err := istiod.Ready(ctx, healthClient, istiodHTTP, d.Address); err != nil {
			return err
		}
		root, err := istiod.RootCert(ctx, c.Client)
		d.RootPEM = root
		return err
	}); err != nil {
		return err
	}
	c.Istiod = d
	opts.Logger.Info("istiod ready", "address", d.Address, "service", IstiodService, "took", time.Since(t0).Round(time.Millisecond))
	return nil
}

func (c *Cluster) istiodListen() istiod.Listen {
	return istiod.Listen{
		HTTP:       istiodHTTP,
		PlainGRPC:  istiodPlainGRPC,
		SecureGRPC: net.JoinHostPort(NodeIP, strconv.Itoa(IstiodPort)),
		HTTPS:      istiodHTTPS,
		Monitoring: istiodMonitoring,
		Ctrlz:      istiodCtrlz,
	}
}

// StopIstiod stops istiod (SIGTERM), as an outage would; StartIstiod
// brings it back.
func (c *Cluster) StopIstiod() error {
	return stopDaemon(layout{c.Dir}, "istiod", 5*time.Second)
}

// StartIstiod starts istiod again after StopIstiod and waits until it is
// ready.
func (c *Cluster) StartIstiod(ctx context.Context) error {
	o := Options{RepoRoot: "", Dir: c.Dir}
	if err := o.defaults(); err != nil {
		return err
	}
	bin, err := istiodBins(ctx, o, istiod.BinaryName)
	if err != nil {
		return err
	}
	return c.ensureIstiod(ctx, o, bin)
}

// Istioctl runs istioctl, built from the same Istio module as istiod
// (hack/istiod-bin.sh, cached; the first call builds it), as admin against
// the node and returns its standard output; the error carries its
// standard error.
func (c *Cluster) Istioctl(ctx context.Context, args ...string) ([]byte, error) {
	o := Options{Dir: c.Dir}
	if err := o.defaults(); err != nil {
		return nil, err
	}
	bin, err := istiodBins(ctx, o, istiod.IstioctlName)
	if err != nil {
		return nil, err
	}
	return runTool(ctx, filepath.Join(bin, istiod.IstioctlName), []string{"--kubeconfig=" + c.Kubeconfig}, args)
}
