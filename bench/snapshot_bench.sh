#!/usr/bin/env bash
# Snapshot benchmark: `cella standby` (command to QEMU gone) and `cella
# resume` + the first exec's output (command to output), beside a cold
# `cella run --cold @builtin true` (a kernel boot, not a warm start) measured in the same run, for each memory size
# and codec; the workload dirtied memory first (a tmpfs file of random bytes
# that stays in the guest's RAM). Prints medians, sizes and the ratios.
# Usage: bench/snapshot_bench.sh [BUILD_DIR] [RUNS] [MEMORY_SIZES] [FORMATS]
#   e.g. bench/snapshot_bench.sh build 3 "256m 1g" "file zstd"
# FORMATS are CELLA_SNAPSHOT_FORMAT values: file (the default: guest RAM in
# a sparse memory file mapped at resume), zstd or raw (the whole migration
# stream in one file). The size is what the snapshot takes on disk.
# Also the soak: SOAK=20 bench/snapshot_bench.sh build runs 20 standby/resume
# cycles of one sandbox whose main process appends a numbered line every
# 0.1 s, checks no flushed line was lost, and that no process or file leaked.
set -euo pipefail
build=${1:-build}
runs=${2:-3}
sizes=${3:-"256m 1g"}
codecs=${4:-"file zstd"}
cella="$(realpath "$build/cella")"
export CELLA_SANDBOX_HOME=$(mktemp -d /tmp/cella-snapbench-XXXXXX)
trap '"$cella" ps -aq | xargs -r "$cella" rm -f >/dev/null 2>&1; rm -rf "$CELLA_SANDBOX_HOME"' EXIT

now_ms() { date +%s%3N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# 32 MiB of random bytes in the guest's tmpfs: memory no codec can shrink.
dirty='head -c 33554432 /dev/urandom > /dev/shm/blob; n=0; while :; do n=$((n+1)); echo $n > /root/count; sleep 0.1; done'

if [[ -n "${SOAK:-}" ]]; then
  id=$("$cella" run -d @builtin sh -c 'n=0; while :; do n=$((n+1)); echo $n >> /root/lines; sync /root/lines; sleep 0.1; done')
  base_fds=$(ls /proc/$$/fd | wc -l)
  for i in $(seq "$SOAK"); do
    flushed=$("$cella" exec "$id" -- sh -c 'wc -l < /root/lines')
    "$cella" standby "$id" >/dev/null
    "$cella" resume "$id" >/dev/null
    # One read of the file: its lines must be 1..N with no gap, N >= what was flushed before.
    "$cella" exec "$id" -- cat /root/lines > "$CELLA_SANDBOX_HOME/lines"
    lines=$(wc -l < "$CELLA_SANDBOX_HOME/lines")
    seq 1 "$lines" | cmp -s - "$CELLA_SANDBOX_HOME/lines" && [[ "$lines" -ge "$flushed" ]] ||
      { echo "cycle $i: lost lines ($flushed flushed before, now $lines lines, not 1..$lines)"; exit 1; }
  done
  count=$("$cella" exec "$id" -- cat /run/cella/resume-count)
  qemus=$(pgrep -fc "qemu-system.*$id" || true)
  sups=$(pgrep -fc "__supervise $id" || true)
  echo "soak: $SOAK cycles, resume-count $count, lines intact, qemu processes $qemus, supervisors $sups, fds $(ls /proc/$$/fd | wc -l) (before $base_fds)"
  ls "$CELLA_SANDBOX_HOME"/sandboxes/"$id"
  exit 0
fi

printf '%-6s %-5s %12s %12s %14s %12s %10s %10s\n' memory codec standby_ms resume_ms snapshot_MiB cold_ms standby/cold resume/cold
for size in $sizes; do
  for codec in $codecs; do
    : > "$CELLA_SANDBOX_HOME/standby.ms"; : > "$CELLA_SANDBOX_HOME/resume.ms"; : > "$CELLA_SANDBOX_HOME/cold.ms"
    bytes=0
    for _ in $(seq "$runs"); do
      t0=$(now_ms); "$cella" run --cold @builtin true >/dev/null 2>&1; t1=$(now_ms)
      echo $((t1 - t0)) >> "$CELLA_SANDBOX_HOME/cold.ms"
      id=$(CELLA_SNAPSHOT_FORMAT=$codec "$cella" run -d --memory "$size" @builtin sh -c "$dirty")
      # wait for the workload to have dirtied its memory
      until [[ $("$cella" exec "$id" -- sh -c 'cat /root/count 2>/dev/null || echo 0') -gt 2 ]]; do sleep 0.2; done
      t0=$(now_ms); CELLA_SNAPSHOT_FORMAT=$codec "$cella" standby "$id" >/dev/null; t1=$(now_ms)
      echo $((t1 - t0)) >> "$CELLA_SANDBOX_HOME/standby.ms"
      bytes=$(du -s -B1 "$CELLA_SANDBOX_HOME"/sandboxes/"$id"/standby | cut -f1)
      t0=$(now_ms); CELLA_SNAPSHOT_FORMAT=$codec "$cella" resume "$id" >/dev/null
      "$cella" exec "$id" -- cat /root/count >/dev/null; t1=$(now_ms)
      echo $((t1 - t0)) >> "$CELLA_SANDBOX_HOME/resume.ms"
      "$cella" rm -f "$id" >/dev/null
    done
    s=$(median < "$CELLA_SANDBOX_HOME/standby.ms"); r=$(median < "$CELLA_SANDBOX_HOME/resume.ms")
    c=$(median < "$CELLA_SANDBOX_HOME/cold.ms")
    printf '%-6s %-5s %12s %12s %14.1f %12s %10.2f %10.2f\n' "$size" "$codec" "$s" "$r" \
      "$(echo "$bytes / 1048576" | bc -l)" "$c" "$(echo "$s / $c" | bc -l)" "$(echo "$r / $c" | bc -l)"
  done
done
