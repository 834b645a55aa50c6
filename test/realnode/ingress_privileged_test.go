package realnode_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/test/cluster"
	"github.com/amber-mesh/amber/test/istiod"
	"github.com/amber-mesh/amber/test/privileged"
	"github.com/amber-mesh/amber/test/realnode"
)

// TestPrivilegedRealNodeIngress plays the walkthrough's ingress steps on
// the real node with amber's gateway in both of Istio's deployment forms:
// the classic istio-ingressgateway from Istio's own chart with
// `global.proxy.image` set to amber's image (the Deployment Istio's chart
// renders, the pod Ready as UID 1337 on a read-only root), then the
// walkthrough with Istio's bookinfo-gateway.yaml, productpage through
// http://istio-ingressgateway.istio-system/productpage, the L4 policy
// naming istio-ingressgateway-service-account (admitted over HBONE under
// that identity; refused without it; notsleep refused), the gateway's
// istio_requests_total; the Gateway API form (Gateway of class istio +
// HTTPRoute, istiod's Deployment with amber's chart's gateway.enabled); a
// rollout restart of istio-ingressgateway under 20 requests/s from sleep
// with none failing; and the L7 half with the 90/10 count also through the
// gateway.
func TestPrivilegedRealNodeIngress(t *testing.T) {
	privileged.Require(t)
	log := slog.New(slog.NewTextHandler(tlog{t}, nil))
	c := cluster.Up(t, cluster.Options{Istiod: true, Logger: log})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	a, _ := mustInstall(t, ctx, c, log)
	chart, err := realnode.IngressChartDir(c)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("$ helm %s", strings.Join(realnode.IngressHelmArgs(chart), " "))
	if err := a.InstallIngress(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, sel := range []string{realnode.IngressSelector} {
				out, _ := c.Kubectl(context.Background(), "-n", realnode.Namespace, "logs", "-l", sel, "--tail=40", "--prefix")
				t.Logf("gateway log tail (%s):\n%s", sel, out)
			}
		}
		if err := a.UninstallIngress(context.Background()); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})

	t.Run("Istio's chart renders istio-ingressgateway with amber's image; it runs amber-waypoint, a router node to istiod", func(t *testing.T) {
		ingressShape(t, ctx, c)
	})
	if t.Failed() {
		t.FailNow()
	}
	t.Run("the gateway pod becomes Ready: istiod's router configuration compiled", func(t *testing.T) {
		readyPod(t, ctx, c, realnode.Namespace, realnode.IngressSelector, realnode.IngressGateway)
	})
	if t.Failed() {
		t.FailNow()
	}

	var out strings.Builder
	w := &realnode.Walkthrough{Target: realnode.HostTarget(c), Out: &out, IstioFiles: c.Istiod.BinDir}
	step := func(name string, run func() error) {
		t.Helper()
		out.Reset()
		err := run()
		t.Logf("%s:\n%s", name, out.String())
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
	step("walkthrough, L4 half", func() error { return w.Run(ctx) })
	step("walkthrough, ingress steps", func() error { return w.RunIngress(ctx) })
	if err := a.Upgrade(ctx, "gateway.enabled=true"); err != nil {
		t.Fatal(err)
	}
	t.Run("Gateway API form: class istio, HTTPRoute, istiod's Deployment with amber's image", func(t *testing.T) {
		out.Reset()
		err := w.RunGatewayAPI(ctx)
		t.Logf("Gateway API form:\n%s", out.String())
		if err != nil {
			t.Fatal(err)
		}
	})
	t.Run("Gateway API HTTPS: TLS terminated with the certificateRefs Secret", func(t *testing.T) {
		gatewayHTTPS(t, ctx, c)
	})
	if err := a.Upgrade(ctx, "gateway.enabled=false"); err != nil {
		t.Fatal(err)
	}
	t.Run("rollout restart of istio-ingressgateway under 20 requests/s: none fails", func(t *testing.T) {
		ingressRolloutRestart(t, ctx, c)
	})
	step("walkthrough, L7 half (the 90/10 count also through the ingress gateway)", func() error { return w.RunL7(ctx) })
}

