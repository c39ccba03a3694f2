#!/usr/bin/env bash
# `make test`: the normal tree's unit and e2e tests, then the unit tests under
# ASan+UBSan and a short run of every fuzzer (both from the sanitizer tree).
#
# The sanitizer tree compiles while the e2e tests run, at the lowest CPU
# priority: TCG guests leave the cores idle whenever a test waits (grace
# periods, restarts, servers), and the compile takes only that time. The
# build runs in its own session with its autogroup's nice at 19, because
# the kernel shares CPU between autogroups first (each sandbox's supervisor
# starts its own session) and a plain `nice` only ranks within one group.
set -euo pipefail
build=${1:?build dir}
san=${2:?sanitizer build dir}
jobs=${3:-$(nproc)}
fuzz_seconds=${4:-20}
fuzz_jobs=${5:-2}
cd "$(dirname "$0")/.."

started=$SECONDS
stage() { echo "test: $1 ($((SECONDS - started)) s since start)"; }

# `make test` fills the fixture cache in the background (fill_cache.sh,
# logging here): a failed stage may come from it (no network, a mirror
# down), and nothing else would show its log.
fixture_log="$build/fixture-cache.log"
san_pid=""
on_exit() {
  local status=$?
  # Any early exit (a failed test, a CI time-out's SIGTERM, Ctrl-C) takes
  # the background compile's whole session with it.
  if [[ -n $san_pid ]]; then kill -- -"$san_pid" 2>/dev/null || true; fi
  if ((status != 0)) && [[ -s $fixture_log ]]; then
    echo "test: failed; the end of the fixture cache's log ($fixture_log):" >&2
    tail -n 30 "$fixture_log" >&2
  fi
}
trap on_exit EXIT
# Without these, a signal would end bash without running the EXIT trap.
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$san"
san_log="$san/background-build.log"
setsid -w bash -c 'echo 19 > /proc/self/autogroup 2>/dev/null || true
  exec nice -n 19 scripts/san-build.sh "$1" "$2"' san-build "$san" "$jobs" \
  >"$san_log" 2>&1 &
san_pid=$!

stage "unit and e2e tests of $build"
ctest --test-dir "$build" --output-on-failure -j "$jobs"

stage "waiting for the sanitizer build in $san"
if ! wait "$san_pid"; then
  san_pid=""
  tail -n 60 "$san_log"
  echo "test: the sanitizer build failed (log: $san_log)" >&2
  exit 1
fi
san_pid=""  # ended: its id may be another process's from now on

stage "unit tests under ASan+UBSan"
ctest --test-dir "$san" --output-on-failure -j "$jobs" -L unit

stage "fuzzers, ${fuzz_seconds} s each"
scripts/run-fuzzers.sh "$san" "$fuzz_seconds" "$fuzz_jobs"
stage "all tests passed"
