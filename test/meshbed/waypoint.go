package meshbed

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/amber-mesh/amber/test/testbed"
	"github.com/amber-mesh/amber/waypoint/contract"
)

// BuildWaypoint builds cmd/amber-waypoint into dir, statically linked: it
// runs in a root directory of its own (StartWaypoint).
func BuildWaypoint(dir string) (string, error) {
	return build(dir, "amber-waypoint", []string{"CGO_ENABLED=0"})
}

// The address istiod's waypoint template gives the container for istiod
// (CA_ADDR, ProxyConfig discoveryAddress).
const (
	istiodService = "istiod.istio-system.svc"
	istiodPort    = "15012"
)

// WaypointPod is a waypoint pod as istiod's waypoint template makes it,
// on a testbed pod: what the kubelet gives its istio-proxy container.
type WaypointPod struct {
	// Pod is the testbed pod the waypoint runs in (its network namespace).
	Pod *testbed.Pod
	// Name, Namespace and ServiceAccount are the Pod object's; NodeName
	// its spec.nodeName; Gateway the Gateway (and Deployment) it belongs to.
	Name, Namespace, ServiceAccount, NodeName, Gateway string
	// Labels and Annotations are the Pod object's, for the downward-API
	// files.
	Labels, Annotations map[string]string
	// Token is the pod's projected service-account token (audience
	// istio-ca); RootPEM the mesh roots (the istio-ca-root-cert ConfigMap).
	Token, RootPEM []byte
	// Istiod is istiod's TLS xDS and CA address (15012) in the test
	// process's namespace. The pod reaches it as istiod.istio-system.svc
	// through a Forwarder on its own loopback.
	Istiod string
	// Router runs the container as Istio's legacy ingress gateway chart
	// (manifests/charts/gateways/istio-ingress) does: `proxy router`, its
	// environment, and the mesh config mounted at contract.MeshConfigFile
	// instead of PROXY_CONFIG.
	Router bool
	// KubeGateway, with Router, runs it as istiod's kube-gateway template
	// (a Gateway API Gateway of class istio) does instead: the args' `--x
	// v` form, PROXY_CONFIG, no mounted mesh config, not unprivileged
	// (the template's sysctl lets it bind ports below 1024).
	KubeGateway bool
}

// Waypoint is an amber-waypoint process in a pod's namespace, run as
// istiod's waypoint template runs the istio-proxy container.
type Waypoint struct {
	Pod *testbed.Pod
	*Process
	// Forwarder relays istiod.istio-system.svc:15012 inside the pod to
	// istiod; SetTarget("") takes istiod away from the waypoint.
	Forwarder *Forwarder
	root      string
}

// StartWaypoint runs bin (BuildWaypoint) in wp.Pod's network namespace
// and in a root directory of its own holding what the template mounts at
// its paths (contract.TokenFile, RootCertFile, LabelsFile,
// AnnotationsFile) and an /etc/hosts
// resolving istiod's Service to the pod's forwarder, with the template's
// arguments and environment; it logs to log and waits until
// /healthz/ready, which needs istiod's configuration and certificate.
// Nothing is written outside that directory, which Stop and Kill do not
// remove: Close does.
func StartWaypoint(bin string, wp WaypointPod, log io.Writer) (*Waypoint, error) {
	root, err := os.MkdirTemp("", "amber-waypoint-root-")
	if err != nil {
		return nil, err
	}
	w := &Waypoint{Pod: wp.Pod, root: root}
	if err := w.prepare(bin, wp); err != nil {
		return nil, errors.Join(err, w.Close())
	}
	if w.Forwarder, err = Forward(wp.Pod, "127.0.0.1:"+istiodPort, wp.Istiod); err != nil {
		return nil, errors.Join(err, w.Close())
	}
	cmd := wp.Pod.Command(context.Background(), "nsenter", append([]string{"--root=" + root, "--wd=/", "--", "/amber-waypoint"}, waypointArgs(wp)...)...)
	cmd.Env = waypointEnv(wp)
	if w.Process, err = StartProcess("waypoint "+wp.Name, cmd, log, wp.Pod.IPv4, wp.Pod.Dial, istiodReadyTimeout); err != nil {
		return nil, errors.Join(err, w.Close())
	}
	return w, nil
}

// prepare fills the waypoint's root directory.
func (w *Waypoint) prepare(bin string, wp WaypointPod) error {
	exe, err := os.ReadFile(bin)
	if err != nil {
		return err
	}
	type file struct {
		b    []byte
		mode os.FileMode
	}
	files := map[string]file{
		"/amber-waypoint":        {exe, 0o755},
		contract.TokenFile:       {wp.Token, 0o600},
		contract.RootCertFile:    {wp.RootPEM, 0o644},
		contract.LabelsFile:      {[]byte(DownwardAPI(wp.Labels)), 0o644},
		contract.AnnotationsFile: {[]byte(DownwardAPI(wp.Annotations)), 0o644},
		"/etc/hosts":             {[]byte("127.0.0.1 localhost\n127.0.0.1 " + istiodService + "\n"), 0o644},
		"/etc/nsswitch.conf":     {[]byte("hosts: files dns\n"), 0o644},
		"/tmp/.keep":             {nil, 0o644},
	}
	if wp.Router && !wp.KubeGateway {
		files[contract.MeshConfigFile] = file{[]byte(routerMeshConfig()), 0o644}
	}
	for path, content := range files {
		p := filepath.Join(w.root, path)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(p, content.b, content.mode); err != nil {
			return err
		}
	}
	return nil
}

