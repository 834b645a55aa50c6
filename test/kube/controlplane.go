package kube

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/amber-mesh/amber/test/proc"
)

// Options configure Start. The zero value starts etcd and a kube-apiserver
// from the build cache, suitable for tests without a controller-manager.
type Options struct {
	// BinDir holds etcd, kube-apiserver and (for Kubectl) kubectl.
	// Zero: Binaries(tb), which builds them if needed or skips the test.
	BinDir string

	// ServiceAccountAdmission enables the ServiceAccount admission plugin.
	// Zero (false): disabled, because without a controller-manager no
	// service account, not even "default", is ever created and the plugin
	// refuses every pod. Enable it when a controller-manager runs.
	ServiceAccountAdmission bool

	// APIServerArgs are appended to kube-apiserver's command line. A scalar
	// flag given again overrides the default; a list flag (such as
	// --disable-admission-plugins) adds to it.
	// Zero: none.
	APIServerArgs []string

	// EtcdArgs are appended to etcd's command line. Zero: none.
	EtcdArgs []string

	// ReadyTimeout bounds the wait for etcd's /health and the API server's
	// /readyz, at Start and at StartAPIServer. Zero: 60s, room for a
	// machine busy building binaries (ready in ≈ 3 s when idle).
	ReadyTimeout time.Duration
}

// ControlPlane is a running etcd and kube-apiserver on loopback. Stopping
// and starting the API server keeps its port, certificates and etcd data,
// so clients and informers reconnect to the same cluster state.
type ControlPlane struct {
	// Config is an admin (group system:masters) client configuration for
	// the API server. It stays valid across StopAPIServer/StartAPIServer.
	Config *rest.Config
	// Kubeconfig is a kubeconfig file with the same credentials, for
	// kubectl and other processes.
	Kubeconfig string
	// Client is a clientset made from Config.
	Client kubernetes.Interface
	// URL is the API server's address, https://127.0.0.1:PORT.
	URL string
	// EtcdURL is etcd's client address, http://127.0.0.1:PORT.
	EtcdURL string
	// PKI holds the certificate authority, serving certificate and
	// service-account keys, for components started later (kubelet,
	// controller-manager, istiod).
	PKI *PKI
	// Dir holds certificates, etcd data and logs (etcd.log,
	// kube-apiserver.log); it is removed when the test ends.
	Dir string
	// BinDir is where etcd, kube-apiserver and kubectl were found.
	BinDir string

	opts    Options
	apiArgs []string

	mu        sync.Mutex // guards the fields below
	etcd      *proc.Process
	apiserver *proc.Process
}

// Grace periods before SIGKILL. The API server drains requests on SIGTERM
// but can hang while a kubelet exec stream is open; etcd stops in well
// under a second.
const (
	apiserverGrace = 10 * time.Second
	etcdGrace      = 5 * time.Second
	startAttempts  = 3
)

var (
	// errPortInUse marks a start that failed because another process took
	// a port between picking it and the child binding it; Start picks new
	// ports.
	errPortInUse = errors.New("port already in use")
)

// Start runs etcd and a kube-apiserver on random free loopback ports, with
// data and freshly generated certificates in tb.TempDir(), and returns
// once /readyz answers ok. Both processes are stopped (API server first)
// and their files removed when the test ends, also when it fails; they are
// killed with the test process if it dies first.
func Start(tb testing.TB, opts Options) *ControlPlane {
	tb.Helper()
	if opts.ReadyTimeout == 0 {
		opts.ReadyTimeout = 60 * time.Second
	}
	binDir := opts.BinDir
	if binDir == "" {
		binDir = Binaries(tb)
	}
	// TempDir first: cleanups run last-in first-out, so the processes are
	// stopped before their directory is removed.
	dir := tb.TempDir()
	cp := &ControlPlane{Dir: dir, BinDir: binDir, opts: opts}
	tb.Cleanup(func() {
		if err := cp.Stop(); err != nil {
			tb.Errorf("stop control plane: %v", err)
		}
		if tb.Failed() {
			tb.Logf("etcd.log (tail):\n%s", proc.Tail(filepath.Join(dir, "etcd.log"), 30))
			tb.Logf("kube-apiserver.log (tail):\n%s", proc.Tail(filepath.Join(dir, "kube-apiserver.log"), 60))
		}
	})

	var err error
	if cp.PKI, err = newPKI(filepath.Join(dir, "pki")); err != nil {
		tb.Fatalf("start control plane: %v", err)
	}
	for attempt := 1; ; attempt++ {
		err = cp.startEtcd()
		if err == nil || !errors.Is(err, errPortInUse) || attempt == startAttempts {
			break
		}
	}
	if err != nil {
		tb.Fatalf("start control plane: %v", err)
	}
	for attempt := 1; ; attempt++ {
		err = cp.firstStartAPIServer()
		if err == nil || !errors.Is(err, errPortInUse) || attempt == startAttempts {
			break
		}
	}
	if err != nil {
		tb.Fatalf("start control plane: %v", err)
	}
	return cp
}

