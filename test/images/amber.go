package images

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// Amber is amber's own image, as deploy/Dockerfile lays it out: a static
// binary in /usr/local/bin for every command under cmd/ (amber-agent,
// amber-cni, amber-ztunnel, amberctl, amber-waypoint once it exists),
// amber-waypoint as entrypoint (the DaemonSet and the waypoint defaults set
// each container's command; Istio's gateway charts cannot, and run the
// entrypoint with pilot-agent's `proxy router …`), nothing else — no
// shell.
var Amber = Image{Name: "amber", Ref: "localhost/amber/amber:test"}

// AmberCommands returns the commands the image carries: the main packages
// under repoRoot's cmd/, by name.
func AmberCommands(ctx context.Context, repoRoot string) ([]string, error) {
	cmd := exec.CommandContext(ctx, "go", "list", "-f", `{{if eq .Name "main"}}{{.ImportPath}}{{end}}`, "./cmd/...")
	cmd.Dir = repoRoot
	out, err := cmd.Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		return nil, fmt.Errorf("list amber's commands: %w: %s", err, strings.TrimSpace(string(stderr)))
	}
	var names []string
	for _, p := range strings.Fields(string(out)) {
		names = append(names, path.Base(p))
	}
	if len(names) == 0 {
		return nil, fmt.Errorf("list amber's commands: no main package under %s/cmd", repoRoot)
	}
	return names, nil
}

// BuildAmber builds amber's binaries from repoRoot (CGO_ENABLED=0, the
// committed eBPF object embedded) and writes the image as a docker archive
// <dir>/amber.tar, the Dockerfile's result without a container engine.
func BuildAmber(ctx context.Context, repoRoot, dir string) (Image, error) {
	img := Amber
	bin := filepath.Join(dir, "bin", "amber")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		return img, fmt.Errorf("build image amber: %w", err)
	}
	names, err := AmberCommands(ctx, repoRoot)
	if err != nil {
		return img, fmt.Errorf("build image amber: %w", err)
	}
	var pkgs []string
	for _, b := range names {
		pkgs = append(pkgs, "./cmd/"+b)
	}
	cmd := exec.CommandContext(ctx, "go", append([]string{"build", "-trimpath", "-ldflags=-s -w", "-o", bin + "/"}, pkgs...)...)
	cmd.Dir = repoRoot
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+runtime.GOARCH)
	if b, err := cmd.CombinedOutput(); err != nil {
		return img, fmt.Errorf("build image amber: go build: %w: %s", err, strings.TrimSpace(string(b)))
	}
	var layers []v1.Layer
	for _, b := range names {
		l, err := binaryLayer(filepath.Join(bin, b), "/usr/local/bin/"+b)
		if err != nil {
			return img, fmt.Errorf("build image amber: %w", err)
		}
		layers = append(layers, l)
	}
	i, err := mutate.AppendLayers(empty.Image, layers...)
	if err != nil {
		return img, fmt.Errorf("build image amber: %w", err)
	}
	cf, err := i.ConfigFile()
	if err != nil {
		return img, fmt.Errorf("build image amber: %w", err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", runtime.GOARCH
	cf.Config.Entrypoint = []string{"/usr/local/bin/amber-waypoint"}
	// Root with only the capabilities the DaemonSet grants (CAP_BPF,
	// CAP_NET_ADMIN, CAP_PERFMON): the agent writes bpffs and host CNI
	// directories.
	cf.Config.User = "0:0"
	if i, err = mutate.ConfigFile(i, cf); err != nil {
		return img, fmt.Errorf("build image amber: %w", err)
	}
	tag, err := name.NewTag(img.Ref)
	if err != nil {
		return img, fmt.Errorf("build image amber: %w", err)
	}
	img.Archive = filepath.Join(dir, "amber.tar")
	tmp := img.Archive + ".tmp"
	if err := tarball.WriteToFile(tmp, tag, i); err != nil {
		os.Remove(tmp)
		return img, fmt.Errorf("build image amber: write archive: %w", err)
	}
	return img, os.Rename(tmp, img.Archive)
}
