package cluster_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/amber-mesh/amber/test/cluster"
	"github.com/amber-mesh/amber/test/istiod"
)

// TestPrivilegedClusterIstiod: the node's istiod is installed as users
// install it. istioctl, built from istiod's module, runs against the node;
// `istioctl waypoint apply --enroll-namespace` creates the Gateway of
// class istio-waypoint and labels the namespace; istiod's deployment
// controller renders the waypoint's ServiceAccount, Deployment and Service
// from the waypoint template of the chart-rendered injector ConfigMap,
// with the chart's ambient mesh configuration in it. Nothing here makes
// the waypoint run (its image is Istio's proxy, which this machine cannot
// pull): the pod waits for its image.
func TestPrivilegedClusterIstiod(t *testing.T) {
	c := cluster.Up(t, cluster.Options{Istiod: true})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	for _, name := range []string{istiod.MeshConfigMap, istiod.InjectorConfigMap} {
		cm, err := c.Client.CoreV1().ConfigMaps(istiod.Namespace).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatalf("the chart's ConfigMap: %v", err)
		}
		if cm.Labels["helm.sh/chart"] == "" || cm.Labels["release"] != istiod.ChartRelease {
			t.Errorf("%s/%s is not the chart's rendering: labels %v", istiod.Namespace, name, cm.Labels)
		}
	}

	// istiod creates its built-in GatewayClasses once the Gateway API CRDs
	// are there.
	for {
		out, err := c.Kubectl(ctx, "get", "gatewayclass", "istio-waypoint", "-o", "jsonpath={.spec.controllerName}")
		if err == nil && string(out) == "istio.io/mesh-controller" {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("GatewayClass istio-waypoint: %v %q", err, out)
		case <-time.After(200 * time.Millisecond):
		}
	}

	const ns = "default"
	out, err := c.Istioctl(ctx, "waypoint", "generate", "-n", ns)
	if err != nil {
		t.Fatal(err)
	}
	var gw struct {
		Kind     string `json:"kind"`
		Metadata struct{ Name, Namespace string }
		Spec     struct {
			GatewayClassName string `json:"gatewayClassName"`
			Listeners        []struct {
				Name     string `json:"name"`
				Port     int    `json:"port"`
				Protocol string `json:"protocol"`
			} `json:"listeners"`
		}
	}
	if err := yaml.Unmarshal(out, &gw); err != nil {
		t.Fatalf("istioctl waypoint generate: %v\n%s", err, out)
	}
	if gw.Kind != "Gateway" || gw.Metadata.Name != "waypoint" || gw.Spec.GatewayClassName != "istio-waypoint" ||
		len(gw.Spec.Listeners) != 1 || gw.Spec.Listeners[0].Port != 15008 || gw.Spec.Listeners[0].Protocol != "HBONE" {
		t.Errorf("istioctl waypoint generate:\n%s", out)
	}

	// --wait would wait for Programmed, which needs a ready waypoint pod.
	out, err = c.Istioctl(ctx, "waypoint", "apply", "-n", ns, "--enroll-namespace")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("istioctl waypoint apply -n %s --enroll-namespace:\n%s", ns, out)
	n, err := c.Client.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if n.Labels["istio.io/use-waypoint"] != "waypoint" {
		t.Errorf("namespace %s labels %v, want istio.io/use-waypoint=waypoint", ns, n.Labels)
	}
	if _, err := c.Kubectl(ctx, "-n", ns, "get", "gateway.gateway.networking.k8s.io", "waypoint"); err != nil {
		t.Errorf("no Gateway after istioctl waypoint apply: %v", err)
	}

	d := waitWaypoint(t, ctx, c, ns, "waypoint")
	out, _ = c.Kubectl(ctx, "-n", ns, "get", "deployment", "waypoint", "-o", "yaml", "--show-managed-fields=false")
	t.Logf("the Deployment istiod rendered:\n%s", out)
	if err := istiod.CheckWaypointDeployment(d); err != nil {
		t.Fatal(err)
	}
	proxy := d.Spec.Template.Spec.Containers[0]
	// Istio's proxy image from the chart's values (hub, proxyv2) and the
	// ambient mesh configuration's image type.
	if !strings.Contains(proxy.Image, "/proxyv2:") || !strings.HasSuffix(proxy.Image, "-distroless") {
		t.Errorf("image %q, want the chart's proxyv2, distroless", proxy.Image)
	}
	if !slices.Equal(proxy.Args[:2], []string{"proxy", "waypoint"}) || len(proxy.Command) != 0 {
		t.Errorf("command %q args %q, want the template's `proxy waypoint …`", proxy.Command, proxy.Args)
	}
}

// waitWaypoint waits for istiod to render the waypoint name in ns and
// returns its Deployment, after checking its ServiceAccount and Service.
func waitWaypoint(t *testing.T, ctx context.Context, c *cluster.Cluster, ns, name string) *appsv1.Deployment {
	t.Helper()
	var d *appsv1.Deployment
	var last error
	for {
		d, last = c.Client.AppsV1().Deployments(ns).Get(ctx, name, metav1.GetOptions{})
		if last == nil {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("istiod rendered no Deployment %s/%s: %v (last: %v)", ns, name, ctx.Err(), last)
		case <-time.After(200 * time.Millisecond):
		}
	}
	if _, err := c.Client.CoreV1().ServiceAccounts(ns).Get(ctx, name, metav1.GetOptions{}); err != nil {
		t.Errorf("waypoint ServiceAccount: %v", err)
	}
	svc, err := c.Client.CoreV1().Services(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("waypoint Service: %v", err)
	}
	var ports []string
	for _, p := range svc.Spec.Ports {
		ports = append(ports, fmt.Sprintf("%s/%d/%s", p.Name, p.Port, ptrOr(p.AppProtocol)))
	}
	if !slices.Contains(ports, "mesh/15008/hbone") || !slices.Contains(ports, "status-port/15021/tcp") {
		t.Errorf("waypoint Service ports %v, want mesh 15008 (hbone) and status-port 15021", ports)
	}
	if svc.Spec.Selector["gateway.networking.k8s.io/gateway-name"] != name {
		t.Errorf("waypoint Service selector %v", svc.Spec.Selector)
	}
	return d
}

func ptrOr(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}
