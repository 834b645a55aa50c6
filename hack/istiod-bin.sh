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

for tool in flock setsid; do
  command -v $tool >/dev/null || die "$tool is not in PATH (Debian package util-linux)"
done
exec 9>"$cache/.lock"
if ! flock -n 9; then
  say "waiting for another istiod-bin.sh run to finish building…"
  flock 9
fi
if fresh; then # the other run built it
  echo "$bin"
  exit 0
fi

# The build runs in its own process group (setsid) so that an interrupted
# run stops the go command and every compiler it started, not just this
# script.
build_pid=
cleanup() {
  if [ -n "$build_pid" ]; then
    kill -TERM -- "-$build_pid" 2>/dev/null || true
    wait "$build_pid" 2>/dev/null || true
  fi
  rm -f "$bin"/.*.tmp
}
trap cleanup EXIT
trap 'say "interrupted"; exit 143' TERM INT HUP

first=
[ -e "$bin/$name" ] || first=" (first time: several minutes)"
say "building $name $version$first…"
start=$SECONDS
(cd "$tools" && GOWORK=off CGO_ENABLED=0 GOFLAGS=-mod=readonly \
  exec setsid go build -trimpath -ldflags "-s -w" -o "$bin/.$name.tmp" "$pkg") &
build_pid=$!
# go build is silent for minutes on a cold cache: say it is alive. Short
# sleeps keep the signal trap responsive.
next=$((start + 30))
while kill -0 "$build_pid" 2>/dev/null; do
  sleep 1
  if [ $SECONDS -ge $next ] && kill -0 "$build_pid" 2>/dev/null; then
    say "… still building $name ($((SECONDS - start))s)"
    next=$((next + 30))
  fi
done
rc=0
wait "$build_pid" || rc=$?
build_pid=
[ $rc -eq 0 ] || die "building $name $version from $tools failed with status $rc (see the go build output above)"

# The CRDs come from the very module the binary was built from, so the two
# always match.
src=$(cd "$tools" && GOWORK=off GOFLAGS=-mod=readonly go list -m -f '{{.Dir}}' istio.io/istio)
[ -n "$src" ] && [ -s "$src/manifests/charts/base/files/$crds" ] ||
  die "no $crds in istio.io/istio $version at ${src:-?}/manifests/charts/base/files"
cp -f "$src/manifests/charts/base/files/$crds" "$bin/.$crds.tmp"
mv -f "$bin/.$crds.tmp" "$bin/$crds"
mv -f "$bin/.$name.tmp" "$bin/$name"
stamp >"$stamps/$name"
say "built $name $version in $((SECONDS - start))s → $bin/$name"
echo "$bin"