func (cp *ControlPlane) startEtcd() error {
	clientPort, err := freePort()
	if err != nil {
		return err
	}
	peerPort, err := freePort()
	if err != nil {
		return err
	}
	// A failed attempt may have left a member with other peer URLs.
	dataDir := filepath.Join(cp.Dir, "etcd")
	if err := os.RemoveAll(dataDir); err != nil {
		return fmt.Errorf("start etcd: %w", err)
	}
	client := "http://127.0.0.1:" + strconv.Itoa(clientPort)
	peer := "http://127.0.0.1:" + strconv.Itoa(peerPort)
	args := []string{
		"--name=amber-test",
		"--data-dir=" + dataDir,
		"--listen-client-urls=" + client,
		"--advertise-client-urls=" + client,
		"--listen-peer-urls=" + peer,
		"--initial-advertise-peer-urls=" + peer,
		"--initial-cluster=amber-test=" + peer,
		// Throw-away data: durability buys nothing and fsync costs
		// seconds per test on a loaded disk.
		"--unsafe-no-fsync",
	}
	args = append(args, cp.opts.EtcdArgs...)
	p, err := proc.Start("etcd", filepath.Join(cp.BinDir, "etcd"), args, nil, "", filepath.Join(cp.Dir, "etcd.log"))
	if err != nil {
		return err
	}
	cp.mu.Lock()
	cp.etcd = p
	cp.mu.Unlock()
	cp.EtcdURL = client

	ctx, cancel := context.WithTimeout(context.Background(), cp.opts.ReadyTimeout)
	defer cancel()
	err = waitReady(ctx, p, func(ctx context.Context) error {
		return httpOK(ctx, healthClient, client+"/health")
	})
	if err != nil {
		_ = p.Stop(etcdGrace)
		cp.mu.Lock()
		cp.etcd = nil
		cp.mu.Unlock()
		return err
	}
	return nil
}

// firstStartAPIServer picks the API server's port, writes the admin
// kubeconfig and starts it; later starts reuse all of that.
func (cp *ControlPlane) firstStartAPIServer() error {
	port, err := freePort()
	if err != nil {
		return err
	}
	cp.URL = "https://127.0.0.1:" + strconv.Itoa(port)
	admission := []string{}
	if !cp.opts.ServiceAccountAdmission {
		admission = append(admission, "--disable-admission-plugins=ServiceAccount")
	}
	cp.apiArgs = append(append([]string{
		"--bind-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(port),
		// On loopback the default endpoint reconciler would publish
		// 127.0.0.1 as the kubernetes service's endpoint; it refuses to.
		"--advertise-address=127.0.0.1",
		"--endpoint-reconciler-type=none",
		"--etcd-servers=" + cp.EtcdURL,
		// Without it the API server would write self-signed certificates
		// to /var/run/kubernetes.
		"--cert-dir=" + filepath.Join(cp.Dir, "apiserver-certs"),
		"--tls-cert-file=" + cp.PKI.ServingCert,
		"--tls-private-key-file=" + cp.PKI.ServingKey,
		"--client-ca-file=" + cp.PKI.CACert,
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + cp.PKI.ServiceAccountPub,
		"--service-account-signing-key-file=" + cp.PKI.ServiceAccountKey,
		"--service-cluster-ip-range=" + ServiceCIDR,
		"--authorization-mode=Node,RBAC",
		"--kubelet-client-certificate=" + cp.PKI.KubeletClientCert,
		"--kubelet-client-key=" + cp.PKI.KubeletClientKey,
		"--kubelet-preferred-address-types=InternalIP,Hostname",
		// amber's node components are privileged DaemonSets.
		"--allow-privileged=true",
		// On SIGTERM the HTTP server waits for open streams, watches
		// included, up to --request-timeout (60s): tests that stop the API
		// server while an informer runs would wait that long. In this mode
		// it gives them 2s.
		"--shutdown-send-retry-after=true",
	}, admission...), cp.opts.APIServerArgs...)

	certPEM, keyPEM, err := cp.PKI.ClientCert("amber-test-admin", "system:masters")
	if err != nil {
		return err
	}
	cp.Config, cp.Kubeconfig, err = cp.writeKubeconfig("admin", "amber-test-admin", certPEM, keyPEM)
	if err != nil {
		return err
	}
	if cp.Client, err = kubernetes.NewForConfig(cp.Config); err != nil {
		return fmt.Errorf("create clientset: %w", err)
	}
	return cp.startAPIServer()
}

