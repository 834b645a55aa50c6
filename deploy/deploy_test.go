// Package deploy holds amber's manifests (kustomize base and Helm chart);
// its tests check them against a real API server.
package deploy_test

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"reflect"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/amber-mesh/amber/test/kube"
)

// TestIntegrationManifests applies `kubectl apply -k deploy/` and, when
// helm is on PATH, the rendered chart (every optional template on) to a
// real API server (server-side
// dry run: schema, defaults and admission), and checks that both grant
// the same RBAC rules and the same container capabilities.
func TestIntegrationManifests(t *testing.T) {
	cp := kube.Start(t, kube.Options{})
	ctx := context.Background()
	if _, err := cp.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "istio-system"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if out, err := cp.Kubectl(ctx, "apply", "--dry-run=server", "-k", "."); err != nil {
		t.Fatalf("kubectl apply -k deploy/: %v\n%s", err, out)
	}
	kustomized, err := cp.Kubectl(ctx, "kustomize", ".")
	if err != nil {
		t.Fatal(err)
	}
	kRules, kCaps := parse(t, kustomized)

	helm, ok := lookHelm(t)
	if !ok {
		return
	}
	rendered, err := exec.Command(helm, "template", "amber", "helm/amber", "-n", "istio-system", "--set", "gateway.enabled=true").Output()
	if err != nil {
		t.Fatalf("helm template: %v", err)
	}
	f, err := os.CreateTemp(t.TempDir(), "chart-*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	f.Write(rendered)
	f.Close()
	if out, err := cp.Kubectl(ctx, "apply", "--dry-run=server", "-f", f.Name()); err != nil {
		t.Fatalf("apply rendered chart: %v\n%s", err, out)
	}
	hRules, hCaps := parse(t, rendered)
	if !reflect.DeepEqual(kRules, hRules) {
		t.Errorf("RBAC differs:\nkustomize %+v\nhelm      %+v", kRules, hRules)
	}
	if !reflect.DeepEqual(kCaps, hCaps) {
		t.Errorf("capabilities differ:\nkustomize %v\nhelm      %v", kCaps, hCaps)
	}
}

// parse returns the rules of every (Cluster)Role by kind, and each
// container's added capabilities; it fails on a privileged container.
func parse(t *testing.T, docs []byte) (map[string][]rbacv1.PolicyRule, map[string][]corev1.Capability) {
	t.Helper()
	rules := map[string][]rbacv1.PolicyRule{}
	caps := map[string][]corev1.Capability{}
	for _, doc := range bytes.Split(docs, []byte("\n---")) {
		var meta metav1.TypeMeta
		if err := yaml.Unmarshal(doc, &meta); err != nil {
			t.Fatal(err)
		}
		switch meta.Kind {
		case "ClusterRole", "Role":
			var r rbacv1.ClusterRole
			if err := yaml.Unmarshal(doc, &r); err != nil {
				t.Fatal(err)
			}
			rules[meta.Kind] = r.Rules
		case "DaemonSet":
			var ds appsv1.DaemonSet
			if err := yaml.UnmarshalStrict(doc, &ds); err != nil {
				t.Fatal(err)
			}
			for _, c := range ds.Spec.Template.Spec.Containers {
				sc := c.SecurityContext
				if sc == nil || sc.Capabilities == nil || (sc.Privileged != nil && *sc.Privileged) || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
					t.Errorf("container %s: privileged or without a capability list", c.Name)
					continue
				}
				if strings.Join(capStrings(sc.Capabilities.Drop), ",") != "ALL" {
					t.Errorf("container %s drops %v, want ALL", c.Name, sc.Capabilities.Drop)
				}
				caps[c.Name] = sc.Capabilities.Add
			}
		}
	}
	if len(rules) != 2 || len(caps) != 2 {
		t.Fatalf("want a ClusterRole, a Role and two containers; got %v %v", rules, caps)
	}
	return rules, caps
}

func capStrings(cs []corev1.Capability) []string {
	var out []string
	for _, c := range cs {
		out = append(out, string(c))
	}
	return out
}

// TestChartGODEBUG: ztunnel.godebug reaches the ztunnel container as
// GODEBUG, the way to turn off amber-ztunnel's monitor setting
// (schedtrace=0); left empty, the container has no GODEBUG and the
// ztunnel adds its own.
func TestChartGODEBUG(t *testing.T) {
	helm, ok := lookHelm(t)
	if !ok {
		return
	}
	for _, tc := range []struct {
		set  []string
		want []string
	}{
		{nil, nil},
		{[]string{"--set", "ztunnel.godebug=schedtrace=0"}, []string{"schedtrace=0"}},
	} {
		args := append([]string{"template", "amber", "helm/amber", "-n", "istio-system"}, tc.set...)
		rendered, err := exec.Command(helm, args...).Output()
		if err != nil {
			t.Fatalf("helm %v: %v", args, err)
		}
		var got []string
		for _, doc := range bytes.Split(rendered, []byte("\n---")) {
			var ds appsv1.DaemonSet
			if err := yaml.Unmarshal(doc, &ds); err != nil {
				t.Fatal(err)
			}
			if ds.Kind != "DaemonSet" {
				continue
			}
			for _, c := range ds.Spec.Template.Spec.Containers {
				for _, e := range c.Env {
					if e.Name == "GODEBUG" {
						if c.Name != "amber-ztunnel" {
							t.Errorf("GODEBUG set on container %s", c.Name)
						}
						got = append(got, e.Value)
					}
				}
			}
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("helm %v: GODEBUG values %q, want %q", tc.set, got, tc.want)
		}
	}
}

// lookHelm returns helm's path, or false when it is not on PATH outside
// CI (where its absence fails the test).
func lookHelm(t *testing.T) (string, bool) {
	helm, err := exec.LookPath("helm")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("helm not on PATH; CI must check the chart")
		}
		t.Log("helm not on PATH: chart not checked")
		return "", false
	}
	return helm, true
}