// gatewayHTTPS applies Istio's Gateway API Bookinfo sample with an HTTPS
// listener on 443 that terminates TLS with a kubernetes.io/tls Secret
// (certificateRefs; istiod serves it to the gateway over SDS), then GETs
// /productpage over HTTPS from sleep's network namespace with the Secret's
// host name, verifying the Secret's certificate: 200 with a page; a server
// name the listener does not serve gets no answer, whatever certificate
// the client would accept. The objects are removed at the end.
func gatewayHTTPS(t *testing.T, ctx context.Context, c *cluster.Cluster) {
	tg := realnode.HostTarget(c)
	const ns = "default"
	sample := filepath.Join(c.Istiod.BinDir, realnode.BookinfoGatewayAPISample)
	if _, err := c.Kubectl(ctx, "-n", ns, "apply", "-f", sample); err != nil {
		t.Fatal(err)
	}
	if err := tg.Apply(ctx, "bookinfo-gateway-tls.yaml", istiod.BookinfoTLSYAML(ns)); err != nil {
		t.Fatal(err)
	}
	// The policy of RunIngress, which the steps after this one need, with
	// this gateway's principal while it runs.
	defer func() {
		cctx := context.WithoutCancel(ctx)
		c.Kubectl(cctx, "-n", ns, "delete", "--ignore-not-found", "-f", sample, "-f", filepath.Join(tg.Manifests, "bookinfo-gateway-tls.yaml"))
		if err := tg.Apply(cctx, "productpage-viewer-ingress-"+ns+".yaml", realnode.IngressPolicyYAML(ns, realnode.IngressPrincipal)); err != nil {
			t.Error(err)
		}
	}()
	if err := tg.Apply(ctx, "productpage-viewer-gateway-api-default.yaml", realnode.IngressPolicyYAML(ns, realnode.IngressPrincipal,
		"cluster.local/ns/"+ns+"/sa/"+realnode.BookinfoGatewayAPI+"-istio")); err != nil {
		t.Fatal(err)
	}
	sleepNS, err := realnode.PodNetns(ctx, c, podOf(t, ctx, tg, ns, realnode.Sleep))
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM([]byte(istiod.BookinfoCertPEM))
	svcName := realnode.BookinfoGatewayAPI + "-istio"
	// verify false: any certificate is taken, so that only the gateway's
	// own refusal can fail the request.
	https := func(sni string, verify bool) (int, string, error) {
		svc, err := c.Client.CoreV1().Services(ns).Get(ctx, svcName, metav1.GetOptions{})
		if err != nil {
			return 0, "", err
		}
		hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: roots, ServerName: sni, InsecureSkipVerify: !verify},
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return realnode.DialFrom(ctx, sleepNS, net.JoinHostPort(svc.Spec.ClusterIP, "443"))
			},
		}}
		resp, err := hc.Get("https://" + istiod.BookinfoHost + "/productpage")
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body), err
	}
	waitFor(t, ctx, "a page over HTTPS through the Gateway API gateway", func() error {
		code, body, err := https(istiod.BookinfoHost, true)
		if err != nil {
			return err
		}
		if pods, _ := realnode.ReviewsPods(body); code != http.StatusOK || len(pods) != 1 || pods[0] == "" {
			return fmt.Errorf("status %d, page %.200q", code, body)
		}
		return nil
	})
	t.Logf("https://%s/productpage through %s:443 with the Secret's certificate: 200, a page", istiod.BookinfoHost, svcName)
	if code, _, err := https("evil.example.com", false); err == nil {
		t.Errorf("a server name the listener does not serve got an answer: %d", code)
	}
}

