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
	"k8s.io/client-go/kubernetes"

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

	// BinaryName, CRDFile and GatewayAPICRDFile are what Binaries'
	// directory holds. GatewayAPICRDFile is the Gateway API bundle Istio's
	// integration tests install (same istio.io/istio module).
	BinaryName        = "pilot-discovery"
	CRDFile           = "crd-all.gen.yaml"
	GatewayAPICRDFile = "gateway-api-crd.yaml"
	// IstioctlName is Istioctl's binary, in the same directory.
	IstioctlName = "istioctl"
	// HBONEInteropName is Istio's HBONE client and server program, in
	// the same directory.
	HBONEInteropName = "hbone-interop"
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
	// GatewayAPI applies the Gateway API CRDs (GatewayAPICRDFile) before
	// istiod starts, so that it serves Gateway, HTTPRoute and waypoints.
	// Zero: only Istio's CRDs.
	GatewayAPI bool
	// Injector creates the injector ConfigMap (istio-sidecar-injector:
	// the templates, waypoint's among them, and values) as Istio's
	// istio-discovery Helm chart renders it with its defaults, from the
	// same istio module, before istiod starts: istiod's deployment
	// controller then renders a Deployment, Service and ServiceAccount for
	// every waypoint Gateway (nothing runs their pods). Zero: none, and
	// istiod deploys nothing ("no waypoint template").
	Injector bool
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

	cp      *kube.ControlPlane
	proc    *proc.Process
	stopped bool
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
	if err := Prepare(ctx, cp.Kubectl, cp.Client, filepath.Join(opts.BinDir, CRDFile)); err != nil {
		tb.Fatalf("istiod: %v", err)
	}
	if opts.GatewayAPI {
		if err := ApplyCRDs(ctx, cp.Kubectl, filepath.Join(opts.BinDir, GatewayAPICRDFile)); err != nil {
			tb.Fatalf("istiod: gateway api: %v", err)
		}
	}
	if opts.Injector {
		if err := applyInjector(ctx, tb, cp, opts.BinDir); err != nil {
			tb.Fatalf("istiod: injector config: %v", err)
		}
	}
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: ZtunnelServiceAccount, Namespace: Namespace}}
	if _, err := cp.Client.CoreV1().ServiceAccounts(Namespace).Create(ctx, sa, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		tb.Fatalf("istiod: create service account %s/%s: %v", Namespace, ZtunnelServiceAccount, err)
	}
	var listen Listen
	for _, a := range []*string{&listen.HTTP, &listen.PlainGRPC, &listen.SecureGRPC, &listen.HTTPS, &listen.Monitoring, &listen.Ctrlz} {
		p, err := freePort()
		if err != nil {
			tb.Fatalf("istiod: %v", err)
		}
		*a = net.JoinHostPort("127.0.0.1", strconv.Itoa(p))
	}
	d.HTTPAddr, d.PlainAddr, d.Address = listen.HTTP, listen.PlainGRPC, listen.SecureGRPC
	args, env, err := Command(cp.Kubeconfig, d.Dir, listen, MeshConfig)
	if err != nil {
		tb.Fatalf("istiod: %v", err)
	}
	args = append(args, opts.Args...)
	env = append(append(os.Environ(), env...), opts.Env...)
	d.proc, err = proc.Start("istiod", filepath.Join(opts.BinDir, BinaryName), args, env, d.Dir, d.Log)
	if err != nil {
		tb.Fatalf("istiod: %v", err)
	}
	tb.Cleanup(func() {
		if tb.Failed() {
			tb.Logf("istiod log tail (%s):\n%s", d.Log, proc.Tail(d.Log, 40))
		}
		if d.stopped {
			return
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

// Kubectl runs kubectl against the API server istiod watches.
type Kubectl func(ctx context.Context, args ...string) ([]byte, error)

// Prepare readies an API server for istiod: it applies Istio's CRDs (the
// file crds, established before it returns) and creates the istio-system
// namespace. The ztunnel's service account is the ztunnel's installer's
// business (Start creates one; amber's chart brings its own).
func Prepare(ctx context.Context, kubectl Kubectl, cs kubernetes.Interface, crds string) error {
	if err := ApplyCRDs(ctx, kubectl, crds); err != nil {
		return err
	}
	c := cs.CoreV1()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: Namespace}}
	if _, err := c.Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create namespace %s: %w", Namespace, err)
	}
	return nil
}

