package istiod_test

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/test/istiod"
	"github.com/amber-mesh/amber/test/kube"
	"github.com/amber-mesh/amber/test/meshbed"
	"github.com/amber-mesh/amber/waypoint"
	"github.com/amber-mesh/amber/waypoint/contract"
	"github.com/amber-mesh/amber/waypoint/node"
)

// TestIntegrationWaypointTemplate: istiod's own deployment controller
// renders the waypoint's Deployment from the pinned chart's waypoint
// template (injector ConfigMap rendered by Helm); the test plays the
// kubelet for one pod of it (environment, downward-API files, projected
// token and roots), and amber-waypoint's contract reads exactly that:
// nothing refused, and Run with it connects to istiod as the waypoint
// node and becomes ready.
func TestIntegrationWaypointTemplate(t *testing.T) {
	bin := istiod.Binaries(t)
	cp := kube.Start(t, kube.Options{})
	d := istiod.Start(t, cp, istiod.Options{BinDir: bin, GatewayAPI: true, Injector: true})
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	_, err := cp.Client.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: nodeName}}, metav1.CreateOptions{})
	must(t, err)
	applyYAML(t, ctx, cp, "gateway", gatewayYAML)

	var dep *appsv1.Deployment
	testutil.EventuallyNil(t, "istiod's waypoint Deployment", func() error {
		var err error
		dep, err = cp.Client.AppsV1().Deployments(meshNS).Get(ctx, waypointName, metav1.GetOptions{})
		return err
	})
	checkTemplate(t, dep)

	// One pod of it, as the ReplicaSet controller and the kubelet would
	// make it.
	tmpl := dep.Spec.Template
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: waypointName + "-5d8f7c9b4-k2x9q", Namespace: meshNS,
			Labels: mergeMaps(tmpl.Labels, map[string]string{"pod-template-hash": "5d8f7c9b4"}), Annotations: tmpl.Annotations,
		},
		Spec: *tmpl.Spec.DeepCopy(),
	}
	pod.Spec.NodeName = nodeName
	pod = runningPod(t, ctx, cp, pod, waypointIP)
	root := t.TempDir()
	token, err := d.TokenFor(ctx, meshNS, pod.Spec.ServiceAccountName, pod)
	must(t, err)
	writeFile(t, root, contract.TokenFile, token)
	writeFile(t, root, contract.RootCertFile, string(d.RootPEM))
	writeFile(t, root, contract.LabelsFile, meshbed.DownwardAPI(pod.Labels))
	writeFile(t, root, contract.AnnotationsFile, meshbed.DownwardAPI(pod.Annotations))
	ctr := pod.Spec.Containers[0]
	env := containerEnv(t, pod, ctr)
	args := expand(ctr.Args, env)

	c, err := contract.Load(args, env, root)
	if err != nil {
		t.Fatalf("contract of the rendered template: %v\nargs %q", err, args)
	}
	must(t, c.Validate())
	n := c.Config.Node
	want := node.Node{
		IP: n.IP, PodName: pod.Name, Namespace: meshNS, ServiceAccount: waypointName, NodeName: nodeName,
		ClusterID: "Kubernetes", TrustDomain: "cluster.local", WorkloadName: waypointName,
	}
	if n.IP.String() != waypointIP || n.PodName != want.PodName || n.Namespace != want.Namespace || n.ServiceAccount != want.ServiceAccount ||
		n.NodeName != want.NodeName || n.ClusterID != want.ClusterID || n.TrustDomain != want.TrustDomain || n.WorkloadName != want.WorkloadName {
		t.Errorf("node from the template %+v, want %+v", n, want)
	}
	if n.Labels[node.GatewayNameLabel] != waypointName || n.Labels["pod-template-hash"] != "" || n.Annotations["prometheus.io/port"] != "15020" {
		t.Errorf("labels %v annotations %v", n.Labels, n.Annotations)
	}
	if c.Config.ServiceCluster != waypointName+"."+meshNS || c.Config.XDSAddress != "istiod.istio-system.svc:15012" || c.Config.CAAddress != "istiod.istio-system.svc:15012" {
		t.Errorf("config %+v", c.Config)
	}
	for _, want := range []string{"flag --proxyLogLevel=", "flag --proxyComponentLogLevel="} {
		if !slices.ContainsFunc(c.Ignored, func(s string) bool { return strings.HasPrefix(s, want) }) {
			t.Errorf("%s not reported as ignored: %q", want, c.Ignored)
		}
	}
	t.Logf("ignored: %q", c.Ignored)

	// Run with it. Only the addresses change: istiod.istio-system.svc is
	// this test's istiod on loopback.
	cfg := c.Config
	cfg.XDSAddress, cfg.CAAddress, cfg.ServerName = d.Address, d.Address, d.ServerName
	w := startWaypoint(t, ctx, cfg)
	if code, body, err := httpGet(ctx, w.readyURL); err != nil || code != http.StatusOK {
		t.Errorf("/healthz/ready: %d %s %v", code, body, err)
	}
	_, body, err := httpGet(ctx, w.adminURL+"/config_dump?mask=bootstrap")
	must(t, err)
	if id := fmt.Sprintf(`"id": "waypoint~%s~%s.%s~%s.svc.cluster.local"`, waypointIP, pod.Name, meshNS, meshNS); !strings.Contains(string(body), id) {
		t.Errorf("bootstrap node is not %s:\n%.1000s", id, body)
	}
}

