package agent_test

import (
	"os/exec"
	"strings"
	"testing"
)

// Inside agent/, Kubernetes stays at the edge: only agent/kube (and the
// agent package that wires it) may depend on client-go or the API types;
// the CNI plugin, exec'd for every pod, depends on neither.
func TestKubernetesAtTheEdge(t *testing.T) {
	for _, pkg := range []string{"./enrol", "./capture", "./cniapi", "./cniinstall", "./cniplugin", "../cmd/amber-cni"} {
		out, err := exec.Command("go", "list", "-deps", "-test=false", pkg).CombinedOutput()
		if err != nil {
			t.Fatalf("go list %s: %v\n%s", pkg, err, out)
		}
		for _, dep := range strings.Fields(string(out)) {
			if strings.HasPrefix(dep, "k8s.io/") || dep == "github.com/amber-mesh/amber/agent/kube" {
				t.Errorf("%s depends on %s", pkg, dep)
			}
		}
	}
}