// ApplyCRDs applies the objects in the file crds and waits until its CRDs
// are established (the Gateway API bundle also holds a
// ValidatingAdmissionPolicy, which has no such condition).
func ApplyCRDs(ctx context.Context, kubectl Kubectl, crds string) error {
	// Server-side apply: several CRDs exceed the 256 KiB annotation
	// client-side apply would add.
	out, err := kubectl(ctx, "apply", "--server-side", "-o", "name", "-f", crds)
	if err != nil {
		return fmt.Errorf("apply crds: %w\n%s", err, out)
	}
	var names []string
	for _, n := range strings.Fields(string(out)) {
		if strings.HasPrefix(n, "customresourcedefinition.apiextensions.k8s.io/") {
			names = append(names, n)
		}
	}
	if len(names) == 0 {
		return fmt.Errorf("apply crds: %s holds no CRD", crds)
	}
	args := append([]string{"wait", "--for=condition=established", "--timeout=60s"}, names...)
	if out, err := kubectl(ctx, args...); err != nil {
		return fmt.Errorf("wait for crds: %w\n%s", err, out)
	}
	return nil
}

// MeshConfig is the mesh configuration istiod runs with: what Istio's
// istio-discovery Helm chart renders with its default values
// (templates/configmap.yaml "mesh"), so that istiod generates what it
// generates in a default install (the Prometheus metrics provider puts
// istio.stats into sidecar and waypoint configuration).
const MeshConfig = `trustDomain: cluster.local
rootNamespace: istio-system
defaultProviders:
  metrics:
  - prometheus
defaultConfig:
  discoveryAddress: istiod.istio-system.svc:15012
`

// Listen holds the host:port addresses pilot-discovery listens on.
type Listen struct {
	// HTTP serves /ready and /debug (istiod's 8080).
	HTTP string
	// PlainGRPC is plaintext xDS (15010).
	PlainGRPC string
	// SecureGRPC is TLS xDS and the CA (15012).
	SecureGRPC string
	// HTTPS is the webhook port (15017).
	HTTPS string
	// Monitoring serves metrics (15014).
	Monitoring string
	// Ctrlz is ControlZ's introspection page (9876).
	Ctrlz string
}

// Command returns pilot-discovery's arguments and the environment it
// needs on top of the caller's, to run in ambient mode against the API
// server of kubeconfig, listening on l, in the working directory dir.
//
// With mesh set, istiod reads that mesh configuration (and no mesh
// networks) from files Command writes into dir. With mesh empty it reads
// both from the MeshConfigMap ConfigMap in Namespace, as an installed
// istiod does, and keeps watching it; the caller creates it first
// (RenderConfigMaps). Neither way gives istiod injection templates of
// its own: those only come from InjectorConfigMap.
func Command(kubeconfig, dir string, l Listen, mesh string) (args, env []string, err error) {
	ctrlzHost, ctrlzPort, err := net.SplitHostPort(l.Ctrlz)
	if err != nil {
		return nil, nil, fmt.Errorf("ctrlz address: %w", err)
	}
	args = []string{"discovery", "--kubeconfig=" + kubeconfig}
	if mesh != "" {
		meshFile := filepath.Join(dir, "mesh.yaml")
		networks := filepath.Join(dir, "meshNetworks.yaml")
		if err := os.WriteFile(meshFile, []byte(mesh), 0o644); err != nil {
			return nil, nil, err
		}
		if err := os.WriteFile(networks, []byte("networks: {}\n"), 0o644); err != nil {
			return nil, nil, err
		}
		args = append(args, "--meshConfig="+meshFile, "--networksConfig="+networks)
	} else {
		// A file that does not exist: istiod falls back to the ConfigMap
		// (pilot/pkg/bootstrap/mesh.go getConfigurationSources). Named
		// explicitly so that istiod's default (./etc/istio/config/mesh,
		// relative to its working directory) cannot shadow it.
		args = append(args, "--meshConfig="+filepath.Join(dir, "no-mesh-file-read-configmap-istio"),
			"--networksConfig="+filepath.Join(dir, "no-networks-file-read-configmap-istio"))
	}
	args = append(args,
		"--httpAddr="+l.HTTP,
		"--grpcAddr="+l.PlainGRPC,
		"--secureGRPCAddr="+l.SecureGRPC,
		"--httpsAddr="+l.HTTPS,
		"--monitoringAddr="+l.Monitoring,
		"--ctrlz_address="+ctrlzHost,
		"--ctrlz_port="+ctrlzPort,
		"--shutdownDuration=1s",
		"--log_output_level=default:info",
	)
	env = []string{
		"PILOT_ENABLE_AMBIENT=true",
		"POD_NAMESPACE=" + Namespace,
		"POD_NAME=istiod-test",
		"CA_TRUSTED_NODE_ACCOUNTS=" + Namespace + "/" + ZtunnelServiceAccount,
		// No webhooks are installed; don't patch what isn't there.
		"INJECTION_WEBHOOK_CONFIG_NAME=",
		"VALIDATION_WEBHOOK_CONFIG_NAME=",
	}
	return args, env, nil
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
	if err := Ready(ctx, hc, d.HTTPAddr, d.Address); err != nil {
		return err
	}
	root, err := RootCert(ctx, d.cp.Client)
	if err != nil {
		return err
	}
	d.RootPEM = root
	return nil
}

