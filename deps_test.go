package amber_test

import (
	"os/exec"
	"strings"
	"testing"
)

// The dependency direction is a design decision (ARCHITECTURE.md); this
// test keeps it.
func TestDependencyDirection(t *testing.T) {
	rules := []struct {
		pkgs      string
		forbidden []string
		why       string
	}{
		{"./bpf/...", []string{"k8s.io/", "net/http", "github.com/amber-mesh/amber/xds", "github.com/amber-mesh/amber/tunnel", "github.com/amber-mesh/amber/agent", "google.golang.org/grpc"}, "bpf/ knows only the kernel"},
		{"./tunnel/...", []string{"k8s.io/client-go", "k8s.io/api", "k8s.io/apimachinery", "github.com/amber-mesh/amber/agent"}, "the ztunnel runs without Kubernetes"},
		{"./xds/...", []string{"k8s.io/", "github.com/amber-mesh/amber/agent"}, "xds/ is Kubernetes-free"},
		{"./waypoint/...", []string{"k8s.io/", "github.com/amber-mesh/amber/agent", "github.com/amber-mesh/amber/test"}, "the waypoint runs on istiod's xDS alone, never the Kubernetes API"},
	}
	for _, r := range rules {
		out, err := exec.Command("go", "list", "-deps", "-test=false", r.pkgs).CombinedOutput()
		if err != nil {
			t.Fatalf("go list %s: %v\n%s", r.pkgs, err, out)
		}
		for _, dep := range strings.Fields(string(out)) {
			for _, f := range r.forbidden {
				if dep == f || strings.HasPrefix(dep, f) {
					t.Errorf("%s imports %s: %s", r.pkgs, dep, r.why)
				}
			}
		}
	}

	// Nothing imports cmd/.
	out, err := exec.Command("go", "list", "-f", `{{.ImportPath}}: {{join .Imports " "}}`, "./...").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		pkg, imports, _ := strings.Cut(line, ": ")
		if strings.Contains(" "+imports+" ", " github.com/amber-mesh/amber/cmd/") {
			t.Errorf("%s imports a command package", pkg)
		}
	}
}
