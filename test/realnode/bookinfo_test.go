package realnode

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/amber-mesh/amber/test/cluster"
)

// TestBookinfoShape compares BookinfoYAML and BookinfoVersionsYAML with
// the manifests Istio ships in the pinned istio.io/istio module
// (samples/bookinfo/platform/kube/): the same objects, names, labels,
// selectors, service accounts and ports. Images, environment, volumes and
// annotations may differ (ours are local static Go programs; productpage
// serves no /metrics for the prometheus.io annotations to point at).
func TestBookinfoShape(t *testing.T) {
	root, err := cluster.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "istio.io/istio")
	cmd.Dir = filepath.Join(root, "test", "istiod", "tools")
	cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=readonly")
	out, err := cmd.Output()
	istio := strings.TrimSpace(string(out))
	if err != nil || istio == "" {
		if os.Getenv("CI") == "true" {
			t.Fatalf("the pinned istio.io/istio module: %v", err)
		}
		t.Skipf("the pinned istio.io/istio module is not in the module cache (hack/istiod-bin.sh downloads it): %v", err)
	}
	for file, ours := range map[string]string{
		"bookinfo.yaml":          BookinfoYAML("default"),
		"bookinfo-versions.yaml": BookinfoVersionsYAML("default"),
	} {
		theirs, err := os.ReadFile(filepath.Join(istio, "samples", "bookinfo", "platform", "kube", file))
		if err != nil {
			t.Fatal(err)
		}
		want, got := shapes(t, string(theirs)), shapes(t, ours)
		for k, w := range want {
			if g, ok := got[k]; !ok {
				t.Errorf("%s: %s missing", file, k)
			} else if !reflect.DeepEqual(g, w) {
				t.Errorf("%s: %s differs:\n got %+v\nwant %+v", file, k, g, w)
			}
		}
		for k := range got {
			if _, ok := want[k]; !ok {
				t.Errorf("%s: %s is not in Istio's", file, k)
			}
		}
	}
}

// shape is what must match Istio's manifests.
type shape struct {
	Labels, Selector, PodLabels map[string]string
	ServiceAccount              string
	Containers, Ports           []string
}

func shapes(t *testing.T, manifest string) map[string]shape {
	t.Helper()
	out := map[string]shape{}
	for _, doc := range strings.Split(manifest, "\n---") {
		var meta metav1.TypeMeta
		if err := yaml.Unmarshal([]byte(doc), &meta); err != nil {
			t.Fatal(err)
		}
		var s shape
		var om metav1.ObjectMeta
		switch meta.Kind {
		case "":
			continue
		case "Service":
			var o corev1.Service
			if err := yaml.UnmarshalStrict([]byte(doc), &o); err != nil {
				t.Fatal(err)
			}
			om, s.Selector = o.ObjectMeta, o.Spec.Selector
			for _, p := range o.Spec.Ports {
				s.Ports = append(s.Ports, fmt.Sprintf("%s/%d/%s", p.Name, p.Port, p.TargetPort.String()))
			}
		case "ServiceAccount":
			var o corev1.ServiceAccount
			if err := yaml.UnmarshalStrict([]byte(doc), &o); err != nil {
				t.Fatal(err)
			}
			om = o.ObjectMeta
		case "Deployment":
			var o appsv1.Deployment
			if err := yaml.UnmarshalStrict([]byte(doc), &o); err != nil {
				t.Fatal(err)
			}
			om, s.Selector, s.PodLabels = o.ObjectMeta, o.Spec.Selector.MatchLabels, o.Spec.Template.Labels
			s.ServiceAccount = o.Spec.Template.Spec.ServiceAccountName
			for _, c := range o.Spec.Template.Spec.Containers {
				s.Containers = append(s.Containers, c.Name)
				for _, p := range c.Ports {
					s.Ports = append(s.Ports, fmt.Sprintf("%s/%d", c.Name, p.ContainerPort))
				}
			}
		default:
			t.Fatalf("unexpected %s in a Bookinfo manifest", meta.Kind)
		}
		s.Labels = om.Labels
		slices.Sort(s.Ports)
		out[meta.Kind+" "+om.Name] = s
	}
	return out
}