// Ready checks istiod's /ready on its HTTP address and that its TLS gRPC
// port accepts connections.
func Ready(ctx context.Context, hc *http.Client, httpAddr, secureGRPC string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+httpAddr+"/ready", nil)
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
	conn, err := (&net.Dialer{Timeout: time.Second}).DialContext(ctx, "tcp", secureGRPC)
	if err != nil {
		return err
	}
	return conn.Close()
}

// RootCert returns the mesh root certificate istiod published in
// istio-system's istio-ca-root-cert ConfigMap.
func RootCert(ctx context.Context, cs kubernetes.Interface) ([]byte, error) {
	cm, err := cs.CoreV1().ConfigMaps(Namespace).Get(ctx, RootCertConfigMap, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("root cert: %w", err)
	}
	root := cm.Data["root-cert.pem"]
	if !strings.Contains(root, "BEGIN CERTIFICATE") {
		return nil, fmt.Errorf("root cert: %s/%s has no root-cert.pem", Namespace, RootCertConfigMap)
	}
	return []byte(root), nil
}

// Token mints a token for istio-system/ztunnel with audience istio-ca.
// If pod is not nil the token is bound to it, which istiod needs to allow
// impersonation (it reads the pod's node from the token's pod claims).
func (d *Istiod) Token(ctx context.Context, pod *corev1.Pod) (string, error) {
	return d.TokenFor(ctx, Namespace, ZtunnelServiceAccount, pod)
}

// TokenFor mints a token for namespace/serviceAccount with audience
// istio-ca, bound to pod when it is not nil: what the kubelet projects into
// a pod's istio-token volume.
func (d *Istiod) TokenFor(ctx context.Context, namespace, serviceAccount string, pod *corev1.Pod) (string, error) {
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
	out, err := d.cp.Client.CoreV1().ServiceAccounts(namespace).CreateToken(ctx, serviceAccount, tr, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("token for %s/%s: %w", namespace, serviceAccount, err)
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

// Stop stops istiod before the test ends (to test what its clients do
// without it); the cleanup then has nothing to stop. Not safe for
// concurrent use with the cleanup.
func (d *Istiod) Stop() error {
	d.stopped = true
	return d.proc.Stop(5 * time.Second)
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

// applyInjector creates InjectorConfigMap as the chart in binDir renders
// it with its defaults.
func applyInjector(ctx context.Context, tb testing.TB, cp *kube.ControlPlane, binDir string) error {
	cms, err := RenderConfigMaps(ctx, Helm(tb), filepath.Join(binDir, ChartDir))
	if err != nil {
		return err
	}
	inj := cms[1]
	if _, err := cp.Client.CoreV1().ConfigMaps(Namespace).Create(ctx, &inj, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create %s/%s: %w", Namespace, inj.Name, err)
	}
	return nil
}

// Helm returns Helm's binary, built once by hack/helm.sh.
func Helm(tb testing.TB) string {
	tb.Helper()
	return filepath.Join(buildcache.Dir(tb, buildcache.Build{What: "helm", Script: "helm.sh", Files: []string{"helm"}}), "helm")
}

// Istioctl returns the pinned Istio's istioctl, built with
// hack/istiod-bin.sh like the other binaries (about a minute once
// pilot-discovery was built), for tests that read amber's output with its
// parsers (`istioctl proxy-config ... --file`).
func Istioctl(tb testing.TB) string {
	tb.Helper()
	return filepath.Join(buildcache.Dir(tb, buildcache.Build{
		What:      "istioctl",
		Script:    "istiod-bin.sh",
		Args:      []string{"istioctl"},
		BinDirEnv: BinDirEnv,
		Files:     []string{IstioctlName},
	}), IstioctlName)
}

// HBONEInterop returns the pinned Istio's HBONE (pkg/hbone) as a client
// and server program (tools/hbone-interop), built with
// hack/istiod-bin.sh like the other binaries, for interoperability tests.
func HBONEInterop(tb testing.TB) string {
	tb.Helper()
	return filepath.Join(buildcache.Dir(tb, buildcache.Build{
		What:      "Istio's " + HBONEInteropName,
		Script:    "istiod-bin.sh",
		Args:      []string{HBONEInteropName},
		BinDirEnv: BinDirEnv,
		Files:     []string{HBONEInteropName},
	}), HBONEInteropName)
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
		Files:     []string{BinaryName, CRDFile, GatewayAPICRDFile, filepath.Join(ChartDir, "Chart.yaml")},
	})
}

// DebugGet fetches path (/debug/syncz, /debug/configz, ...) from istiod's
// plain HTTP endpoint httpAddr (Istiod.HTTPAddr) and fails on any status
// but 200.
func DebugGet(ctx context.Context, httpAddr, path string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+httpAddr+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("istiod %s: %s", path, resp.Status)
	}
	return body, nil
}
