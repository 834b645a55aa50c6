#!/usr/bin/env bash
# Builds Helm from the Go module proxy into .cache/bin once (tests render
# charts with it; make test puts .cache/bin on PATH) and prints that
# directory on stdout. With -check it builds nothing and exits 3 when Helm
# is missing or another version.
set -euo pipefail
cd "$(dirname "$0")/.."
version=v3.19.0
bin=.cache/bin/helm
if [ -x "$bin" ] && "$bin" version --short 2>/dev/null | grep -q "^${version}"; then
  echo "$PWD/.cache/bin"
  exit 0
fi
if [ "${1-}" = -check ]; then
  echo "helm: ${version} not built yet (run hack/helm.sh)" >&2
  exit 3
fi
echo "helm: building ${version} from the Go module proxy (first time: a few minutes)…" >&2
mkdir -p .cache/bin
GOBIN="$PWD/.cache/bin" CGO_ENABLED=0 go install -ldflags "-X helm.sh/helm/v3/internal/version.version=${version}" "helm.sh/helm/v3/cmd/helm@${version}"
echo "$PWD/.cache/bin"
