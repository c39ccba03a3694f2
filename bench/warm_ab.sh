#!/usr/bin/env bash
# Warm-start A/B of two builds: `cella run -- true` (as bench/warm_bench.sh) from a memory
# template, the two builds alternating run by run (each with its own sandbox
# home; the first run of each builds its template and is not counted).
# Prints each build's times and median.
# Usage: bench/warm_ab.sh BASE_BUILD_DIR NEW_BUILD_DIR [ROUNDS] [MEMORY]
set -euo pipefail
base=$(realpath "${1:?base build dir}")
new=$(realpath "${2:?new build dir}")
rounds=${3:-10}
memory=${4:-256m}
declare -A home bin
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
  home[$b]=$(mktemp -d /tmp/cella-warmab-$b-XXXXXX)
  # The first run of the shape boots cold and leaves the template; the
  # second makes sure the warm path works before anything is counted.
  CELLA_SANDBOX_HOME=${home[$b]} "${bin[$b]}" run --memory "$memory" -- true
  CELLA_SANDBOX_HOME=${home[$b]} "${bin[$b]}" run --memory "$memory" -- true
  : > "${home[$b]}/warm.ms"
done
for _ in $(seq "$rounds"); do
  for b in base new; do
    export CELLA_SANDBOX_HOME=${home[$b]}
    sleep 0.3
    t0=$(now_ms)
    "${bin[$b]}" run --memory "$memory" -- true
    t1=$(now_ms)
    echo $((t1 - t0)) >> "${home[$b]}/warm.ms"
  done
done
for b in base new; do
  echo "$b: $(sort -n "${home[$b]}/warm.ms" | tr '\n' ' ') median $(median < "${home[$b]}/warm.ms") ms"
done
