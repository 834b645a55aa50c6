package istiod

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/amber-mesh/amber/test/kube"

	"github.com/amber-mesh/amber/test/buildcache"
	"github.com/amber-mesh/amber/test/proc"
)

// Names istiod and Istio's ambient install use.
const (
	// Namespace is istiod's namespace; the ztunnel runs there too.
	Namespace = "istio-system"
	// ZtunnelServiceAccount is the ztunnel's service account in Namespace,
	// the one CA_TRUSTED_NODE_ACCOUNTS trusts to impersonate.
	ZtunnelServiceAccount = "ztunnel"
	// TokenAudience is the audience istiod's authenticators accept
	// (TOKEN_AUDIENCES' default).
	TokenAudience = "istio-ca"
	// ClusterID is istiod's cluster (CLUSTER_ID's default). Clients must
	// send it as the "clusterid" header to get impersonated certificates:
	// istiod's node authorizer looks the cluster up by that header only
	// (kubeauth.ExtractClusterID) and refuses an empty one.
	ClusterID = "Kubernetes"
	// ServerName is the name in istiod's self-signed serving certificate.
	ServerName = "istiod." + Namespace + ".svc"
	// RootCertConfigMap is the ConfigMap (key root-cert.pem) istiod
	// publishes its root certificate in, in every namespace.
	RootCertConfigMap = "istio-ca-root-cert"

	// BinaryName and CRDFile are what Binaries' directory holds.
	BinaryName = "pilot-discovery"
	CRDFile    = "crd-all.gen.yaml"
	// BinDirEnv names a directory of prebuilt files that Binaries uses
	// instead of building.
	BinDirEnv = "AMBER_ISTIOD_BIN_DIR"
)

// Options configures Start. The zero value is usable.
type Options struct {
	// BinDir holds BinaryName and CRDFile. Zero means Binaries(tb).
	BinDir string
	// Env is added to istiod's environment (KEY=VALUE), after and so
	// overriding Start's own settings. Zero adds nothing.
	Env []string
	// Args are added to pilot-discovery's command line. Zero adds nothing.
	Args []string
	// ReadyTimeout bounds the wait for CRDs, readiness and the root
	// certificate. Zero means 90 s.
	ReadyTimeout time.Duration
}

// Istiod is a running istiod.
type Istiod struct {
	// Address is the TLS gRPC endpoint for xDS and the CA (istiod's
	// 15012), 127.0.0.1:port.
	Address string
	// ServerName is the name to verify Address's certificate against.
	ServerName string
	// RootPEM is the mesh root certificate from the istio-ca-root-cert
	// ConfigMap.
	RootPEM []byte
	// HTTPAddr is istiod's plain HTTP endpoint (/ready, /debug/...).
	HTTPAddr string
	// PlainAddr is the plaintext gRPC xDS endpoint (istiod's 15010).
	PlainAddr string
	// Dir is istiod's working directory; Log its output.
	Dir, Log string

	cp   *kube.ControlPlane
	proc *proc.Process
}

// Start runs istiod against cp; see the package doc. Failures are fatal
// to tb.
func Start(tb testing.TB, cp *kube.ControlPlane, opts Options) *Istiod {
	tb.Helper()
	if opts.BinDir == "" {
		opts.BinDir = Binaries(tb)
	}
	if opts.ReadyTimeout <= 0 {
		opts.ReadyTimeout = 90 * time.Second
	}
	ctx, cancel := context.WithTimeout(context.Background(), opts.ReadyTimeout)
	defer cancel()

	d := &Istiod{ServerName: ServerName, Dir: tb.TempDir(), cp: cp}
	d.Log = filepath.Join(d.Dir, "istiod.log")
	if err := d.prepareCluster(ctx, filepath.Join(opts.BinDir, CRDFile)); err != nil {
		tb.Fatalf("istiod: %v", err)
	}
	args, err := d.args(opts.Args)
	if err != nil {
		tb.Fatalf("istiod: %v", err)
	}
	env := append(os.Environ(),
		"PILOT_ENABLE_AMBIENT=true",
		"POD_NAMESPACE="+Namespace,
		"POD_NAME=istiod-test",
		"CA_TRUSTED_NODE_ACCOUNTS="+Namespace+"/"+ZtunnelServiceAccount,
		// No webhooks are installed; don't patch what isn't there.
		"INJECTION_WEBHOOK_CONFIG_NAME=",
		"VALIDATION_WEBHOOK_CONFIG_NAME=",
	)
	env = append(env, opts.Env...)
	d.proc, err = proc.Start("istiod", filepath.Join(opts.BinDir, BinaryName), args, env, d.Dir, d.Log)
	if err != nil {
		tb.Fatalf("istiod: %v", err)
	}
	tb.Cleanup(func() {
		if tb.Failed() {
			tb.Logf("istiod log tail (%s):\n%s", d.Log, proc.Tail(d.Log, 40))
		}
		if err := d.proc.Stop(5 * time.Second); err != nil {
			tb.Errorf("istiod: %v", err)
		}
	})
	if err := d.waitReady(ctx); err != nil {
		tb.Fatalf("istiod: %v; log tail:\n%s", err, proc.Tail(d.Log, 40))
	}
	return d
}