func (cp *ControlPlane) startAPIServer() error {
	p, err := proc.Start("kube-apiserver", filepath.Join(cp.BinDir, "kube-apiserver"), cp.apiArgs, nil, "", filepath.Join(cp.Dir, "kube-apiserver.log"))
	if err != nil {
		return err
	}
	cp.mu.Lock()
	cp.apiserver = p
	cp.mu.Unlock()

	ctx, cancel := context.WithTimeout(context.Background(), cp.opts.ReadyTimeout)
	defer cancel()
	rc := cp.Client.Discovery().RESTClient()
	err = waitReady(ctx, p, func(ctx context.Context) error {
		// /readyz includes the post-start hooks (RBAC bootstrap roles,
		// priority-and-fairness configuration) tests would otherwise race.
		_, err := rc.Get().AbsPath("/readyz").Timeout(5 * time.Second).DoRaw(ctx)
		return err
	})
	if err != nil {
		_ = p.Stop(apiserverGrace)
		cp.mu.Lock()
		cp.apiserver = nil
		cp.mu.Unlock()
		return err
	}
	return nil
}

// StopAPIServer stops the API server, keeping etcd and every file, so that
// StartAPIServer can bring the same cluster back on the same port. Clients
// see connection refused in between. It does nothing when the API server
// is not running.
func (cp *ControlPlane) StopAPIServer() error {
	cp.mu.Lock()
	p := cp.apiserver
	cp.apiserver = nil
	cp.mu.Unlock()
	if p == nil {
		return nil
	}
	return p.Stop(apiserverGrace)
}

// StartAPIServer starts the API server stopped by StopAPIServer again, on
// the same port with the same flags and etcd data, and waits for /readyz.
func (cp *ControlPlane) StartAPIServer(tb testing.TB) {
	tb.Helper()
	cp.mu.Lock()
	running, haveEtcd := cp.apiserver != nil, cp.etcd != nil
	cp.mu.Unlock()
	switch {
	case running:
		tb.Fatalf("start kube-apiserver: already running")
	case !haveEtcd:
		tb.Fatalf("start kube-apiserver: control plane stopped")
	}
	if err := cp.startAPIServer(); err != nil {
		tb.Fatalf("restart %v", err)
	}
}

// Stop stops the API server, then etcd. The test's cleanup calls it; a
// test may call it earlier. It is safe to call more than once.
func (cp *ControlPlane) Stop() error {
	errAPI := cp.StopAPIServer()
	cp.mu.Lock()
	etcd := cp.etcd
	cp.etcd = nil
	cp.mu.Unlock()
	var errEtcd error
	if etcd != nil {
		errEtcd = etcd.Stop(etcdGrace)
	}
	return errors.Join(errAPI, errEtcd)
}