// Close stops the forwarder and removes the waypoint's root directory;
// the process must have ended (Stop, Kill).
func (w *Waypoint) Close() error {
	var errs []error
	if w.Forwarder != nil {
		errs = append(errs, w.Forwarder.Close())
	}
	return errors.Join(append(errs, os.RemoveAll(w.root))...)
}

// waypointArgs are the template's container args with its default values
// (proxyLogLevel, componentLogLevel and the agent's log level from
// values.yaml), with global.logAsJson set.
func waypointArgs(wp WaypointPod) []string {
	if wp.Router && wp.KubeGateway {
		return []string{
			"proxy", "router", "--domain", wp.Namespace + ".svc.cluster.local",
			"--proxyLogLevel", "warning", "--proxyComponentLogLevel", "misc:error", "--log_output_level", "default:info",
			"--log_as_json",
		}
	}
	if wp.Router {
		// The legacy gateway chart's, its `--x=v` forms.
		return []string{
			"proxy", "router", "--domain", wp.Namespace + ".svc.cluster.local",
			"--proxyLogLevel=warning", "--proxyComponentLogLevel=misc:error", "--log_output_level=default:info",
			"--log_as_json",
		}
	}
	return []string{
		"proxy", "waypoint",
		"--domain", wp.Namespace + ".svc.cluster.local",
		"--serviceCluster", wp.ServiceAccount + "." + wp.Namespace,
		"--proxyLogLevel", "warning",
		"--proxyComponentLogLevel", "misc:error",
		"--log_output_level", "default:info",
		"--log_as_json",
	}
}

// waypointEnv is the template's container environment as the kubelet
// resolves it for the pod (field references; resource references from the
// node, which has the machine's processors and no memory limit).
func waypointEnv(wp WaypointPod) []string {
	if wp.Router && !wp.KubeGateway {
		return routerEnv(wp)
	}
	proxyConfig, _ := json.Marshal(map[string]any{
		"discoveryAddress":         istiodService + ":" + istiodPort,
		"proxyAdminPort":           15000,
		"statusPort":               15020,
		"terminationDrainDuration": "5s",
	})
	return []string{
		"ISTIO_META_SERVICE_ACCOUNT=" + wp.ServiceAccount,
		"ISTIO_META_NODE_NAME=" + wp.NodeName,
		"PILOT_CERT_PROVIDER=istiod",
		"CA_ADDR=" + istiodService + ":" + istiodPort,
		"POD_NAME=" + wp.Name,
		"POD_NAMESPACE=" + wp.Namespace,
		"INSTANCE_IP=" + wp.Pod.IPv4.String(),
		"SERVICE_ACCOUNT=" + wp.ServiceAccount,
		"HOST_IP=" + wp.Pod.Node.IPv4.String(),
		"PROXY_CONFIG=" + string(proxyConfig),
		"ISTIO_META_CLUSTER_ID=Kubernetes",
		"ISTIO_META_INTERCEPTION_MODE=REDIRECT",
		"ISTIO_META_WORKLOAD_NAME=" + wp.Gateway,
		"ISTIO_META_OWNER=kubernetes://apis/apps/v1/namespaces/" + wp.Namespace + "/deployments/" + wp.Gateway,
		"ISTIO_META_MESH_ID=cluster.local",
		"TRUST_DOMAIN=cluster.local",
	}
}

// routerEnv is the legacy gateway chart's container environment
// (templates/deployment.yaml) with its default values.
func routerEnv(wp WaypointPod) []string {
	return []string{
		"PILOT_CERT_PROVIDER=istiod",
		"CA_ADDR=" + istiodService + ":" + istiodPort,
		"NODE_NAME=" + wp.NodeName,
		"POD_NAME=" + wp.Name,
		"POD_NAMESPACE=" + wp.Namespace,
		"INSTANCE_IP=" + wp.Pod.IPv4.String(),
		"HOST_IP=" + wp.Pod.Node.IPv4.String(),
		"ISTIO_CPU_LIMIT=0",
		"SERVICE_ACCOUNT=" + wp.ServiceAccount,
		"ISTIO_META_WORKLOAD_NAME=" + wp.Gateway,
		"ISTIO_META_OWNER=kubernetes://apis/apps/v1/namespaces/" + wp.Namespace + "/deployments/" + wp.Gateway,
		"ISTIO_META_UNPRIVILEGED_POD=true",
		"ISTIO_META_CLUSTER_ID=Kubernetes",
		"ISTIO_META_NODE_NAME=" + wp.NodeName,
	}
}

// routerMeshConfig is the istio ConfigMap's mesh key the legacy chart
// mounts: the discovery address and the trust domain.
func routerMeshConfig() string {
	return "defaultConfig:\n  discoveryAddress: " + istiodService + ":" + istiodPort + "\n  terminationDrainDuration: 5s\ntrustDomain: cluster.local\n"
}

// DownwardAPI renders labels or annotations as the kubelet writes a
// downward-API file: key="Go-quoted value", sorted by key.
func DownwardAPI(m map[string]string) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for i, k := range keys {
		if i > 0 {
			b.WriteString("\n")
		}
		fmt.Fprintf(&b, "%s=%s", k, strconv.Quote(m[k]))
	}
	return b.String()
}
