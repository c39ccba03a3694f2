#!/usr/bin/env bash
# Runs every libFuzzer target in BUILD/tests/fuzz for SECONDS each, starting
# from the committed seed corpus (copied, so CI never writes into the tree).
set -euo pipefail
build=${1:?build dir}
seconds=${2:-20}
root="$(cd "$(dirname "$0")/.." && pwd)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
shopt -s nullglob
ran=0
for fuzzer in "$build"/tests/fuzz/fuzz_*; do
  [ -x "$fuzzer" ] || continue
  name=$(basename "$fuzzer")
  mkdir -p "$work/$name"
  if [ -d "$root/tests/fuzz/corpus/$name" ]; then cp -r "$root/tests/fuzz/corpus/$name/." "$work/$name/"; fi
  echo "fuzz: $name for ${seconds}s"
  "$fuzzer" -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=2048 \
    -artifact_prefix="$work/" "$work/$name" 2>"$work/$name.log" || {
    tail -n 40 "$work/$name.log"; echo "fuzz: $name FAILED"; exit 1; }
  grep -E "^Done|#[0-9]+.*DONE" "$work/$name.log" | tail -n 1 || true
  ran=$((ran + 1))
done
if [ "$ran" -eq 0 ]; then echo "fuzz: no fuzzers found in $build/tests/fuzz" >&2; exit 1; fi
echo "fuzz: $ran fuzzers ran clean"
