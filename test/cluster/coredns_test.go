package cluster

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestCoreDNSStamp: hack/coredns.sh (make test builds CoreDNS with it
// before go test) and Start stamp the binary alike, so that neither
// rebuilds what the other built.
func TestCoreDNSStamp(t *testing.T) {
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("bash", filepath.Join(root, "hack", "coredns.sh"), "-stamp").Output()
	if err != nil {
		t.Fatalf("hack/coredns.sh -stamp: %v", err)
	}
	want, err := coreDNSStamp(filepath.Join(root, "test", "cluster", "tools", "coredns"))
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(string(out)); got != want {
		t.Errorf("hack/coredns.sh stamps %s, Start %s", got, want)
	}
}
