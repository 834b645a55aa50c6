package istiod_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/amber-mesh/amber/test/istiod"
	"github.com/amber-mesh/amber/test/kube"
	"github.com/amber-mesh/amber/tunnel/authz"
	"github.com/amber-mesh/amber/tunnel/ca"
	"github.com/amber-mesh/amber/tunnel/identity"
	"github.com/amber-mesh/amber/xds/client"
	"github.com/amber-mesh/amber/xds/state"
)

const (
	nodeName  = "node-1"
	sleepIP   = "10.244.0.5"
	ztunnelIP = "10.244.0.2"
	sleepID   = "spiffe://cluster.local/ns/default/sa/sleep"
)

// bearer sends the ztunnel's token on every RPC, as Istio's ztunnel does.
type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

func (bearer) RequireTransportSecurity() bool { return true }

// TestIntegrationIstiodZtunnel checks amber's ztunnel-side clients against
// a real istiod: workload discovery, certificate signing with impersonation,
// and L4 authorization policy.
func TestIntegrationIstiodZtunnel(t *testing.T) {
	bin := istiod.Binaries(t)
	cp := kube.Start(t, kube.Options{})
	d := istiod.Start(t, cp, istiod.Options{BinDir: bin})

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := cp.Client.CoreV1()

	// The mesh as the node agent and the kubelet would leave it: an ambient
	// namespace, a captured sleep pod and the ztunnel pod on one node.
	_, err := c.Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: nodeName}}, metav1.CreateOptions{})
	must(t, err)
	ns, err := c.Namespaces().Get(ctx, "default", metav1.GetOptions{})
	must(t, err)
	if ns.Labels == nil {
		ns.Labels = map[string]string{}
	}
	ns.Labels["istio.io/dataplane-mode"] = "ambient"
	_, err = c.Namespaces().Update(ctx, ns, metav1.UpdateOptions{})
	must(t, err)
	_, err = c.ServiceAccounts("default").Create(ctx, &corev1.ServiceAccount{
		ObjectMeta: metav1.ObjectMeta{Name: "sleep"},
	}, metav1.CreateOptions{})
	must(t, err)
	runningPod(t, ctx, cp, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: "sleep", Namespace: "default",
			Labels:      map[string]string{"app": "sleep"},
			Annotations: map[string]string{"ambient.istio.io/redirection": "enabled"},
		},
		Spec: corev1.PodSpec{
			NodeName: nodeName, ServiceAccountName: "sleep",
			Containers: []corev1.Container{{Name: "sleep", Image: "sleep"}},
		},
	}, sleepIP)
	zt := runningPod(t, ctx, cp, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "ztunnel-test", Namespace: istiod.Namespace},
		Spec: corev1.PodSpec{
			NodeName: nodeName, ServiceAccountName: istiod.ZtunnelServiceAccount,
			Containers: []corev1.Container{{Name: "istio-proxy", Image: "ztunnel"}},
		},
	}, ztunnelIP)
	// istiod authorises impersonation from the pod claims of a bound token.
	token, err := d.Token(ctx, zt)
	must(t, err)

	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(d.RootPEM) {
		t.Fatalf("root cert from istiod: no certificates:\n%s", d.RootPEM)
	}

	t.Run("workload", func(t *testing.T) {
		conn, err := grpc.NewClient(d.Address,
			grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: roots, ServerName: d.ServerName, MinVersion: tls.VersionTLS12})),
			grpc.WithPerRPCCredentials(bearer(token)))
		must(t, err)
		defer conn.Close()
		xc, err := client.New(client.Config{
			Conn: conn,
			Node: client.Node{IP: netip.MustParseAddr(ztunnelIP), PodName: zt.Name, PodNamespace: zt.Namespace},
		})
		must(t, err)
		sub := xc.Store().Subscribe()
		defer sub.Close()
		runClient(t, ctx, xc)

		w := waitFor(t, ctx, sub, "workload "+sleepIP, func(s *state.Snapshot) *state.Workload {
			for _, w := range s.Workloads() {
				for _, a := range w.Addresses {
					if a == netip.MustParseAddr(sleepIP) {
						return w
					}
				}
			}
			return nil
		})
		t.Logf("workload %s: name %s/%s sa %s node %s protocol %v", w.UID, w.Namespace, w.Name, w.ServiceAccount, w.Node, w.Protocol)
		if w.Protocol != state.ProtocolHBONE {
			t.Errorf("workload %s protocol %v, want HBONE (pod annotated ambient.istio.io/redirection=enabled)", w.UID, w.Protocol)
		}
		if w.ServiceAccount != "sleep" || w.Namespace != "default" || w.Name != "sleep" {
			t.Errorf("workload %s is %s/%s sa %q, want default/sleep sa sleep", w.UID, w.Namespace, w.Name, w.ServiceAccount)
		}
		if w.Node != nodeName {
			t.Errorf("workload %s node %q, want %q", w.UID, w.Node, nodeName)
		}

		// (c) An L4 policy applied now arrives on the same stream.
		policy := filepath.Join(t.TempDir(), "policy.yaml")
		must(t, os.WriteFile(policy, []byte(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-sleep
  namespace: default
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
`), 0o644))
		if out, err := cp.Kubectl(ctx, "apply", "-f", policy); err != nil {
			t.Fatalf("kubectl apply policy: %v\n%s", err, out)
		}
		a := waitFor(t, ctx, sub, "authorization default/allow-sleep", func(s *state.Snapshot) *authz.Policy {
			return s.Policies().Get("default/allow-sleep")
		}).Authorization()
		t.Logf("authorization: %+v", a)
		if a.Action != authz.ActionAllow {
			t.Errorf("action %v, want ALLOW", a.Action)
		}
		if !namesSleep(a) {
			t.Errorf("authorization %v does not match the sleep principal", a)
		}
	})

	t.Run("certificate", func(t *testing.T) {
		tokenFile := filepath.Join(t.TempDir(), "istio-token")
		must(t, os.WriteFile(tokenFile, []byte(token), 0o600))
		id, err := identity.Parse(sleepID)
		must(t, err)
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		must(t, err)
		csr, err := ca.CreateCSR(key, id)
		must(t, err)

		// istiod's node authorizer is found through the clusterid header
		// only: an unknown cluster is refused ("no node authorizer"), and
		// amber's zero ClusterID sends Istio's default, "Kubernetes".
		wrong, err := ca.NewIstio(ca.IstioConfig{
			Address: d.Address, ServerName: d.ServerName, RootPEM: d.RootPEM, TokenFile: tokenFile,
			ClusterID: "no-such-cluster",
		})
		must(t, err)
		defer wrong.Close()
		if _, err := wrong.Sign(ctx, csr, id, time.Hour); status.Code(err) != codes.Unauthenticated {
			t.Errorf("sign for an unknown cluster: %v, want Unauthenticated (has istiod changed?)", err)
		}

		cc, err := ca.NewIstio(ca.IstioConfig{
			Address: d.Address, ServerName: d.ServerName, RootPEM: d.RootPEM, TokenFile: tokenFile,
		})
		must(t, err)
		defer cc.Close()
		chain, err := cc.Sign(ctx, csr, id, time.Hour)
		must(t, err)
		got, err := identity.FromCertificate(chain[0])
		must(t, err)
		if got.String() != sleepID {
			t.Errorf("leaf identity %s, want %s", got, sleepID)
		}
		if _, err := chain[0].Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
			t.Errorf("leaf does not chain to istiod's root: %v", err)
		}
		t.Logf("leaf %s valid %s – %s, chain of %d", got, chain[0].NotBefore.Format(time.RFC3339), chain[0].NotAfter.Format(time.RFC3339), len(chain))

		// Fails closed: no pod with this identity runs on the ztunnel's node.
		other, err := identity.Parse("spiffe://cluster.local/ns/default/sa/notsleep")
		must(t, err)
		csr, err = ca.CreateCSR(key, other)
		must(t, err)
		if _, err := cc.Sign(ctx, csr, other, time.Hour); err == nil {
			t.Errorf("istiod signed %s, which has no pod on %s", other, nodeName)
		}
	})
}

// runningPod creates pod and sets its status as a kubelet would.
func runningPod(t *testing.T, ctx context.Context, cp *kube.ControlPlane, pod *corev1.Pod, ip string) *corev1.Pod {
	t.Helper()
	pods := cp.Client.CoreV1().Pods(pod.Namespace)
	p, err := pods.Create(ctx, pod, metav1.CreateOptions{})
	must(t, err)
	t.Cleanup(func() {
		// Without a kubelet only a zero grace period deletes a bound pod.
		_ = pods.Delete(context.Background(), p.Name, *metav1.NewDeleteOptions(0))
	})
	p.Status = corev1.PodStatus{
		Phase:  corev1.PodRunning,
		PodIP:  ip,
		PodIPs: []corev1.PodIP{{IP: ip}},
		HostIP: "127.0.0.1",
		Conditions: []corev1.PodCondition{
			{Type: corev1.PodReady, Status: corev1.ConditionTrue},
			{Type: corev1.ContainersReady, Status: corev1.ConditionTrue},
		},
	}
	p, err = pods.UpdateStatus(ctx, p, metav1.UpdateOptions{})
	must(t, err)
	return p
}

func runClient(t *testing.T, ctx context.Context, xc *client.Client) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- xc.Run(ctx) }()
	t.Cleanup(func() {
		if err := xc.Close(); err != nil {
			t.Errorf("xds client close: %v", err)
		}
		if err := <-done; err != nil && !errors.Is(err, client.ErrClosed) && !errors.Is(err, context.Canceled) {
			t.Errorf("xds client: %v", err)
		}
		t.Logf("xds client stats: %+v", xc.Stats())
	})
}

// waitFor waits until find returns non-nil on the store's snapshot.
func waitFor[T comparable](t *testing.T, ctx context.Context, sub *state.Subscription, what string, find func(*state.Snapshot) T) T {
	t.Helper()
	var zero T
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	snap, _ := sub.Take()
	for {
		if v := find(snap); v != zero {
			return v
		}
		var err error
		if snap, _, err = sub.Wait(ctx); err != nil {
			t.Fatalf("waiting for %s from istiod: %v", what, err)
		}
	}
}

// namesSleep reports whether some match of a names sleep's identity, as a
// principal or (newer istiods) as a service account.
func namesSleep(a authz.Authorization) bool {
	for _, g := range a.Groups {
		for _, r := range g.Rules {
			for _, m := range r.Matches {
				for _, p := range m.Principals {
					if p.Kind == authz.MatchExact && (p.Value == "cluster.local/ns/default/sa/sleep" || p.Value == sleepID) {
						return true
					}
				}
				for _, s := range m.ServiceAccounts {
					if s.Namespace == "default" && s.ServiceAccount == "sleep" {
						return true
					}
				}
			}
		}
	}
	return false
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
