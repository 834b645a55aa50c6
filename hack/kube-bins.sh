#!/usr/bin/env bash
# Builds real Kubernetes binaries (and etcd) from the Go module proxy into a
# cache, once: hack/kube-bins.sh [-check] [name...]
#
#   -check  build nothing: exit 3 if any named binary is missing or stale
#
#   names   etcd kube-apiserver kubectl kubelet kube-scheduler
#           kube-controller-manager kube-proxy, or "all";
#           default: etcd kube-apiserver kubectl (what test/kube needs)
#
# Binaries land in .cache/kube/<kube version>/bin/ (override the root with
# KUBE_CACHE_DIR). Each one has a stamp in .cache/kube/<kube version>/stamp/
# holding the hash of its tools module's go.mod and go.sum: a binary is
# rebuilt only when those change, so a warm run takes well under a second.
# Progress goes to stderr; the bin directory is printed on stdout.
#
# The tools modules live in test/kube/tools/{k8s,etcd}; see the comment in
# test/kube/tools/k8s/go.mod for why k8s.io/kubernetes needs replaces.
# A cold kube-apiserver build takes minutes and ~2.4 GB of RAM, so binaries
# are built one at a time; concurrent runs serialise on a lock. Requires
# flock and setsid (util-linux).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
k8s_tools=$root/test/kube/tools/k8s
etcd_tools=$root/test/kube/tools/etcd

die() { echo "kube-bins: $*" >&2; exit 1; }
say() { echo "kube-bins: $*" >&2; }

modversion() { # modversion GOMOD MODULE
  awk -v m="$2" '$1 == m && $2 ~ /^v/ { print $2; exit }' "$1"
}

kube_version=$(modversion "$k8s_tools/go.mod" k8s.io/kubernetes)
etcd_version=$(modversion "$etcd_tools/go.mod" go.etcd.io/etcd/server/v3)
[ -n "$kube_version" ] || die "cannot read the k8s.io/kubernetes version from $k8s_tools/go.mod"
[ -n "$etcd_version" ] || die "cannot read the etcd version from $etcd_tools/go.mod"

cache=${KUBE_CACHE_DIR:-$root/.cache/kube}/$kube_version
bin=$cache/bin
stamps=$cache/stamp

check=
if [ "${1-}" = -check ]; then check=1; shift; fi

all=(etcd kube-apiserver kubectl kubelet kube-scheduler kube-controller-manager kube-proxy)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(etcd kube-apiserver kubectl)
[ "${names[*]}" != all ] || names=("${all[@]}")
for n in "${names[@]}"; do
  case " ${all[*]} " in *" $n "*) ;; *) die "unknown binary $n (known: ${all[*]} all)" ;; esac
done

command -v go >/dev/null || die "go is not in PATH"
mkdir -p "$bin" "$stamps"

# stamp NAME: what the binary was built from. Hashing the tools module's
# go.mod (less comment lines) and go.sum covers every version and replace
# that went into it.
stamp() {
  local dir=$k8s_tools
  [ "$1" != etcd ] || dir=$etcd_tools
  printf '%s %s\n' "$1" "$({ grep -v '^[[:space:]]*//' "$dir/go.mod"; cat "$dir/go.sum"; } | sha256sum | cut -d' ' -f1)"
}

fresh() { [ -x "$bin/$1" ] && [ "$(cat "$stamps/$1" 2>/dev/null)" = "$(stamp "$1")" ]; }

missing() {
  local n out=()
  for n in "${names[@]}"; do fresh "$n" || out+=("$n"); done
  echo "${out[*]-}"
}

if [ -z "$(missing)" ]; then
  echo "$bin"
  exit 0
fi
if [ -n "$check" ]; then
  say "not built yet: $(missing) (run hack/kube-bins.sh $(missing))"
  exit 3
fi

. "$(dirname "$0")/lib/gobuild.sh"
lock_cache kube-bins.sh

build() { # build NAME
  local n=$1 dir pkg version ldflags
  if [ "$n" = etcd ]; then
    dir=$etcd_tools pkg=go.etcd.io/etcd/server/v3 version=$etcd_version
    ldflags="-s -w"
  else
    dir=$k8s_tools pkg=k8s.io/kubernetes/cmd/$n version=$kube_version
    # Without these the binaries report v0.0.0, which kubectl and the
    # kubelet's version-skew checks refuse. The same values as
    # k8s.io/kubernetes' hack/lib/version.sh, for both version packages.
    local major minor build_date
    major=${version#v}; major=${major%%.*}
    minor=${version#v*.}; minor=${minor%%.*}
    build_date=$(cd "$dir" && GOWORK=off go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)
    ldflags="-s -w"
    local pkgv
    for pkgv in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      ldflags+=" -X $pkgv.gitVersion=$version -X $pkgv.gitMajor=$major -X $pkgv.gitMinor=$minor"
      ldflags+=" -X $pkgv.gitTreeState=archive -X $pkgv.buildDate=$build_date"
    done
  fi
  local first="first time: several minutes"
  [ "$n" != etcd ] || first="first time: about a minute"
  go_build "$n" "$version" "$dir" "$pkg" "$ldflags" "$first"
  mv -f "$bin/.$n.tmp" "$bin/$n"
  stamp "$n" >"$stamps/$n"
  say "built $n $version in $((SECONDS - build_start))s → $bin/$n"
}

for n in $(missing); do build "$n"; done
echo "$bin"
