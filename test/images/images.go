// Package images builds the local cluster's container images — pause,
// echo, curl and Istio's Bookinfo (productpage, details, reviews, ratings),
// each one static Go binary from this directory — as docker archives that
// `ctr images import` loads, without a container engine.
package images

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/amber-mesh/amber/test/images/bookinfo"
)

// Image is one test image.
type Image struct {
	// Name is the program under test/images and the image's short name.
	Name string
	// Ref is the image reference pods use, with imagePullPolicy Never.
	Ref string
	// Archive is the docker archive (docker save format) holding it.
	Archive string
}

// Names of the images, and their references. The "localhost/" registry
// keeps the references fully qualified, so containerd and the kubelet
// normalise them the same way and nothing ever tries to pull them.
var (
	Pause = Image{Name: "pause", Ref: "localhost/amber/pause:test"}
	Echo  = Image{Name: "echo", Ref: "localhost/amber/echo:test"}
	Curl  = Image{Name: "curl", Ref: "localhost/amber/curl:test"}

	// Istio's Bookinfo sample (package bookinfo), one image per service;
	// reviews plays v1, v2 and v3 from its environment.
	Productpage = Image{Name: "productpage", Ref: "localhost/amber/bookinfo-productpage:test"}
	Details     = Image{Name: "details", Ref: "localhost/amber/bookinfo-details:test"}
	Reviews     = Image{Name: "reviews", Ref: "localhost/amber/bookinfo-reviews:test"}
	Ratings     = Image{Name: "ratings", Ref: "localhost/amber/bookinfo-ratings:test"}
	Bookinfo    = []Image{Productpage, Details, Reviews, Ratings}

	All = append([]Image{Pause, Echo, Curl}, Bookinfo...)
)

// EchoPort is the port the echo image serves HTTP on (Istio's productpage).
const EchoPort = 9080

// BookinfoPort is the port every Bookinfo image serves HTTP on.
const BookinfoPort = bookinfo.Port

// Build compiles every image's program (CGO_ENABLED=0, so the binary runs
// in an image with nothing else in it) and writes each image as a docker
// archive <dir>/<name>.tar. repoRoot is the module root. One go build
// builds them all; its cache makes a warm call cost about a second.
func Build(ctx context.Context, repoRoot, dir string) ([]Image, error) {
	bin := filepath.Join(dir, "bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		return nil, fmt.Errorf("build images: %w", err)
	}
	args := []string{"build", "-trimpath", "-ldflags=-s -w", "-o", bin + "/"}
	for _, img := range All {
		args = append(args, "./test/images/"+img.Name)
	}
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = repoRoot
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+runtime.GOARCH)
	if b, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("build images: go build: %w: %s", err, strings.TrimSpace(string(b)))
	}
	var out []Image
	for _, img := range All {
		img.Archive = filepath.Join(dir, img.Name+".tar")
		if err := writeArchive(img, filepath.Join(bin, img.Name)); err != nil {
			return nil, err
		}
		out = append(out, img)
	}
	return out, nil
}

// writeArchive writes an image whose only layer is the binary at
// /<name>, its entrypoint.
func writeArchive(img Image, bin string) error {
	layer, err := binaryLayer(bin, "/"+img.Name)
	if err != nil {
		return fmt.Errorf("build image %s: %w", img.Name, err)
	}
	i, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return fmt.Errorf("build image %s: %w", img.Name, err)
	}
	cf, err := i.ConfigFile()
	if err != nil {
		return fmt.Errorf("build image %s: %w", img.Name, err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", runtime.GOARCH
	cf.Config.Entrypoint = []string{"/" + img.Name}
	// `kubectl exec POD -- curl URL` finds /curl.
	cf.Config.Env = []string{"PATH=/"}
	// 65535 is what the upstream pause image runs as; the test programs
	// need no privileges either.
	cf.Config.User = "65535:65535"
	if img.Name == Echo.Name {
		cf.Config.ExposedPorts = map[string]struct{}{fmt.Sprintf("%d/tcp", EchoPort): {}}
	}
	for _, b := range Bookinfo {
		if img.Name == b.Name {
			cf.Config.ExposedPorts = map[string]struct{}{fmt.Sprintf("%d/tcp", BookinfoPort): {}}
		}
	}
	if i, err = mutate.ConfigFile(i, cf); err != nil {
		return fmt.Errorf("build image %s: %w", img.Name, err)
	}
	tag, err := name.NewTag(img.Ref)
	if err != nil {
		return fmt.Errorf("build image %s: %w", img.Name, err)
	}
	tmp := img.Archive + ".tmp"
	if err := tarball.WriteToFile(tmp, tag, i); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("build image %s: write archive: %w", img.Name, err)
	}
	return os.Rename(tmp, img.Archive)
}

// binaryLayer is a layer holding bin at path, mode 0755, with a fixed
// modification time so that the same binary gives the same layer digest.
func binaryLayer(bin, path string) (v1.Layer, error) {
	b, err := os.ReadFile(bin)
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	hdr := &tar.Header{Name: strings.TrimPrefix(path, "/"), Mode: 0o755, Size: int64(len(b)), Typeflag: tar.TypeReg, Format: tar.FormatPAX}
	if err := tw.WriteHeader(hdr); err != nil {
		return nil, err
	}
	if _, err := tw.Write(b); err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	layer := buf.Bytes()
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layer)), nil
	})
}
