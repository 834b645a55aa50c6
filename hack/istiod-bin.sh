#!/usr/bin/env bash
# Builds istiod (pilot-discovery) from the Go module proxy into a cache,
# once, and puts Istio's CRDs next to it: hack/istiod-bin.sh [-check]
#
#   -check  build nothing: exit 3 if the binary or the CRDs are missing or
#           stale
#
# Output lands in .cache/istiod/<istio version>/bin/ (override the root with
# ISTIOD_CACHE_DIR): pilot-discovery and crd-all.gen.yaml (from
# manifests/charts/base/files/ of the same istio.io/istio module). A stamp in
# .cache/istiod/<istio version>/stamp/ holds the hash of the tools module's
# go.mod and go.sum: the binary is rebuilt only when those change, so a warm
# run takes well under a second. Progress goes to stderr; the bin directory
# is printed on stdout.
#
# The tools module is test/istiod/tools (its own module: Istio pins its own
# k8s.io versions). A cold build takes about 3.5 minutes on 2 cores;
# concurrent runs serialise on a lock. Requires flock and setsid
# (util-linux).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tools=$root/test/istiod/tools
pkg=istio.io/istio/pilot/cmd/pilot-discovery
name=pilot-discovery
crds=crd-all.gen.yaml

die() { echo "istiod-bin: $*" >&2; exit 1; }
say() { echo "istiod-bin: $*" >&2; }

version=$(awk '$1 == "istio.io/istio" && $2 ~ /^v/ { print $2; exit }' "$tools/go.mod")
[ -n "$version" ] || die "cannot read the istio.io/istio version from $tools/go.mod"

cache=${ISTIOD_CACHE_DIR:-$root/.cache/istiod}/$version
bin=$cache/bin
stamps=$cache/stamp

check=
if [ "${1-}" = -check ]; then check=1; shift; fi
[ $# -eq 0 ] || die "usage: hack/istiod-bin.sh [-check]"

command -v go >/dev/null || die "go is not in PATH"
mkdir -p "$bin" "$stamps"

# stamp: what the binary was built from. Hashing the tools module's go.mod
# (less comment lines) and go.sum covers every version that went into it.
stamp() {
  printf '%s %s\n' "$name" "$({ grep -v '^[[:space:]]*//' "$tools/go.mod"; cat "$tools/go.sum"; } | sha256sum | cut -d' ' -f1)"
}

fresh() {
  [ -x "$bin/$name" ] && [ -s "$bin/$crds" ] &&
    [ "$(cat "$stamps/$name" 2>/dev/null)" = "$(stamp)" ]
}

if fresh; then
  echo "$bin"
  exit 0
fi
if [ -n "$check" ]; then
  say "not built yet: $name (run hack/istiod-bin.sh)"
  exit 3
fi

. "$(dirname "$0")/lib/gobuild.sh"
lock_cache istiod-bin.sh
if fresh; then # the other run built it
  echo "$bin"
  exit 0
fi

go_build "$name" "$version" "$tools" "$pkg" "-s -w" "first time: several minutes"

# The CRDs come from the very module the binary was built from, so the two
# always match.
src=$(cd "$tools" && GOWORK=off GOFLAGS=-mod=readonly go list -m -f '{{.Dir}}' istio.io/istio)
[ -n "$src" ] && [ -s "$src/manifests/charts/base/files/$crds" ] ||
  die "no $crds in istio.io/istio $version at ${src:-?}/manifests/charts/base/files"
cp -f "$src/manifests/charts/base/files/$crds" "$bin/.$crds.tmp"
mv -f "$bin/.$crds.tmp" "$bin/$crds"
mv -f "$bin/.$name.tmp" "$bin/$name"
stamp >"$stamps/$name"
say "built $name $version in $((SECONDS - build_start))s → $bin/$name"
echo "$bin"
