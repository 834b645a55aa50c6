package deploy_test

import (
	"bytes"
	"os"
	"os/exec"
	"reflect"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/strategicpatch"
	"sigs.k8s.io/yaml"
)

// Keys istiod accepts in a ConfigMap of GatewayClass defaults; any other
// key makes it render no waypoint at all
// (pilot/pkg/config/kube/gatewaycommon/deploymentcontroller.go
// supportedOverlays).
var istiodOverlayKeys = []string{"deployment", "service", "serviceAccount", "horizontalPodAutoscaler", "podDisruptionBudget"}

// TestHelmWaypointDefaults: the chart installs, by default, the ConfigMap
// that makes istiod's waypoints run amber-waypoint from the chart's image,
// with only keys istiod accepts; merged into a Deployment shaped like
// istiod's waypoint (as istiod merges it: strategic merge) it replaces the
// istio-proxy container's image and command and keeps everything else.
// waypoint.enabled=false installs no such ConfigMap. The real merge by
// a real istiod is test/realnode's.
func TestHelmWaypointDefaults(t *testing.T) {
	helm := needHelm(t)
	if out, err := exec.Command(helm, "lint", "--strict", "helm/amber").CombinedOutput(); err != nil {
		t.Fatalf("helm lint: %v\n%s", err, out)
	}
	checkClassDefaults(t, helm, "istio-waypoint", []string{"proxy", "waypoint", "--domain", "$(POD_NAMESPACE).svc.cluster.local"})
	if cm := classDefaults(t, helm, "istio-waypoint", "--set", "waypoint.enabled=false"); cm != nil {
		t.Errorf("waypoint.enabled=false still installs %s", cm.Name)
	}
}

// TestHelmGatewayDefaults: the same for the ingress gateways istiod
// renders for Gateways of class istio (template kube-gateway, `proxy
// router`), behind gateway.enabled, which is off by default.
func TestHelmGatewayDefaults(t *testing.T) {
	helm := needHelm(t)
	if cm := classDefaults(t, helm, "istio"); cm != nil {
		t.Errorf("the default install has %s: amber's gateway is opt-in (gateway.enabled)", cm.Name)
	}
	checkClassDefaults(t, helm, "istio", []string{"proxy", "router", "--domain", "$(POD_NAMESPACE).svc.cluster.local"}, "--set", "gateway.enabled=true")
	if cm := classDefaults(t, helm, "istio-waypoint", "--set", "gateway.enabled=true"); cm == nil || cm.Name != "amber-waypoint" {
		t.Errorf("gateway.enabled=true changed the waypoint defaults: %v", cm)
	}
}

// checkClassDefaults renders the chart with set and checks its ConfigMap
// of GatewayClass defaults for class: in istio-system, only keys istiod
// accepts, and merged into a Deployment shaped like the one istiod renders
// for the class (container istio-proxy with args) it replaces the image,
// pull policy and command only.
func checkClassDefaults(t *testing.T, helm, class string, args []string, set ...string) {
	t.Helper()
	cm := classDefaults(t, helm, class, append(set, "--set", "image.repository=registry.example/amber", "--set", "image.tag=v9", "--set", "image.pullPolicy=Always")...)
	if cm == nil {
		t.Fatalf("no ConfigMap labelled gateway.istio.io/defaults-for-class=%s with %v", class, set)
	}
	if cm.Namespace != "istio-system" {
		t.Errorf("ConfigMap in %q, want istiod's namespace istio-system (the release's)", cm.Namespace)
	}
	for k := range cm.Data {
		if !slices.Contains(istiodOverlayKeys, k) {
			t.Errorf("key %q: istiod refuses GatewayClass defaults with it and renders no %s Gateway", k, class)
		}
	}

	istiods := appsv1.Deployment{Spec: appsv1.DeploymentSpec{Template: corev1.PodTemplateSpec{Spec: corev1.PodSpec{
		Containers: []corev1.Container{{
			Name: "istio-proxy", Image: "registry.istio.io/testing/proxyv2:latest-distroless",
			Args:         args,
			Env:          []corev1.EnvVar{{Name: "CA_ADDR", Value: "istiod.istio-system.svc:15012"}},
			VolumeMounts: []corev1.VolumeMount{{Name: "istio-token", MountPath: "/var/run/secrets/tokens"}},
		}},
		Volumes: []corev1.Volume{{Name: "istio-token"}},
	}}}}
	orig, err := yaml.Marshal(istiods)
	if err != nil {
		t.Fatal(err)
	}
	origJSON, _ := yaml.YAMLToJSON(orig)
	patchJSON, err := yaml.YAMLToJSON([]byte(cm.Data["deployment"]))
	if err != nil {
		t.Fatalf("deployment overlay: %v", err)
	}
	merged, err := strategicpatch.StrategicMergePatch(origJSON, patchJSON, appsv1.Deployment{})
	if err != nil {
		t.Fatalf("strategic merge: %v", err)
	}
	var got appsv1.Deployment
	if err := yaml.UnmarshalStrict(merged, &got); err != nil {
		t.Fatal(err)
	}
	cs := got.Spec.Template.Spec.Containers
	if len(cs) != 1 {
		t.Fatalf("containers after the merge: %+v", cs)
	}
	c := cs[0]
	if c.Image != "registry.example/amber:v9" || c.ImagePullPolicy != corev1.PullAlways {
		t.Errorf("image %q (%s), want the chart's image and pull policy", c.Image, c.ImagePullPolicy)
	}
	if !slices.Equal(c.Command, []string{"/usr/local/bin/amber-waypoint"}) {
		t.Errorf("command %q, want amber-waypoint", c.Command)
	}
	want := istiods.Spec.Template.Spec.Containers[0]
	if !slices.Equal(c.Args, want.Args) || !reflect.DeepEqual(c.Env, want.Env) || !reflect.DeepEqual(c.VolumeMounts, want.VolumeMounts) ||
		len(got.Spec.Template.Spec.Volumes) != 1 {
		t.Errorf("the merge changed more than image and command:\n%s", merged)
	}
}

// classDefaults renders the chart with args and returns its ConfigMap of
// GatewayClass defaults for class, nil if there is none.
func classDefaults(t *testing.T, helm, class string, args ...string) *corev1.ConfigMap {
	t.Helper()
	out, err := exec.Command(helm, append([]string{"template", "amber", "helm/amber", "-n", "istio-system"}, args...)...).Output()
	if err != nil {
		t.Fatalf("helm template %v: %v", args, err)
	}
	var found *corev1.ConfigMap
	for _, doc := range bytes.Split(out, []byte("\n---")) {
		var cm corev1.ConfigMap
		if err := yaml.Unmarshal(doc, &cm); err != nil {
			t.Fatal(err)
		}
		if cm.Kind != "ConfigMap" || cm.Labels["gateway.istio.io/defaults-for-class"] != class {
			continue
		}
		if found != nil {
			t.Fatalf("two ConfigMaps of %s defaults: %s, %s (istiod takes the oldest)", class, found.Name, cm.Name)
		}
		found = &cm
	}
	return found
}

// needHelm returns helm from PATH (make test puts .cache/bin there); it
// skips without, unless CI=true.
func needHelm(t *testing.T) string {
	t.Helper()
	helm, err := exec.LookPath("helm")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("helm not on PATH; CI must check the chart")
		}
		t.Skip("helm not on PATH (bash hack/helm.sh builds it into .cache/bin)")
	}
	return strings.TrimSpace(helm)
}
