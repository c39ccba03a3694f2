#!/usr/bin/env bash
# Warm starts: `cella run -- true` started from a memory template against
# `cella run --cold -- true` (a kernel boot), medians of RUNS each,
# interleaved in the same run; then host memory (PSS of QEMU + supervisor,
# from /proc/PID/smaps_rollup) of N idle detached sandboxes started warm
# against N started cold. Prints medians, sums and the ratios.
# Usage: bench/warm_bench.sh [BUILD_DIR] [RUNS] [N] [MEMORY]
set -euo pipefail
build=${1:-build}
runs=${2:-10}
n=${3:-10}
mem=${4:-256m}
cella="$build/cella"
export CELLA_SANDBOX_HOME
CELLA_SANDBOX_HOME=$(mktemp -d /tmp/cella-warm-bench-XXXXXX)
cleanup() {
  "$cella" ps -aq 2>/dev/null | xargs -r "$cella" rm -f >/dev/null 2>&1 || true
  rm -rf "$CELLA_SANDBOX_HOME"
}
trap cleanup EXIT

now_ms() { date +%s%3N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# The first run of the shape builds its template (timed on its own).
t0=$(now_ms); "$cella" run --memory "$mem" -- true; t1=$(now_ms)
echo "first run (builds the template, then starts from it): $((t1 - t0)) ms"
: > "$CELLA_SANDBOX_HOME/cold.ms"; : > "$CELLA_SANDBOX_HOME/warm.ms"
for _ in $(seq "$runs"); do
  t0=$(now_ms); "$cella" run --memory "$mem" --cold -- true; t1=$(now_ms)
  echo $((t1 - t0)) >> "$CELLA_SANDBOX_HOME/cold.ms"
  t0=$(now_ms); "$cella" run --memory "$mem" -- true; t1=$(now_ms)
  echo $((t1 - t0)) >> "$CELLA_SANDBOX_HOME/warm.ms"
done
cold=$(median < "$CELLA_SANDBOX_HOME/cold.ms")
warm=$(median < "$CELLA_SANDBOX_HOME/warm.ms")
echo "run -- true, median of $runs: cold ${cold} ms, warm ${warm} ms, warm/cold $(awk -v w="$warm" -v c="$cold" 'BEGIN {printf "%.3f", w / c}')"

# PSS of the sandboxes' processes: each supervisor (found by its ID) and
# every QEMU whose command line names this run's sandbox home.
pss_kib() {
  local total=0 pid id
  local pids=($(pgrep -f "qemu-system-x86_64.*$CELLA_SANDBOX_HOME" || true))
  for id in "$@"; do pids+=($(pgrep -f "__supervise $id" || true)); done
  for pid in "${pids[@]}"; do
    local v
    v=$(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup" 2>/dev/null || echo 0)
    total=$((total + ${v:-0}))
  done
  echo "$total"
}
idle() {  # $1: extra run flag ("" or --cold)
  local ids=() i
  for i in $(seq "$n"); do ids+=("$("$cella" run -d --memory "$mem" $1 -- sleep 3600)"); done
  sleep 5  # let the guests settle (idle)
  local kib
  kib=$(pss_kib "${ids[@]}")
  "$cella" rm -f "${ids[@]}" >/dev/null
  echo "$kib"
}
warm_kib=$(idle "")
cold_kib=$(idle "--cold")
echo "PSS of $n idle sandboxes ($mem): cold $((cold_kib / 1024)) MiB, warm $((warm_kib / 1024)) MiB, warm/cold $(awk -v w="$warm_kib" -v c="$cold_kib" 'BEGIN {printf "%.3f", w / c}')"
