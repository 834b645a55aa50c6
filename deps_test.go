package amber_test

import (
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// The dependency direction is a design decision (ARCHITECTURE.md); this
// test keeps it.
func TestDependencyDirection(t *testing.T) {
	const authz = "github.com/amber-mesh/amber/tunnel/authz"
	rules := []struct {
		pkgs      string
		forbidden []string
		except    []string // allowed although a forbidden prefix matches
		why       string
	}{
		{"./bpf/...", []string{"k8s.io/", "net/http", "github.com/amber-mesh/amber/xds", "github.com/amber-mesh/amber/tunnel", "github.com/amber-mesh/amber/agent", "google.golang.org/grpc"}, nil, "bpf/ knows only the kernel"},
		{"./bpf", []string{"github.com/vishvananda/"}, nil, "package bpf knows only BPF objects; host routing is bpf/hostnet's"},
		{"./cmd/amber-ztunnel", []string{"github.com/vishvananda/"}, nil, "the ztunnel only registers listeners and reads counters in pinned maps: no netlink"},
		{"./tunnel/...", []string{"k8s.io/client-go", "k8s.io/api", "k8s.io/apimachinery", "github.com/amber-mesh/amber/agent"}, nil, "the ztunnel runs without Kubernetes"},
		{"./xds/...", []string{"k8s.io/", "github.com/amber-mesh/amber/agent"}, nil, "xds/ is Kubernetes-free"},
		{"./xds/...", []string{"github.com/amber-mesh/amber/tunnel"}, []string{authz}, "xds/state holds compiled policies; nothing else of the data plane"},
		{"./tunnel/relay/...", []string{"github.com/amber-mesh/amber/xds", "github.com/amber-mesh/amber/tunnel/proxy", "github.com/amber-mesh/amber/tunnel/metrics", "github.com/amber-mesh/amber/tunnel/authz", "github.com/amber-mesh/amber/tunnel/certs", "github.com/prometheus/"}, nil, "the relay copies bytes for the ztunnel and the waypoint alike: it knows no workloads, policy or telemetry"},
		{"./tunnel/hbone/...", []string{"github.com/amber-mesh/amber/tunnel/relay", "github.com/amber-mesh/amber/tunnel/proxy", "github.com/amber-mesh/amber/xds"}, nil, "HBONE is the wire; relaying and routing sit on it"},
		{"./waypoint/...", []string{"k8s.io/", "github.com/amber-mesh/amber/agent", "github.com/amber-mesh/amber/test"}, nil, "the waypoint runs on istiod's xDS alone, never the Kubernetes API"},
		{"./waypoint/...", []string{"github.com/amber-mesh/amber/tunnel/proxy"}, nil, "the waypoint reuses the ztunnel's HBONE, certificates and identities, not its proxy"},
		{"./cmd/amber-waypoint", []string{"k8s.io/", "github.com/amber-mesh/amber/agent", "github.com/amber-mesh/amber/test"}, nil, "the waypoint's container reads its pod from the environment and files istiod's template gives it, never the Kubernetes API"},
	}
	for _, r := range rules {
		out, err := exec.Command("go", "list", "-deps", "-test=false", r.pkgs).CombinedOutput()
		if err != nil {
			t.Fatalf("go list %s: %v\n%s", r.pkgs, err, out)
		}
		for _, dep := range strings.Fields(string(out)) {
			for _, f := range r.forbidden {
				if (dep == f || strings.HasPrefix(dep, f)) && !slices.Contains(r.except, dep) {
					t.Errorf("%s imports %s: %s", r.pkgs, dep, r.why)
				}
			}
		}
	}

	// The policy model is a leaf: xds/state and tunnel/proxy both import it.
	out, err := exec.Command("go", "list", "-deps", "-test=false", "-f", "{{if not .Standard}}{{.ImportPath}}{{end}}", authz).CombinedOutput()
	if err != nil {
		t.Fatalf("go list %s: %v\n%s", authz, err, out)
	}
	for _, dep := range strings.Fields(string(out)) {
		if dep != authz {
			t.Errorf("%s imports %s: it must import only the standard library", authz, dep)
		}
	}

	// Nothing imports cmd/.
	out, err = exec.Command("go", "list", "-f", `{{.ImportPath}}: {{join .Imports " "}}`, "./...").CombinedOutput()
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
