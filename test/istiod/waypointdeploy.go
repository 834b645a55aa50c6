package istiod

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
)

// Waypoint pods as istiod's deployment controller renders them from the
// chart's waypoint template (manifests/charts/istio-control/
// istio-discovery/files/waypoint.yaml), whatever image runs in them.
const (
	// WaypointContainer is the waypoint pod's only container; amber's
	// chart swaps its image and command (GatewayClass defaults).
	WaypointContainer = "istio-proxy"
	// WaypointUID is the user (and group) the container runs as.
	WaypointUID = 1337
)

// WaypointWritable are the paths of the emptyDir volumes the template
// mounts into the waypoint container, by volume name: with a read-only
// root file system, the only places a waypoint process may write (the
// token, root certificate and pod information mounts are read-only).
var WaypointWritable = map[string]string{
	"workload-socket": "/var/run/secrets/workload-spiffe-uds",
	"istio-data":      "/var/lib/istio/data",
	"istio-envoy":     "/etc/istio/proxy",
}

// waypointReadOnly are the template's other mounts.
var waypointReadOnly = map[string]string{
	"istio-token":    "/var/run/secrets/tokens",
	"istiod-ca-cert": "/var/run/secrets/istio",
	"istio-podinfo":  "/etc/istio/pod",
}

// CheckWaypointDeployment returns what in d differs from what istiod's
// waypoint template renders for an ambient install (ChartValues): labels
// and Prometheus annotations, the istio-proxy container with istiod's
// address, the ambient mesh configuration's proxy metadata, UID 1337, a
// read-only root file system, no capabilities, its volumes and its
// readiness probe. It checks neither the image nor the command.
func CheckWaypointDeployment(d *appsv1.Deployment) error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if d.Labels["gateway.istio.io/managed"] != "istio.io-mesh-controller" {
		bad("Deployment labels %v: not istiod's mesh controller's", d.Labels)
	}
	pod := d.Spec.Template
	if pod.Labels["istio.io/dataplane-mode"] != "none" || pod.Annotations["prometheus.io/port"] != "15020" {
		bad("pod labels %v, annotations %v", pod.Labels, pod.Annotations)
	}
	if len(pod.Spec.Containers) != 1 || pod.Spec.Containers[0].Name != WaypointContainer {
		bad("containers %v, want only %s", pod.Spec.Containers, WaypointContainer)
		return errors.Join(errs...)
	}
	c := pod.Spec.Containers[0]
	env := map[string]string{}
	for _, e := range c.Env {
		env[e.Name] = e.Value
	}
	// From the chart's mesh configuration (the ambient profile).
	if env["ISTIO_META_ENABLE_HBONE"] != "true" {
		bad("env ISTIO_META_ENABLE_HBONE=%q, want the ambient profile's true", env["ISTIO_META_ENABLE_HBONE"])
	}
	if env["CA_ADDR"] != ServerName+":15012" || env["TRUST_DOMAIN"] != "cluster.local" {
		bad("env CA_ADDR=%q TRUST_DOMAIN=%q", env["CA_ADDR"], env["TRUST_DOMAIN"])
	}
	// The mesh configuration's defaultConfig, as far as it differs from
	// Istio's defaults.
	var pc struct {
		ProxyMetadata map[string]string `json:"proxyMetadata"`
	}
	if err := json.Unmarshal([]byte(env["PROXY_CONFIG"]), &pc); err != nil || pc.ProxyMetadata["ISTIO_META_ENABLE_HBONE"] != "true" {
		bad("env PROXY_CONFIG %q (%v), want the ambient profile's proxy metadata", env["PROXY_CONFIG"], err)
	}
	if !slices.Contains(c.Args, "waypoint") || !slices.Contains(c.Args, "--serviceCluster") {
		bad("args %q, want the template's `proxy waypoint --domain … --serviceCluster …`", c.Args)
	}
	sc := c.SecurityContext
	if sc == nil || sc.RunAsUser == nil || *sc.RunAsUser != WaypointUID || sc.RunAsGroup == nil || *sc.RunAsGroup != WaypointUID ||
		sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot ||
		sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation ||
		sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) != 0 {
		bad("securityContext %+v, want UID/GID %d, read-only root, no capabilities", sc, WaypointUID)
	}
	mounts := map[string]string{}
	for _, m := range c.VolumeMounts {
		mounts[m.Name] = m.MountPath
	}
	emptyDirs := map[string]bool{}
	for _, v := range pod.Spec.Volumes {
		emptyDirs[v.Name] = v.EmptyDir != nil
	}
	for name, path := range WaypointWritable {
		if mounts[name] != path || !emptyDirs[name] {
			bad("emptyDir %s mounted at %q, want %s", name, mounts[name], path)
		}
	}
	for name, path := range waypointReadOnly {
		if mounts[name] != path {
			bad("volume %s mounted at %q, want %s", name, mounts[name], path)
		}
	}
	if p := c.ReadinessProbe; p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/healthz/ready" || p.HTTPGet.Port.IntValue() != 15021 {
		bad("readiness probe %+v, want GET :15021/healthz/ready", c.ReadinessProbe)
	}
	return errors.Join(errs...)
}
