package kube

import (
	"testing"

	"github.com/amber-mesh/amber/test/buildcache"
)

// BinDirEnv names an environment variable that, when set, points at a
// directory of prebuilt binaries (etcd, kube-apiserver, kubectl, ...) to use
// instead of building them with hack/kube-bins.sh.
const BinDirEnv = "AMBER_KUBE_BIN_DIR"

// DefaultBinaries are the binaries Binaries always provides: what Start
// and ControlPlane.Kubectl run.
var DefaultBinaries = []string{"etcd", "kube-apiserver", "kubectl"}

// Binaries returns the directory holding etcd, kube-apiserver, kubectl and
// the extra binaries named (kubelet, kube-scheduler,
// kube-controller-manager, kube-proxy), building whatever is missing with
// hack/kube-bins.sh. A warm cache answers in well under a second; a cold
// one takes minutes (see the package doc), with the script's progress on
// stderr.
//
// When the binaries cannot be built the test is skipped, unless CI=true:
// then it fails, so CI never passes by skipping. With -short it only uses
// binaries already in the cache and skips (also in CI) when they are not.
func Binaries(tb testing.TB, extra ...string) (dir string) {
	tb.Helper()
	names := append(append([]string(nil), DefaultBinaries...), extra...)
	return buildcache.Dir(tb, buildcache.Build{
		What:      "kubernetes binaries",
		Script:    "kube-bins.sh",
		Args:      names,
		BinDirEnv: BinDirEnv,
		Files:     names,
	})
}
