package images

import (
	"archive/tar"
	"context"
	"errors"
	"io"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// The archive is what `ctr images import`, the DaemonSet, the waypoint
// defaults and Istio's gateway charts (which set no command) need: the
// tag, the entrypoint amber-waypoint, and a runnable static binary for
// every command under cmd/ where the manifests' commands point.
func TestBuildAmber(t *testing.T) {
	if testing.Short() {
		t.Skip("builds every command")
	}
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	img, err := BuildAmber(context.Background(), root, dir)
	if err != nil {
		t.Fatal(err)
	}
	tag, err := name.NewTag(Amber.Ref)
	if err != nil {
		t.Fatal(err)
	}
	i, err := tarball.ImageFromPath(img.Archive, &tag)
	if err != nil {
		t.Fatalf("archive does not hold %s: %v", Amber.Ref, err)
	}
	cf, err := i.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(cf.Config.Entrypoint, " "); got != "/usr/local/bin/amber-waypoint" {
		t.Errorf("entrypoint %q", got)
	}
	files := map[string]bool{}
	tr := tar.NewReader(mutate.Extract(i))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		files[h.Name] = h.Mode&0o111 != 0
	}
	cmds, err := AmberCommands(context.Background(), root)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"amber-agent", "amber-cni", "amber-ztunnel", "amberctl"} {
		if !slices.Contains(cmds, want) {
			t.Errorf("commands %v lack %s", cmds, want)
		}
	}
	for _, b := range cmds {
		if !files["usr/local/bin/"+b] {
			t.Errorf("image lacks executable /usr/local/bin/%s (has %v)", b, files)
		}
	}
	if _, ok := files["bin/sh"]; ok {
		t.Error("image has a shell")
	}
	// The binaries are static: they run with nothing else in the image.
	out, err := exec.Command("file", filepath.Join(dir, "bin", "amber", "amber-ztunnel")).CombinedOutput()
	if err == nil && !strings.Contains(string(out), "statically linked") {
		t.Errorf("amber-ztunnel is not static: %s", out)
	}
}
