# Shared by hack/kube-bins.sh and hack/istiod-bin.sh: one cached build at a
# time, a build that an interrupt stops completely, and visible progress.
# The caller defines say, die, $cache (lock file directory) and $bin
# (output directory), and sources this file.

# lock_cache SCRIPT: serialise concurrent runs (parallel test packages):
# two cold builds at once would need twice the memory and time.
lock_cache() {
  local tool
  for tool in flock setsid; do
    command -v $tool >/dev/null || die "$tool is not in PATH (Debian package util-linux)"
  done
  exec 9>"$cache/.lock"
  if ! flock -n 9; then
    say "waiting for another $1 run to finish building…"
    flock 9
  fi
}

# The build runs in its own process group (setsid) so that an interrupted
# run — ^C, or the SIGTERM a test sends when its deadline nears or the test
# binary dies — stops the go command and every compiler it started, not
# just the script.
build_pid=
build_cleanup() {
  if [ -n "$build_pid" ]; then
    kill -TERM -- "-$build_pid" 2>/dev/null || true
    wait "$build_pid" 2>/dev/null || true
  fi
  rm -f "$bin"/.*.tmp
}
trap build_cleanup EXIT
trap 'say "interrupted"; exit 143' TERM INT HUP

# go_build NAME VERSION DIR PKG LDFLAGS FIRST: builds PKG from the tools
# module in DIR into $bin/.NAME.tmp, saying it is alive every 30 s (go
# build is silent for minutes on a cold cache); FIRST is the hint shown
# when NAME was never built. The caller moves the result into place.
go_build() {
  local n=$1 version=$2 dir=$3 pkg=$4 ldflags=$5 first=
  [ -e "$bin/$n" ] || first=" ($6)"
  say "building $n $version$first…"
  build_start=$SECONDS
  (cd "$dir" && GOWORK=off CGO_ENABLED=0 GOFLAGS=-mod=readonly \
    exec setsid go build -trimpath -ldflags "$ldflags" -o "$bin/.$n.tmp" "$pkg") &
  build_pid=$!
  # Short sleeps keep the signal trap responsive.
  local next=$((build_start + 30))
  while kill -0 "$build_pid" 2>/dev/null; do
    sleep 1
    if [ $SECONDS -ge $next ] && kill -0 "$build_pid" 2>/dev/null; then
      say "… still building $n ($((SECONDS - build_start))s)"
      next=$((next + 30))
    fi
  done
  local rc=0
  wait "$build_pid" || rc=$?
  build_pid=
  [ $rc -eq 0 ] || die "building $n $version from $dir failed with status $rc (see the go build output above)"
}