// checkTemplate checks the rendered Deployment against what
// amber-waypoint serves and needs: ports, probes, no privileges.
func checkTemplate(t *testing.T, dep *appsv1.Deployment) {
	t.Helper()
	spec := dep.Spec.Template.Spec
	if len(spec.Containers) != 1 || spec.Containers[0].Name != "istio-proxy" {
		t.Fatalf("containers %v", spec.Containers)
	}
	ctr := spec.Containers[0]
	for _, p := range []*corev1.Probe{ctr.ReadinessProbe, ctr.StartupProbe} {
		if p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/healthz/ready" || p.HTTPGet.Port.IntValue() != 15021 {
			t.Errorf("probe %+v, amber-waypoint serves /healthz/ready on %s", p, waypoint.DefaultReadinessAddr)
		}
	}
	ann := dep.Spec.Template.Annotations
	if ann["prometheus.io/port"] != "15020" || ann["prometheus.io/path"] != "/stats/prometheus" {
		t.Errorf("prometheus annotations %v, amber-waypoint serves %s /stats/prometheus", ann, waypoint.DefaultMetricsAddr)
	}
	sc := ctr.SecurityContext
	if sc == nil || sc.RunAsUser == nil || *sc.RunAsUser != 1337 || sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") || len(sc.Capabilities.Add) != 0 ||
		sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Errorf("security context %+v", sc)
	}
	if ctr.Args[0] != "proxy" || ctr.Args[1] != "waypoint" {
		t.Errorf("args %q", ctr.Args)
	}
}

func mergeMaps(a, b map[string]string) map[string]string {
	out := map[string]string{}
	for k, v := range a {
		out[k] = v
	}
	for k, v := range b {
		out[k] = v
	}
	return out
}

func writeFile(t *testing.T, root, path, content string) {
	t.Helper()
	p := filepath.Join(root, path)
	must(t, os.MkdirAll(filepath.Dir(p), 0o755))
	must(t, os.WriteFile(p, []byte(content), 0o600))
}

// containerEnv resolves the container's environment as the kubelet does
// for this pod: values with $(VAR) expanded from earlier entries, field
// references from the pod, resource references from its limits (none
// set: the node's, here 2 CPUs and 4 GiB).
func containerEnv(t *testing.T, pod *corev1.Pod, ctr corev1.Container) []string {
	t.Helper()
	var env []string
	for _, e := range ctr.Env {
		v := expand([]string{e.Value}, env)[0]
		switch {
		case e.ValueFrom == nil:
		case e.ValueFrom.FieldRef != nil:
			switch p := e.ValueFrom.FieldRef.FieldPath; p {
			case "metadata.name":
				v = pod.Name
			case "metadata.namespace":
				v = pod.Namespace
			case "spec.serviceAccountName":
				v = pod.Spec.ServiceAccountName
			case "spec.nodeName":
				v = pod.Spec.NodeName
			case "status.podIP":
				v = pod.Status.PodIP
			case "status.hostIP":
				v = pod.Status.HostIP
			default:
				t.Fatalf("env %s: field %s", e.Name, p)
			}
		case e.ValueFrom.ResourceFieldRef != nil:
			switch r := e.ValueFrom.ResourceFieldRef.Resource; r {
			case "limits.cpu":
				v = "2"
			case "limits.memory":
				v = strconv.Itoa(4 << 30)
			default:
				t.Fatalf("env %s: resource %s", e.Name, r)
			}
		default:
			t.Fatalf("env %s: %+v", e.Name, e.ValueFrom)
		}
		env = append(env, e.Name+"="+v)
	}
	return env
}

var varRef = regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)

// expand replaces $(VAR) with VAR's value from env, as Kubernetes does in
// args and env values; an unknown reference stays as written.
func expand(in, env []string) []string {
	vals := map[string]string{}
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		vals[k] = v
	}
	out := make([]string, len(in))
	for i, s := range in {
		out[i] = varRef.ReplaceAllStringFunc(s, func(ref string) string {
			if v, ok := vals[ref[2:len(ref)-1]]; ok {
				return v
			}
			return ref
		})
	}
	return out
}
