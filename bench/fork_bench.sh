#!/usr/bin/env bash
# Fork benchmark: `cella fork` of a running sandbox (a counter loop in its
# main process) to the first `cella exec` output in the copy, beside a cold
# `cella run --cold @builtin true` (a kernel boot, not a warm start) measured in the same run. Prints the medians and
# the ratio fork/cold. With COUNT=N each fork makes N copies at once (the
# time is to the first exec output in the last of them).
# Usage: bench/fork_bench.sh [BUILD_DIR] [RUNS] [MEMORY]
#   e.g. bench/fork_bench.sh build 5 256m
set -euo pipefail
build=${1:-build}
runs=${2:-5}
memory=${3:-256m}
count=${COUNT:-1}
cella="$(realpath "$build/cella")"
export CELLA_SANDBOX_HOME=$(mktemp -d /tmp/cella-forkbench-XXXXXX)
trap '"$cella" ps -aq | xargs -r "$cella" rm -f >/dev/null 2>&1; rm -rf "$CELLA_SANDBOX_HOME"' EXIT

now_ms() { date +%s%3N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

src=$("$cella" run -d --memory "$memory" @builtin sh -c 'n=0; while :; do n=$((n+1)); echo $n > /root/count; sleep 0.1; done')
until [[ $("$cella" exec "$src" -- sh -c 'cat /root/count 2>/dev/null || echo 0') -gt 2 ]]; do sleep 0.2; done

: > "$CELLA_SANDBOX_HOME/fork.ms"; : > "$CELLA_SANDBOX_HOME/cold.ms"
for _ in $(seq "$runs"); do
  t0=$(now_ms); "$cella" run --cold @builtin true >/dev/null 2>&1; t1=$(now_ms)
  echo $((t1 - t0)) >> "$CELLA_SANDBOX_HOME/cold.ms"
  t0=$(now_ms)
  ids=$("$cella" fork "$src" --count "$count")
  for id in $ids; do "$cella" exec "$id" -- cat /root/count >/dev/null; done
  t1=$(now_ms)
  echo $((t1 - t0)) >> "$CELLA_SANDBOX_HOME/fork.ms"
  # shellcheck disable=SC2086
  "$cella" rm -f $ids >/dev/null
done
f=$(median < "$CELLA_SANDBOX_HOME/fork.ms"); c=$(median < "$CELLA_SANDBOX_HOME/cold.ms")
printf '%-7s %-6s %10s %10s %10s\n' memory copies fork_ms cold_ms fork/cold
printf '%-7s %-6s %10s %10s %10.2f\n' "$memory" "$count" "$f" "$c" "$(echo "$f / $c" | bc -l)"
