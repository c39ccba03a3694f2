#!/usr/bin/env bash
# Fork A/B of two builds: `cella fork` of a running sandbox (a counter loop,
# as in fork_bench.sh) to the first `cella exec` output in the copy, the two
# builds alternating fork by fork (each with its own source and sandbox
# home), forks 1.2 s apart. Prints each build's times and median.
# Usage: bench/fork_ab.sh BASE_BUILD_DIR NEW_BUILD_DIR [ROUNDS]
set -euo pipefail
base=$(realpath "${1:?base build dir}")
new=$(realpath "${2:?new build dir}")
rounds=${3:-8}
declare -A src home bin
bin[base]=$base/cella
bin[new]=$new/cella
cleanup() {
  for b in base new; do
    [[ -n "${home[$b]:-}" ]] || continue
    CELLA_SANDBOX_HOME=${home[$b]} "${bin[$b]}" ps -aq 2>/dev/null |
      CELLA_SANDBOX_HOME=${home[$b]} xargs -r "${bin[$b]}" rm -f >/dev/null 2>&1 || true
    rm -rf "${home[$b]}"
  done
}
trap cleanup EXIT
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
now_ms() { date +%s%3N; }

for b in base new; do
  home[$b]=$(mktemp -d /tmp/cella-forkab-$b-XXXXXX)
  src[$b]=$(CELLA_SANDBOX_HOME=${home[$b]} "${bin[$b]}" run -d --memory 256m @builtin sh -c \
    'n=0; while :; do n=$((n+1)); echo $n > /root/count; sleep 0.1; done')
  for _ in $(seq 100); do
    n=$(CELLA_SANDBOX_HOME=${home[$b]} "${bin[$b]}" exec "${src[$b]}" -- sh -c 'cat /root/count 2>/dev/null || echo 0')
    [[ $n -gt 2 ]] && break
    sleep 0.2
  done
  : > "${home[$b]}/fork.ms"
done
for _ in $(seq "$rounds"); do
  for b in base new; do
    export CELLA_SANDBOX_HOME=${home[$b]}
    sleep 1.2
    t0=$(now_ms)
    id=$("${bin[$b]}" fork "${src[$b]}")
    "${bin[$b]}" exec "$id" -- cat /root/count >/dev/null
    t1=$(now_ms)
    echo $((t1 - t0)) >> "${home[$b]}/fork.ms"
    "${bin[$b]}" rm -f "$id" >/dev/null
  done
done
for b in base new; do
  echo "$b: $(sort -n "${home[$b]}/fork.ms" | tr '\n' ' ') median $(median < "${home[$b]}/fork.ms") ms"
done
