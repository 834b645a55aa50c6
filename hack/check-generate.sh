#!/usr/bin/env bash
# Regenerates the bpf2go output and the workload API protos and fails when
# the result differs from the files in the tree (committed ones, in CI's
# clean clone): the committed output must be what the sources produce.
set -euo pipefail
cd "$(dirname "$0")/.."
generated() { find bpf xds -type f \( -name '*_bpfel.go' -o -name '*_bpfel.o' -o -name '*.pb.go' \) 2>/dev/null | sort; }
before=$(generated | xargs -r sha256sum)
go generate ./...
after=$(generated | xargs -r sha256sum)
if [ "$before" != "$after" ]; then
  diff <(echo "$before") <(echo "$after") >&2 || true
  echo "generated files drifted: run 'make generate' and commit the result" >&2
  exit 1
fi
