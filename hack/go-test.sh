#!/usr/bin/env bash
# go test on every package, with the flags given. With CI=true a skipped
# test fails the run: CI runs as root with every tool the tiers need, so a
# skip there is a tier that silently did not run. (Privileged tests and the
# build cache already fail instead of skipping when CI=true; this catches
# every other skip.)
set -uo pipefail
if [ "${CI:-}" != true ]; then
  exec "${GO:-go}" test "$@" ./...
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
"${GO:-go}" test -v "$@" ./... 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
if skipped=$(grep -E '^[[:space:]]*--- SKIP: ' "$log"); then
  echo >&2
  echo "CI=true: these tests skipped, and CI must run every test:" >&2
  echo "$skipped" >&2
  exit 1
fi
exit "$rc"
