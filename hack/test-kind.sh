#!/usr/bin/env bash
# make test-kind: the end-to-end suite on a kind cluster, the path for real
# clusters (make test runs the same walkthrough on a node on this machine).
#
#   1. checks for go, kind, Docker or Podman, kubectl, helm;
#   2. creates the kind cluster amber-e2e (control-plane + worker, kind's
#      own CNI, kindnet) unless it exists, and mounts bpffs on its nodes;
#   3. installs Istio's base and istiod charts (profile=ambient) from
#      Istio's chart repository; not istio-cni, not ztunnel: amber
#      replaces both;
#   4. builds amber's image and the test images as docker archives
#      (go run ./test/cmd/amber-cluster images, no container engine
#      needed) and loads them with `kind load image-archive`;
#   5. installs deploy/helm/amber (imagePullPolicy Never; kind's CNI
#      directories are the chart's defaults) and waits for the DaemonSet;
#   6. runs go test -tags kind -run TestKind ./test/realnode/ against the cluster;
#   7. deletes the cluster, unless KEEP=1.
#
# Environment:
#   KEEP=1            leave the cluster running; the next run reuses it
#   KIND_CLUSTER      cluster name (default amber-e2e)
#   KIND_NODE_IMAGE   kindest/node image (default: the one of your kind)
#   ISTIO_VERSION     Istio chart version (default below)
#   KIND_EXPERIMENTAL_PROVIDER=podman  use Podman (chosen automatically
#                     when docker is not installed)
#   KIND, KUBECTL, HELM  binaries to use instead of those in PATH (helm
#                     defaults to hack/helm.sh's build, kubectl to PATH,
#                     then hack/kube-bins.sh's build)
#
# ISTIO_VERSION: the istiod that make test builds is istio.io/istio at a
# 1.31-dev commit of 2026-08-27 (test/istiod/tools/go.mod); Istio publishes
# charts only for releases, so the default is a 1.30 release, the line that
# commit branched from. Pick the release your clusters run.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

cluster=${KIND_CLUSTER:-amber-e2e}
istio_version=${ISTIO_VERSION:-1.30.4}
istio_repo=https://istio-release.storage.googleapis.com/charts
state=$root/.cache/kind/$cluster
kubeconfig=$state/kubeconfig

if [ -t 2 ]; then bold=$'\033[1m' plain=$'\033[0m'; else bold='' plain=''; fi
step() { printf '\n%s==> %s%s\n' "$bold" "$*" "$plain" >&2; }
die() { printf 'test-kind: %s\n' "$*" >&2; exit 1; }

# ── 1. tools ────────────────────────────────────────────────────────────
step "checking tools"
[ "$(uname -s)" = Linux ] ||
  die "runs on Linux: the e2e package (test/realnode) and the image builder (test/cmd/amber-cluster) build for Linux only; on macOS, run it in a Linux VM"
command -v go >/dev/null || die "go is not in PATH (https://go.dev/dl/)"

kind=${KIND:-kind}
command -v "$kind" >/dev/null ||
  die "kind is not in PATH: install it (https://kind.sigs.k8s.io/docs/user/quick-start/#installation) or set KIND=/path/to/kind"

provider=${KIND_EXPERIMENTAL_PROVIDER:-}
case $provider in
  "")
    if command -v docker >/dev/null; then
      engine=docker
    elif command -v podman >/dev/null; then
      engine=podman
      export KIND_EXPERIMENTAL_PROVIDER=podman
    else
      die "neither docker nor podman is in PATH: kind runs its nodes as containers (https://docs.docker.com/engine/install/ or https://podman.io/docs/installation)"
    fi
    ;;
  docker | podman)
    engine=$provider
    command -v "$engine" >/dev/null || die "KIND_EXPERIMENTAL_PROVIDER=$provider, but $provider is not in PATH"
    ;;
  *) die "KIND_EXPERIMENTAL_PROVIDER=$provider: this script supports docker and podman" ;;
esac
"$engine" info >/dev/null 2>&1 ||
  die "'$engine info' failed: is the $engine service running, and may this user use it? ($("$engine" info 2>&1 | tail -n 1))"

