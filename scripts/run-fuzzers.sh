#!/usr/bin/env bash
# Runs every libFuzzer target in BUILD/tests/fuzz for SECONDS each, JOBS at a
# time, starting from the committed seed corpus (copied, so CI never writes
# into the tree). Any crash, leak or time-out fails the run with its log;
# the input that caused it is kept in BUILD/fuzz-artifacts/NAME/.
set -euo pipefail
build=${1:?build dir}
seconds=${2:-20}
jobs=${3:-1}
root="$(cd "$(dirname "$0")/.." && pwd)"
work=$(mktemp -d)
# An interrupted run takes its fuzzers with it.
trap 'jobs -p | xargs -r kill 2>/dev/null; rm -rf "$work"' EXIT
shopt -s nullglob

run_one() {
  local fuzzer=$1 name
  name=$(basename "$fuzzer")
  mkdir -p "$work/$name" "$work/$name.artifacts"
  if [ -d "$root/tests/fuzz/corpus/$name" ]; then cp -r "$root/tests/fuzz/corpus/$name/." "$work/$name/"; fi
  if "$fuzzer" -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=2048 \
    -artifact_prefix="$work/$name.artifacts/" "$work/$name" 2>"$work/$name.log"; then
    echo "fuzz: $name ran ${seconds}s: $(grep -E '^Done|#[0-9]+.*DONE' "$work/$name.log" | tail -n 1)"
  else
    tail -n 40 "$work/$name.log"
    mkdir -p "$build/fuzz-artifacts/$name"
    cp -r "$work/$name.artifacts/." "$build/fuzz-artifacts/$name/" 2>/dev/null || true
    echo "fuzz: $name FAILED (inputs kept in $build/fuzz-artifacts/$name/)"
    return 1
  fi
}

fuzzers=()
for fuzzer in "$build"/tests/fuzz/fuzz_*; do
  [ -x "$fuzzer" ] && fuzzers+=("$fuzzer")
done
if [ "${#fuzzers[@]}" -eq 0 ]; then echo "fuzz: no fuzzers found in $build/tests/fuzz" >&2; exit 1; fi

# At most `jobs` running at once; every failure is reported, then the run fails.
failed=0
running=()
for fuzzer in "${fuzzers[@]}"; do
  run_one "$fuzzer" &
  running+=("$!")
  if [ "${#running[@]}" -ge "$jobs" ]; then
    wait "${running[0]}" || failed=1
    running=("${running[@]:1}")
  fi
done
for pid in "${running[@]}"; do wait "$pid" || failed=1; done
if [ "$failed" -ne 0 ]; then echo "fuzz: a fuzzer failed (see above)" >&2; exit 1; fi
echo "fuzz: ${#fuzzers[@]} fuzzers ran clean"
