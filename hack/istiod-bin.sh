#!/usr/bin/env bash
# Builds Istio's binaries from the Go module proxy into a cache, once:
# hack/istiod-bin.sh [-check] [NAME...]
#
#   NAME    pilot-discovery (istiod, with Istio's CRDs and its Helm chart
#           next to it),
#           hbone-interop (Istio's Go HBONE client and server, for
#           test/interop) or istioctl (whose proxy-config parsers read
#           amber-waypoint's admin output in test/istiod); no NAME means
#           pilot-discovery and hbone-interop
#   -check  build nothing: exit 3 if a named file is missing or stale
#
# Output lands in .cache/istiod/<istio version>/bin/ (override the root with
# ISTIOD_CACHE_DIR): pilot-discovery, crd-all.gen.yaml (from
# manifests/charts/base/files/ of the same istio.io/istio module),
# gateway-api-crd.yaml (the Gateway API CRDs Istio's own integration tests
# install, tests/integration/pilot/testdata/ of that module), istio-discovery/
# (istiod's Helm chart, manifests/charts/istio-control/istio-discovery/ of
# that module: test/cluster renders istiod's ConfigMaps from it), and
# hbone-interop and istioctl. A stamp per binary in
# .cache/istiod/<istio version>/stamp/ holds the hash of what it was built
# from: the tools module's go.mod and go.sum, and for hbone-interop also its
# source; for istioctl its own module's (test/istiod/istioctl, which must
# require the same istio.io/istio). A binary is rebuilt only
# when that changes, so a warm run takes well under a second. Progress goes
# to stderr; the bin directory is printed on stdout.
#
# The tools module is test/istiod/tools (its own module: Istio pins its own
# k8s.io versions). A cold build of pilot-discovery takes about 3.5 minutes
# on 2 cores; hbone-interop then takes seconds, as it shares most packages.
# Concurrent runs serialise on a lock. Requires flock and setsid
# (util-linux).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tools=$root/test/istiod/tools
ctltools=$root/test/istiod/istioctl
crds=crd-all.gen.yaml
gwcrds=gateway-api-crd.yaml
chart=istio-discovery
ingress=istio-ingress
samples=(samples/bookinfo/networking/bookinfo-gateway.yaml samples/bookinfo/gateway-api/bookinfo-gateway.yaml)
all=(pilot-discovery hbone-interop)

die() { echo "istiod-bin: $*" >&2; exit 1; }
say() { echo "istiod-bin: $*" >&2; }

# The istio.io/istio requirement, in a require block or on a line of its own.
istio_version() {
  awk '$1 == "require" { $1 = "" ; $0 = $0 }
    $1 == "istio.io/istio" && $2 ~ /^v/ { print $2; exit }' "$1/go.mod"
}
version=$(istio_version "$tools")
[ -n "$version" ] || die "cannot read the istio.io/istio version from $tools/go.mod"

cache=${ISTIOD_CACHE_DIR:-$root/.cache/istiod}/$version
bin=$cache/bin
stamps=$cache/stamp

check=
if [ "${1-}" = -check ]; then check=1; shift; fi
names=("$@")
[ ${#names[@]} -gt 0 ] || names=("${all[@]}")
for n in "${names[@]}"; do
  case $n in
  pilot-discovery | hbone-interop) ;;
  istioctl)
    [ "$(istio_version "$ctltools")" = "$version" ] ||
      die "$ctltools/go.mod requires istio.io/istio $(istio_version "$ctltools"), $tools/go.mod $version: make them agree"
    ;;
  *) die "usage: hack/istiod-bin.sh [-check] [pilot-discovery|hbone-interop|istioctl...]" ;;
  esac
done

command -v go >/dev/null || die "go is not in PATH"
mkdir -p "$bin" "$stamps"

# pkg NAME: the package NAME is built from; dir NAME: in which module.
pkg() {
  case $1 in
  pilot-discovery) echo istio.io/istio/pilot/cmd/pilot-discovery ;;
  hbone-interop) echo ./hbone-interop ;;
  istioctl) echo istio.io/istio/istioctl/cmd/istioctl ;;
  esac
}
dir() {
  case $1 in
  istioctl) echo "$ctltools" ;;
  *) echo "$tools" ;;
  esac
}

# stamp NAME: what NAME was built from. The tools module's go.mod (less
# comment lines) and go.sum cover every version that went into it;
# hbone-interop's own source is hashed too, file names included.
modhash() {
  local m=${1:-$tools}
  { grep -v '^[[:space:]]*//' "$m/go.mod"; cat "$m/go.sum"; } | sha256sum | cut -d' ' -f1
}
stamp() {
  case $1 in
  pilot-discovery) printf '%s %s\n' "$1" "$(modhash)" ;;
  istioctl) printf '%s %s\n' "$1" "$(modhash "$ctltools")" ;;
  hbone-interop)
    printf '%s %s\n' "$1" "$({
      modhash
      (cd "$tools" && find hbone-interop -type f -name '*.go' | LC_ALL=C sort | while read -r f; do
        printf '%s\n' "$f"
        cat "$f"
      done)
    } | sha256sum | cut -d' ' -f1)"
    ;;
  esac
}