// ingressShape checks what Istio's chart rendered for the classic gateway
// against the walkthrough: Deployment (amber's image, the image's
// entrypoint, `proxy router`, the service account), Service port 80 →
// 8080 as bookinfo-gateway.yaml's 8080 server needs, and a running pod
// whose process is amber-waypoint as UID 1337 on a read-only root,
// connected to istiod as a router node and ACKing its listeners and
// clusters.
func ingressShape(t *testing.T, ctx context.Context, c *cluster.Cluster) {
	d, err := c.Client.AppsV1().Deployments(realnode.Namespace).Get(ctx, realnode.IngressGateway, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := realnode.CheckIngressDeployment(d); err != nil {
		t.Error(err)
	}
	out, _ := c.Kubectl(ctx, "-n", realnode.Namespace, "get", "deployment", realnode.IngressGateway, "-o", "yaml", "--show-managed-fields=false")
	t.Logf("the Deployment Istio's chart rendered:\n%s", out)
	svc, err := c.Client.CoreV1().Services(realnode.Namespace).Get(ctx, realnode.IngressGateway, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := realnode.CheckIngressService(svc); err != nil {
		t.Error(err)
	}
	var pod *corev1.Pod
	var pid int
	waitFor(t, ctx, "the istio-ingressgateway pod running amber-waypoint", func() error {
		pods, err := c.Client.CoreV1().Pods(realnode.Namespace).List(ctx, metav1.ListOptions{LabelSelector: realnode.IngressSelector})
		if err != nil {
			return err
		}
		for i := range pods.Items {
			p := &pods.Items[i]
			if cs := p.Status.ContainerStatuses; p.DeletionTimestamp == nil && len(cs) > 0 && cs[0].State.Running != nil {
				if pid, err = realnode.ProcessOf(realnode.GatewayCommand[0], string(p.UID)); err != nil {
					return err
				}
				pod = p
				return nil
			}
		}
		return fmt.Errorf("no running pod %s", realnode.IngressSelector)
	})
	checkConfined(t, pid, istiod.WaypointUID)

	// istiod's own view: the pod's proxy connected as a router (pilot-agent's
	// `proxy router`), authenticated by the pod's token
	// (pilot/pkg/xds/auth.go), and what it sent and the gateway ACKed.
	id := pod.Name + "." + realnode.Namespace
	waitFor(t, ctx, "istiod to serve "+id+" as a router", func() error {
		proxies, err := istiodSyncz(ctx, c)
		if err != nil {
			return err
		}
		for _, p := range proxies {
			if p.ProxyID == id {
				if p.ProxyType != "router" || p.ListenerAcked == "" || p.ClusterAcked == "" {
					return fmt.Errorf("istiod's /debug/syncz: %+v, want a router with listeners and clusters ACKed", p)
				}
				t.Logf("istiod's /debug/syncz: %+v", p)
				return nil
			}
		}
		return fmt.Errorf("%s not among istiod's %d proxies", id, len(proxies))
	})
}

// istiodProxy is one entry of istiod's /debug/syncz
// (pilot/pkg/xds/debug.go SyncStatus).
type istiodProxy struct {
	ProxyID       string `json:"proxy"`
	ProxyType     string `json:"proxy_type"`
	ClusterAcked  string `json:"cluster_acked"`
	ListenerAcked string `json:"listener_acked"`
	RouteAcked    string `json:"route_acked"`
}

// istiodSyncz returns the proxies connected to the node's istiod.
func istiodSyncz(ctx context.Context, c *cluster.Cluster) ([]istiodProxy, error) {
	body, err := istiod.DebugGet(ctx, c.Istiod.HTTPAddr, "/debug/syncz")
	if err != nil {
		return nil, err
	}
	var v []istiodProxy
	if err := json.Unmarshal(body, &v); err != nil {
		return nil, fmt.Errorf("istiod /debug/syncz: %w", err)
	}
	return v, nil
}

// ingressRolloutRestart sends GET /productpage to istio-ingressgateway's
// Service from sleep's network namespace, a new connection every 50 ms,
// while `kubectl rollout restart` replaces the gateway's pod: every request
// must be answered 200 — by the old pod until it has drained, by the new
// one once it is Ready.
func ingressRolloutRestart(t *testing.T, ctx context.Context, c *cluster.Cluster) {
	tg := realnode.HostTarget(c)
	svc, err := c.Client.CoreV1().Services(realnode.Namespace).Get(ctx, realnode.IngressGateway, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	target := net.JoinHostPort(svc.Spec.ClusterIP, "80")
	sleepNS, err := realnode.PodNetns(ctx, c, podOf(t, ctx, tg, "default", realnode.Sleep))
	if err != nil {
		t.Fatal(err)
	}
	before, err := tg.RunningPodOf(ctx, realnode.Namespace, realnode.IngressSelector)
	if err != nil {
		t.Fatal(err)
	}

	// A new connection per request, as curl makes: each one is routed
	// afresh (sleep's ztunnel picks a gateway endpoint per connection).
	loadCtx, stop := context.WithCancel(ctx)
	defer stop()
	l := realnode.StartLoad(loadCtx, 20, func(ctx context.Context) error {
		cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		conn, err := realnode.DialFrom(cctx, sleepNS, target)
		if err != nil {
			return err
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(30 * time.Second))
		return getPage(conn, realnode.IngressGateway+"."+realnode.Namespace, "/productpage")
	})
	progress := func(what string, n int) {
		s, _ := l.Answered()
		testutil.Eventually(t, what, func() bool { ok, _ := l.Answered(); return ok >= s+n })
	}
	progress("requests through the gateway before the restart", 20)
	t0 := time.Now()
	if _, err := c.Kubectl(ctx, "-n", realnode.Namespace, "rollout", "restart", "deployment/"+realnode.IngressGateway); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Kubectl(ctx, "-n", realnode.Namespace, "rollout", "status", "deployment/"+realnode.IngressGateway, "--timeout=180s"); err != nil {
		t.Fatal(err)
	}
	t.Logf("measure: gateway rollout restart done in %v", time.Since(t0).Round(time.Millisecond))
	after, err := tg.RunningPodOf(ctx, realnode.Namespace, realnode.IngressSelector)
	if err != nil {
		t.Fatal(err)
	}
	if after.UID == before.UID {
		t.Errorf("pod %s still the gateway after the restart", before.Name)
	}
	// The old pod is gone from the Service's endpoints once the rollout
	// is done; what follows is the new pod's alone.
	progress("requests through the new gateway", 20)
	stop()
	l.Wait()
	t.Logf("requests during the restart: %d answered 200, %d failed (%d sent late)", l.OK, l.Failed, l.Late)
	if l.Failed != 0 {
		t.Errorf("%d requests through the gateway failed across its rollout restart: %q", l.Failed, l.Errors)
	}
}

// getPage sends one HTTP/1.1 GET for path with Host host on conn (which
// stays open for the next) and reads the full response, which must be 200.
func getPage(conn net.Conn, host, path string) error {
	if _, err := io.WriteString(conn, "GET "+path+" HTTP/1.1\r\nHost: "+host+"\r\n\r\n"); err != nil {
		return err
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("status %s", resp.Status)
	}
	return nil
}
