#!/usr/bin/env bash
# Builds CoreDNS (test/cluster/tools/coredns, from the Go module proxy) into
# the real node's cache, once: hack/coredns.sh [-stamp]
#
#   -stamp  build nothing: print the stamp of the sources
#
# The binary lands in .cache/cluster/bin/coredns (override the directory
# with CLUSTER_CACHE_DIR) next to coredns.stamp, the SHA-256 of the tools
# module's go.mod, go.sum and main.go: the stamp test/cluster's Start
# computes, so either builds and both reuse. make test runs this before
# go test, so that no test's deadline includes a cold build (≈ 2 min on 2
# idle cores, 10 on a loaded machine). Concurrent runs serialise on a
# lock. Progress goes to stderr; the binary's path is printed on stdout.
# Requires flock and setsid (util-linux).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
src=$root/test/cluster/tools/coredns

die() { echo "coredns: $*" >&2; exit 1; }
say() { echo "coredns: $*" >&2; }

version=$(awk '$1 == "require" { $1 = "" ; $0 = $0 }
  $1 == "github.com/coredns/coredns" && $2 ~ /^v/ { print $2; exit }' "$src/go.mod")
[ -n "$version" ] || die "cannot read the github.com/coredns/coredns version from $src/go.mod"
stamp=$(cat "$src/go.mod" "$src/go.sum" "$src/main.go" | sha256sum | cut -d' ' -f1)
if [ "${1-}" = -stamp ]; then
  echo "$stamp"
  exit 0
fi
[ $# -eq 0 ] || die "usage: hack/coredns.sh [-stamp]"

cache=${CLUSTER_CACHE_DIR:-$root/.cache/cluster}
bin=$cache/bin
mkdir -p "$bin"
fresh() { [ -x "$bin/coredns" ] && [ "$(cat "$bin/coredns.stamp" 2>/dev/null)" = "$stamp" ]; }
if fresh; then
  echo "$bin/coredns"
  exit 0
fi
command -v go >/dev/null || die "go is not in PATH"

. "$(dirname "$0")/lib/gobuild.sh"
lock_cache coredns.sh
if ! fresh; then
  go_build coredns "$version" "$src" . "-s -w" "first time: about 2 minutes"
  mv -f "$bin/.coredns.tmp" "$bin/coredns"
  printf '%s' "$stamp" >"$bin/coredns.stamp"
  say "built coredns in $((SECONDS - build_start))s → $bin/coredns"
fi
echo "$bin/coredns"