# built NAME: the binary matches its stamp. fresh NAME: and the files that
# come with it are there (a cache from before a file was added gets the
# file copied, not the binary rebuilt).
built() {
  [ -x "$bin/$1" ] && [ "$(cat "$stamps/$1" 2>/dev/null)" = "$(stamp "$1")" ]
}
fresh() {
  built "$1" || return 1
  [ "$1" != pilot-discovery ] || { [ -s "$bin/$crds" ] && [ -s "$bin/$gwcrds" ] && [ -s "$bin/$chart/Chart.yaml" ] &&
    [ -s "$bin/$ingress/Chart.yaml" ] && [ -s "$bin/${samples[0]}" ] && [ -s "$bin/${samples[1]}" ]; }
}

# copy_crds: the CRD files and istiod's chart from the very module the
# binary was built from, so they always match. The module cache is
# read-only; the copies are made writable so a later copy can replace them.
copy_crds() {
  local src
  src=$(cd "$tools" && GOWORK=off GOFLAGS=-mod=readonly go list -m -f '{{.Dir}}' istio.io/istio)
  [ -n "$src" ] && [ -s "$src/manifests/charts/base/files/$crds" ] ||
    die "no $crds in istio.io/istio $version at ${src:-?}/manifests/charts/base/files"
  [ -s "$src/tests/integration/pilot/testdata/$gwcrds" ] ||
    die "no $gwcrds in istio.io/istio $version at $src/tests/integration/pilot/testdata"
  cp -f "$src/manifests/charts/base/files/$crds" "$bin/.$crds.tmp"
  mv -f "$bin/.$crds.tmp" "$bin/$crds"
  cp -f "$src/tests/integration/pilot/testdata/$gwcrds" "$bin/.$gwcrds.tmp"
  mv -f "$bin/.$gwcrds.tmp" "$bin/$gwcrds"
  copy_chart "$src/manifests/charts/istio-control/$chart" "$chart"
  copy_chart "$src/manifests/charts/gateways/$ingress" "$ingress"
  local f
  for f in "${samples[@]}"; do
    [ -s "$src/$f" ] || die "no $f in istio.io/istio $version at $src"
    mkdir -p "$bin/$(dirname "$f")"
    cp -f "$src/$f" "$bin/$f.tmp"
    chmod u+w "$bin/$f.tmp"
    mv -f "$bin/$f.tmp" "$bin/$f"
  done
}

# copy_chart SRC NAME: the chart directory SRC as $bin/NAME, replaced whole.
copy_chart() {
  [ -s "$1/Chart.yaml" ] || die "no chart at $1 in istio.io/istio $version"
  rm -rf "$bin/.$2.copy"
  cp -R "$1" "$bin/.$2.copy"
  chmod -R u+w "$bin/.$2.copy"
  rm -rf "$bin/$2"
  mv -f "$bin/.$2.copy" "$bin/$2"
}

# stale: the requested names that need building.
stale() {
  local n
  for n in "${names[@]}"; do
    fresh "$n" || echo "$n"
  done
}

todo=$(stale)
if [ -z "$todo" ]; then
  echo "$bin"
  exit 0
fi
if [ -n "$check" ]; then
  say "not built yet or stale: $(echo $todo) (run hack/istiod-bin.sh)"
  exit 3
fi

. "$(dirname "$0")/lib/gobuild.sh"
lock_cache istiod-bin.sh
todo=$(stale) # another run may have built some meanwhile

for name in $todo; do
  if [ "$name" = pilot-discovery ] && built "$name"; then
    copy_crds
    say "copied the CRD files and chart of $version into $bin"
    continue
  fi
  case $name in
  pilot-discovery) hint="first time: several minutes" ;;
  istioctl) hint="about a minute once pilot-discovery was built" ;;
  *) hint="seconds once pilot-discovery was built" ;;
  esac
  go_build "$name" "$version" "$(dir "$name")" "$(pkg "$name")" "-s -w" "$hint"
  if [ "$name" = pilot-discovery ]; then
    copy_crds
  fi
  mv -f "$bin/.$name.tmp" "$bin/$name"
  stamp "$name" >"$stamps/$name"
  say "built $name $version in $((SECONDS - build_start))s → $bin/$name"
done
echo "$bin"