// prepareCluster applies the CRDs and creates the namespace and the
// ztunnel's service account.
func (d *Istiod) prepareCluster(ctx context.Context, crds string) error {
	// Server-side apply: several CRDs exceed the 256 KiB annotation
	// client-side apply would add.
	if out, err := d.cp.Kubectl(ctx, "apply", "--server-side", "-f", crds); err != nil {
		return fmt.Errorf("apply crds: %w\n%s", err, out)
	}
	if out, err := d.cp.Kubectl(ctx, "wait", "--for=condition=established", "--timeout=60s", "-f", crds); err != nil {
		return fmt.Errorf("wait for crds: %w\n%s", err, out)
	}
	c := d.cp.Client.CoreV1()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: Namespace}}
	if _, err := c.Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create namespace %s: %w", Namespace, err)
	}
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: ZtunnelServiceAccount, Namespace: Namespace}}
	if _, err := c.ServiceAccounts(Namespace).Create(ctx, sa, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create service account %s/%s: %w", Namespace, ZtunnelServiceAccount, err)
	}
	return nil
}

// args puts every listener on a free loopback port and the mesh files in
// d.Dir.
func (d *Istiod) args(extra []string) ([]string, error) {
	ports := make([]int, 6)
	for i := range ports {
		p, err := freePort()
		if err != nil {
			return nil, err
		}
		ports[i] = p
	}
	at := func(p int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(p)) }
	d.HTTPAddr, d.PlainAddr, d.Address = at(ports[0]), at(ports[1]), at(ports[2])
	mesh := filepath.Join(d.Dir, "mesh.yaml")
	networks := filepath.Join(d.Dir, "meshNetworks.yaml")
	if err := os.WriteFile(mesh, []byte("trustDomain: cluster.local\n"), 0o644); err != nil {
		return nil, err
	}
	if err := os.WriteFile(networks, []byte("networks: {}\n"), 0o644); err != nil {
		return nil, err
	}
	args := []string{"discovery",
		"--kubeconfig=" + d.cp.Kubeconfig,
		"--meshConfig=" + mesh,
		"--networksConfig=" + networks,
		"--httpAddr=" + d.HTTPAddr,
		"--grpcAddr=" + d.PlainAddr,
		"--secureGRPCAddr=" + d.Address,
		"--httpsAddr=" + at(ports[3]),
		"--monitoringAddr=" + at(ports[4]),
		"--ctrlz_address=127.0.0.1",
		"--ctrlz_port=" + strconv.Itoa(ports[5]),
		"--shutdownDuration=1s",
		"--log_output_level=default:info",
	}
	return append(args, extra...), nil
}

// waitReady waits for /ready, a listening TLS port and the published root
// certificate.
func (d *Istiod) waitReady(ctx context.Context) error {
	hc := &http.Client{Timeout: 2 * time.Second}
	var last error
	for {
		if done, err := d.proc.Exited(); done {
			return fmt.Errorf("%w before ready: %v", proc.ErrExited, err)
		}
		last = d.readyOnce(ctx, hc)
		if last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("not ready: %w (last: %v)", ctx.Err(), last)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func (d *Istiod) readyOnce(ctx context.Context, hc *http.Client) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+d.HTTPAddr+"/ready", nil)
	if err != nil {
		return err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("/ready: %s %s", resp.Status, bytes.TrimSpace(body))
	}
	conn, err := (&net.Dialer{Timeout: time.Second}).DialContext(ctx, "tcp", d.Address)
	if err != nil {
		return err
	}
	conn.Close()
	cm, err := d.cp.Client.CoreV1().ConfigMaps(Namespace).Get(ctx, RootCertConfigMap, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("root cert: %w", err)
	}
	root := cm.Data["root-cert.pem"]
	if !strings.Contains(root, "BEGIN CERTIFICATE") {
		return fmt.Errorf("root cert: %s/%s has no root-cert.pem", Namespace, RootCertConfigMap)
	}
	d.RootPEM = []byte(root)
	return nil
}

// Token mints a token for istio-system/ztunnel with audience istio-ca.
// If pod is not nil the token is bound to it, which istiod needs to allow
// impersonation (it reads the pod's node from the token's pod claims).
func (d *Istiod) Token(ctx context.Context, pod *corev1.Pod) (string, error) {
	expiry := int64(3600)
	tr := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
		Audiences:         []string{TokenAudience},
		ExpirationSeconds: &expiry,
	}}
	if pod != nil {
		tr.Spec.BoundObjectRef = &authenticationv1.BoundObjectReference{
			Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID,
		}
	}
	out, err := d.cp.Client.CoreV1().ServiceAccounts(Namespace).CreateToken(ctx, ZtunnelServiceAccount, tr, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("token for %s/%s: %w", Namespace, ZtunnelServiceAccount, err)
	}
	return out.Status.Token, nil
}

// WriteToken writes Token(ctx, pod) to a file in a test directory (what
// ztunnel configurations take) and returns its path.
func (d *Istiod) WriteToken(tb testing.TB, ctx context.Context, pod *corev1.Pod) string {
	tb.Helper()
	tok, err := d.Token(ctx, pod)
	if err != nil {
		tb.Fatalf("istiod: %v", err)
	}
	f := filepath.Join(tb.TempDir(), "istio-token")
	if err := os.WriteFile(f, []byte(tok), 0o600); err != nil {
		tb.Fatalf("istiod: %v", err)
	}
	return f
}

// Pid returns istiod's process id.
func (d *Istiod) Pid() int { return d.proc.Cmd.Process.Pid }

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("free port: %w", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// Binaries returns the directory holding pilot-discovery and Istio's CRDs,
// building them with hack/istiod-bin.sh when needed (≈ 3.5 min cold). When
// they cannot be built the test skips, unless CI=true where it fails; with
// -short it only uses the cache.
func Binaries(tb testing.TB) (dir string) {
	tb.Helper()
	return buildcache.Dir(tb, buildcache.Build{
		What:      "istiod binaries",
		Script:    "istiod-bin.sh",
		BinDirEnv: BinDirEnv,
		Files:     []string{BinaryName, CRDFile},
	})
}