# amber loads eBPF programs and attaches them to the nodes' interfaces:
# a rootless engine's nodes cannot.
case $engine in
  docker) if [[ $(docker info --format '{{.SecurityOptions}}') == *rootless* ]]; then rootless=true; else rootless=false; fi ;;
  podman) rootless=$(podman info --format '{{.Host.Security.Rootless}}') ;;
esac
[ "$rootless" != true ] ||
  die "$engine runs rootless: amber's agent loads eBPF programs, which kind nodes of a rootless engine cannot (use rootful $engine, e.g. sudo)"

# kind's nodes share the host's kernel: amber attaches with TCX (Linux 6.6).
case $engine in
  docker) kernel=$(docker info --format '{{.KernelVersion}}') ;;
  podman) kernel=$(podman info --format '{{.Host.Kernel}}') ;;
esac
major=${kernel%%.*}
minor=${kernel#*.}
minor=${minor%%[!0-9]*}
if [[ $major =~ ^[0-9]+$ && $minor =~ ^[0-9]+$ ]]; then
  if [ "$major" -lt 6 ] || { [ "$major" -eq 6 ] && [ "$minor" -lt 6 ]; }; then
    die "the kernel kind's nodes run on is $kernel: amber needs Linux ≥ 6.6 (TCX links)"
  fi
else
  echo "test-kind: cannot read the kernel version from '$kernel'; going on" >&2
fi

if [ -n "${KUBECTL:-}" ]; then
  kubectl=$KUBECTL
elif command -v kubectl >/dev/null; then
  kubectl=$(command -v kubectl)
else
  step "kubectl is not in PATH: building it (hack/kube-bins.sh kubectl; the first time takes minutes)"
  kubectl=$(bash hack/kube-bins.sh kubectl)/kubectl
fi
"$kubectl" version --client >/dev/null 2>&1 || die "$kubectl does not run ('kubectl version --client' failed)"

if [ -n "${HELM:-}" ]; then
  helm=$HELM
else
  bash hack/helm.sh
  helm=$root/.cache/bin/helm
fi
"$helm" version --short >/dev/null 2>&1 || die "$helm does not run ('helm version' failed)"

echo "   go:      $(go env GOVERSION)" >&2
echo "   kind:    $("$kind" version)" >&2
echo "   engine:  $engine (kernel $kernel)" >&2
echo "   kubectl: $kubectl" >&2
echo "   helm:    $helm $("$helm" version --short)" >&2
echo "   istio:   $istio_version from $istio_repo" >&2

k() { "$kubectl" --kubeconfig "$kubeconfig" "$@"; }
# Helm's repository cache and configuration stay in the state directory:
# the user's own Helm setup is not touched.
h() {
  HELM_CACHE_HOME=$state/helm/cache HELM_CONFIG_HOME=$state/helm/config HELM_DATA_HOME=$state/helm/data \
    "$helm" --kubeconfig "$kubeconfig" "$@"
}

# ── 2. cluster ──────────────────────────────────────────────────────────
cleanup() {
  local rc=$?
  if [ "${KEEP:-}" = 1 ]; then
    step "KEEP=1: cluster $cluster left running; export KUBECONFIG=$kubeconfig ('$kind delete cluster --name $cluster' removes it)"
  else
    step "deleting kind cluster $cluster (KEEP=1 keeps it)"
    "$kind" delete cluster --name "$cluster" || true
    rm -f "$kubeconfig"
  fi
  if [ $rc -eq 0 ]; then
    step "make test-kind passed"
  else
    step "make test-kind FAILED (status $rc)"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$state"
clusters=$("$kind" get clusters 2>/dev/null) || die "'$kind get clusters' failed"
if [[ $'\n'$clusters$'\n' == *$'\n'$cluster$'\n'* ]]; then
  step "kind cluster $cluster exists (an earlier KEEP=1 run?): reusing it"
else
  step "creating kind cluster $cluster: control-plane + worker, kindnet"
  create=(create cluster --name "$cluster" --wait 5m --config -)
  [ -z "${KIND_NODE_IMAGE:-}" ] || create+=(--image "$KIND_NODE_IMAGE")
  # kindnet gives every pod a veth to the node (ptp), the kind of primary
  # CNI amber chains into; its files are in /opt/cni/bin and
  # /etc/cni/net.d, the chart's defaults.
  "$kind" "${create[@]}" <<EOF
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking:
  disableDefaultCNI: false
nodes:
  - role: control-plane
  - role: worker
EOF
fi
"$kind" get kubeconfig --name "$cluster" >"$kubeconfig"
k wait --for=condition=Ready nodes --all --timeout=5m >/dev/null

# systemd, PID 1 of a kind node, mounts bpffs only outside containers; the
# agent pins its maps under /sys/fs/bpf/amber and may not mount anything
# itself (no CAP_SYS_ADMIN). Each node gets its own bpffs instance, so the
# nodes' pins stay apart although they share a kernel.
step "mounting bpffs at /sys/fs/bpf on every node"
for node in $("$kind" get nodes --name "$cluster"); do
  # shellcheck disable=SC2016 # expanded in the node
  "$engine" exec "$node" sh -c '[ "$(stat -f -c %T /sys/fs/bpf)" = bpf_fs ] || mount -t bpf bpf /sys/fs/bpf' ||
    die "cannot mount bpffs in node $node"
  echo "   $node: /sys/fs/bpf is bpffs" >&2
done

# ── 3. istiod ───────────────────────────────────────────────────────────
step "installing Istio $istio_version: base, istiod (profile=ambient); not istio-cni, not ztunnel (amber replaces both)"
h upgrade --install istio-base base --repo "$istio_repo" --version "$istio_version" \
  --namespace istio-system --create-namespace --wait --timeout 5m
# A test cluster: istiod's default request (500m, 2 GiB) would crowd a
# laptop's kind nodes.
h upgrade --install istiod istiod --repo "$istio_repo" --version "$istio_version" \
  --namespace istio-system --set profile=ambient \
  --set resources.requests.cpu=100m --set resources.requests.memory=256Mi \
  --wait --timeout 5m

# ── 4. images ───────────────────────────────────────────────────────────
step "building amber's image and the test images (go run ./test/cmd/amber-cluster images)"
images=$(go run ./test/cmd/amber-cluster images)
amber_ref=
while read -r ref archive; do
  [ -n "$ref" ] || continue
  [ -f "$archive" ] || die "amber-cluster images printed '$ref $archive', but there is no such archive"
  step "kind load image-archive $archive ($ref)"
  "$kind" load image-archive "$archive" --name "$cluster"
  case $ref in */amber/amber:*) amber_ref=$ref ;; esac
done <<<"$images"
[ -n "$amber_ref" ] || die "amber-cluster images printed no amber image: $images"

# ── 5. amber ────────────────────────────────────────────────────────────
reinstall=false
h status amber --namespace istio-system >/dev/null 2>&1 && reinstall=true
step "installing amber: helm upgrade --install amber deploy/helm/amber (image $amber_ref, pullPolicy Never)"
h upgrade --install amber deploy/helm/amber --namespace istio-system \
  --set image.repository="${amber_ref%:*}" --set image.tag="${amber_ref##*:}" \
  --set image.pullPolicy=Never --set logging.format=text
if $reinstall; then
  # Same reference, new content: only a restart runs the image just loaded.
  step "restarting amber's pods (the image was reloaded under the same tag)"
  k --namespace istio-system rollout restart daemonset/ztunnel
fi
step "waiting for amber's DaemonSet"
if ! k --namespace istio-system rollout status daemonset/ztunnel --timeout=5m; then
  k --namespace istio-system get pods -o wide >&2 || true
  for c in amber-agent amber-ztunnel; do
    echo "--- $c" >&2
    k --namespace istio-system logs daemonset/ztunnel -c "$c" --tail=40 >&2 || true
  done
  die "amber's DaemonSet is not ready"
fi
k --namespace istio-system get pods -o wide >&2

# ── 6. the suite ────────────────────────────────────────────────────────
step "running the e2e suite: go test -tags kind -count=1 -v -run TestKind ./test/realnode/"
AMBER_E2E_KUBECONFIG=$kubeconfig KUBECTL=$kubectl \
  go test -tags kind -count=1 -v -timeout 30m -run TestKind ./test/realnode/