// UserConfig returns a client configuration and a kubeconfig file for
// user in groups, authenticated by a client certificate from the cluster
// CA: "system:node:NAME" in "system:nodes" for a kubelet,
// "system:kube-controller-manager", "system:kube-scheduler", ...
func (cp *ControlPlane) UserConfig(tb testing.TB, user string, groups ...string) (*rest.Config, string) {
	tb.Helper()
	certPEM, keyPEM, err := cp.PKI.ClientCert(user, groups...)
	if err != nil {
		tb.Fatalf("user config: %v", err)
	}
	name := strings.NewReplacer(":", "-", "/", "-").Replace(user)
	cfg, path, err := cp.writeKubeconfig(name, user, certPEM, keyPEM)
	if err != nil {
		tb.Fatalf("user config: %v", err)
	}
	return cfg, path
}

// Kubectl runs kubectl against the control plane as admin and returns its
// standard output; the error carries its standard error. args follow the
// admin --kubeconfig, so a --kubeconfig among them (from UserConfig) acts
// as another user.
func (cp *ControlPlane) Kubectl(ctx context.Context, args ...string) ([]byte, error) {
	return cp.kubectl(ctx, "", args)
}

// Apply applies the objects of a YAML manifest (kubectl apply).
func (cp *ControlPlane) Apply(ctx context.Context, manifest string) error {
	if out, err := cp.kubectl(ctx, manifest, []string{"apply", "-f", "-"}); err != nil {
		return fmt.Errorf("%w\n%s", err, out)
	}
	return nil
}

// kubectl runs kubectl with args and stdin on its standard input.
func (cp *ControlPlane) kubectl(ctx context.Context, stdin string, args []string) ([]byte, error) {
	full := append([]string{
		"--kubeconfig=" + cp.Kubeconfig,
		// Else kubectl caches discovery under $HOME/.kube.
		"--cache-dir=" + filepath.Join(cp.Dir, "kubectl-cache"),
	}, args...)
	cmd := exec.CommandContext(ctx, filepath.Join(cp.BinDir, "kubectl"), full...)
	cmd.Stdin = strings.NewReader(stdin)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// Pids returns the process ids of etcd and the API server; 0 for one that
// is not running.
func (cp *ControlPlane) Pids() (etcd, apiserver int) {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	if cp.etcd != nil {
		etcd = cp.etcd.Cmd.Process.Pid
	}
	if cp.apiserver != nil {
		apiserver = cp.apiserver.Cmd.Process.Pid
	}
	return etcd, apiserver
}

func (cp *ControlPlane) writeKubeconfig(name, user string, certPEM, keyPEM []byte) (*rest.Config, string, error) {
	cfg := &rest.Config{
		Host: cp.URL,
		TLSClientConfig: rest.TLSClientConfig{
			CAData:   cp.PKI.CAPEM(),
			CertData: certPEM,
			KeyData:  keyPEM,
		},
		// client-go's default (5 QPS) throttles test setup loops.
		QPS:   100,
		Burst: 200,
	}
	path := filepath.Join(cp.Dir, "kubeconfig-"+name)
	if err := os.WriteFile(path, cp.PKI.Kubeconfig("amber-test", cp.URL, user, certPEM, keyPEM), 0o600); err != nil {
		return nil, "", fmt.Errorf("write kubeconfig: %w", err)
	}
	return cfg, path, nil
}

// waitReady polls check until it succeeds, the process exits or ctx ends.
func waitReady(ctx context.Context, p *proc.Process, check func(context.Context) error) error {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		if done, err := p.Exited(); done {
			err = fmt.Errorf("%s %w before it was ready (%v); log %s:\n%s", p.Name, proc.ErrExited, err, p.Log, p.LogTail(20))
			if strings.Contains(p.LogTail(50), "address already in use") {
				err = fmt.Errorf("%w: %w", errPortInUse, err)
			}
			return err
		}
		if last = check(ctx); last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s not ready: %w (last check: %v); log %s:\n%s", p.Name, ctx.Err(), last, p.Log, p.LogTail(20))
		case <-tick.C:
		}
	}
}

var healthClient = &http.Client{Timeout: 2 * time.Second}

func httpOK(ctx context.Context, c *http.Client, url string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return nil
}

// freePort returns a loopback TCP port that was free a moment ago. Another
// process may take it before the child binds it: callers retry on
// errPortInUse.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("pick a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
