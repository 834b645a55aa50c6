#!/usr/bin/env bash
# Installs the Debian packages the build and the tests need, once.
# A fresh CI machine has only Go, gcc and git.
set -euo pipefail
pkgs=(
  clang llvm libbpf-dev linux-libc-dev   # bpf2go (make generate)
  bpftool iproute2 nftables tcpdump util-linux  # datapath tests, amberctl docs, benchmarks
  protobuf-compiler libprotobuf-dev        # xds/workloadapi generation (protoc + well-known types)
  containerd runc containernetworking-plugins  # the real Kubernetes node (test/cluster); amber-cluster runs containerd itself
  haproxy linux-perf                       # make bench-tunnel: HAProxy's mTLS pair as a peer; perf for -profile
)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
