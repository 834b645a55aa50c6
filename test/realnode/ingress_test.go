package realnode_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/amber-mesh/amber/test/istiod"
	"github.com/amber-mesh/amber/test/realnode"
)

// TestIntegrationIngressChart renders Istio's ingress chart from the
// pinned module with the walkthrough's install line (IngressHelmArgs,
// `helm template` instead of `install`) and checks what it would create
// against what the walkthrough and amber-waypoint need
// (CheckIngressDeployment, CheckIngressService), and that the Gateway of
// Istio's bookinfo-gateway.yaml selects the chart's pods. The real node
// test installs the same and reads it back.
func TestIntegrationIngressChart(t *testing.T) {
	bin := istiod.Binaries(t)
	args := realnode.IngressHelmArgs(filepath.Join(bin, realnode.IngressChart))
	args[0] = "template"
	out, err := exec.Command(istiod.Helm(t), args...).Output()
	if err != nil {
		t.Fatalf("helm %v: %v", args, err)
	}
	var d *appsv1.Deployment
	var svc *corev1.Service
	for _, doc := range bytes.Split(out, []byte("\n---")) {
		var meta metav1.TypeMeta
		if err := yaml.Unmarshal(doc, &meta); err != nil {
			t.Fatal(err)
		}
		switch meta.Kind {
		case "Deployment":
			d = new(appsv1.Deployment)
			if err := yaml.UnmarshalStrict(doc, d); err != nil {
				t.Fatal(err)
			}
		case "Service":
			svc = new(corev1.Service)
			if err := yaml.UnmarshalStrict(doc, svc); err != nil {
				t.Fatal(err)
			}
		}
	}
	if d == nil || svc == nil {
		t.Fatalf("no Deployment or Service rendered:\n%s", out)
	}
	if d.Name != realnode.IngressGateway || d.Namespace != realnode.Namespace || svc.Name != realnode.IngressGateway {
		t.Errorf("Deployment %s/%s, Service %s: want %s/%s", d.Namespace, d.Name, svc.Name, realnode.Namespace, realnode.IngressGateway)
	}
	if err := realnode.CheckIngressDeployment(d); err != nil {
		t.Error(err)
	}
	if err := realnode.CheckIngressService(svc); err != nil {
		t.Error(err)
	}
	if svc.Spec.Type != corev1.ServiceTypeClusterIP {
		t.Errorf("Service type %s, want ClusterIP", svc.Spec.Type)
	}

	sample, err := readYAMLDocs(filepath.Join(bin, realnode.BookinfoGatewaySample))
	if err != nil {
		t.Fatal(err)
	}
	var gw struct {
		Kind string
		Spec struct{ Selector map[string]string }
	}
	if err := yaml.Unmarshal(sample[0], &gw); err != nil || gw.Kind != "Gateway" {
		t.Fatalf("bookinfo-gateway.yaml's first object: %s %v", gw.Kind, err)
	}
	for k, v := range gw.Spec.Selector {
		if d.Spec.Template.Labels[k] != v {
			t.Errorf("bookinfo-gateway.yaml selects %s=%s; the chart's pod labels are %v", k, v, d.Spec.Template.Labels)
		}
	}
}

func readYAMLDocs(path string) ([][]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var docs [][]byte
	for _, doc := range bytes.Split(b, []byte("\n---")) {
		if len(bytes.TrimSpace(doc)) > 0 {
			docs = append(docs, doc)
		}
	}
	return docs, nil
}
