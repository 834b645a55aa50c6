package istiod

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// istiod as users install it reads two ConfigMaps its Helm chart
// (istio-discovery) renders into its namespace:
//
//   - MeshConfigMap: the mesh configuration (key "mesh") and mesh networks
//     ("meshNetworks"). istiod reads them from the API server when no file
//     overrides them (pilot/pkg/bootstrap/mesh.go getConfigurationSources).
//   - InjectorConfigMap: the injection templates (key "config": sidecar,
//     gateway, waypoint, kube-gateway, ...) and the chart values they are
//     rendered with ("values"). istiod looks for it once at start, when
//     ./var/lib/istio/inject/config does not exist, and watches it from
//     then on (pilot/pkg/bootstrap/sidecarinjector.go
//     initSidecarInjector): created later, it is never read. Its
//     deployment controller renders the Deployment, Service and
//     ServiceAccount of every Gateway it manages (a waypoint: template
//     "waypoint") from it; without it, it deploys nothing.
const (
	MeshConfigMap     = "istio"
	InjectorConfigMap = "istio-sidecar-injector"
	// ChartDir is istiod's chart (manifests/charts/istio-control/
	// istio-discovery of the pinned istio.io/istio module) in Binaries'
	// directory.
	ChartDir = "istio-discovery"
	// ChartRelease is the Helm release name Istio's install instructions
	// use for the chart.
	ChartRelease = "istiod"
)

// ChartValues are the values Istio's ambient install sets on istiod's
// chart (`helm install istiod istio/istiod -n istio-system --set
// profile=ambient`): PILOT_ENABLE_AMBIENT, and in the mesh configuration
// ISTIO_META_ENABLE_HBONE for every proxy (waypoints included).
var ChartValues = []string{"profile=ambient"}

// RenderConfigMaps renders istiod's chart (the directory chart) with the
// helm binary — `helm template istiod CHART -n istio-system --set V...`
// for each of values — and returns MeshConfigMap and InjectorConfigMap as
// the chart renders them, in that order.
func RenderConfigMaps(ctx context.Context, helm, chart string, values ...string) ([]corev1.ConfigMap, error) {
	args := []string{"template", ChartRelease, chart, "--namespace", Namespace,
		"--show-only", "templates/configmap.yaml", "--show-only", "templates/istiod-injector-configmap.yaml"}
	for _, v := range values {
		args = append(args, "--set", v)
	}
	cmd := exec.CommandContext(ctx, helm, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("render istiod's chart: helm %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(stderr.Bytes()))
	}
	byName := map[string]corev1.ConfigMap{}
	for _, doc := range strings.Split(string(out), "\n---") {
		if strings.TrimSpace(strings.TrimPrefix(doc, "---")) == "" {
			continue
		}
		var cm corev1.ConfigMap
		if err := yaml.UnmarshalStrict([]byte(doc), &cm); err != nil {
			return nil, fmt.Errorf("render istiod's chart: %w", err)
		}
		if cm.Kind != "ConfigMap" {
			return nil, fmt.Errorf("render istiod's chart: a %s where ConfigMaps were asked for", cm.Kind)
		}
		byName[cm.Name] = cm
	}
	var cms []corev1.ConfigMap
	for _, n := range []struct{ name, key string }{{MeshConfigMap, "mesh"}, {InjectorConfigMap, "config"}} {
		cm, ok := byName[n.name]
		if !ok || cm.Data[n.key] == "" {
			return nil, fmt.Errorf("render istiod's chart %s: no ConfigMap %s with %q (got %d ConfigMaps)", chart, n.name, n.key, len(byName))
		}
		cms = append(cms, cm)
	}
	return cms, nil
}
