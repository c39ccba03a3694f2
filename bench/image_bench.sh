#!/usr/bin/env bash
# Pull + convert the fixture Debian image (python3, curl; ~200 MB unpacked)
# from a local registry: cella (fresh store) against the baseline
# `skopeo copy` + `umoci unpack` + `mkfs.erofs` of the same image, same run.
# Also times cella's second pull (everything cached).
#
# usage: bench/image_bench.sh [BUILD_DIR] [RUNS]
# The registries come from tests/fixtures/registry.sh (started if needed,
# stopped at the end if this script started them).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${1:-$ROOT/build}
RUNS=${2:-3}
CELLA="$BUILD/cella"
[ -x "$CELLA" ] || { echo "image_bench: $CELLA not built" >&2; exit 1; }
for t in skopeo umoci mkfs.erofs python3; do
  command -v "$t" >/dev/null || { echo "image_bench: missing $t (scripts/install-deps.sh)" >&2; exit 1; }
done

FIXTURES="$BUILD/image-fixtures"
STARTED=$("$ROOT/tests/fixtures/registry.sh" start "$FIXTURES")
WORK=$(mktemp -d /var/tmp/cella-image-bench.XXXXXX)
cleanup() {
  rm -rf "$WORK"
  if [ "$STARTED" = started ]; then "$ROOT/tests/fixtures/registry.sh" stop "$FIXTURES"; fi
}
trap cleanup EXIT

REGISTRY=$(sed -n 's/^PLAIN_REGISTRY=//p' "$FIXTURES/env")
REF="$REGISTRY/test/debian"

now() { date +%s.%N; }
elapsed() { python3 -c "print(f'{$2 - $1:.3f}')"; }

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

cella_times=() cached_times=() base_times=()
for i in $(seq "$RUNS"); do
  # cella: fresh store each run (the kernel is not needed to pull).
  home="$WORK/home-$i"
  t0=$(now)
  CELLA_HOME="$home" "$CELLA" pull "$REF" >/dev/null 2>"$WORK/cella.err" ||
    { cat "$WORK/cella.err" >&2; exit 1; }
  t1=$(now)
  CELLA_HOME="$home" "$CELLA" pull "$REF" >/dev/null 2>>"$WORK/cella.err"
  t2=$(now)
  cella_times+=("$(elapsed "$t0" "$t1")")
  cached_times+=("$(elapsed "$t1" "$t2")")
  rm -rf "$home"

  # Baseline: fetch to an OCI layout, unpack the layers, build erofs.
  b="$WORK/base-$i"
  mkdir -p "$b"
  t0=$(now)
  skopeo --insecure-policy copy --quiet --src-tls-verify=false "docker://$REF" "oci:$b/oci:debian" >/dev/null
  umoci --log error unpack --image "$b/oci:debian" "$b/bundle" >/dev/null
  mkfs.erofs --quiet "$b/rootfs.erofs" "$b/bundle/rootfs" >/dev/null
  t1=$(now)
  base_times+=("$(elapsed "$t0" "$t1")")
  rm -rf "$b"
done

c=$(printf '%s\n' "${cella_times[@]}" | median)
k=$(printf '%s\n' "${cached_times[@]}" | median)
b=$(printf '%s\n' "${base_times[@]}" | median)
echo "image: $REF ($RUNS runs, medians)"
echo "cella pull+convert (fresh store): ${c} s   [runs: ${cella_times[*]}]"
echo "baseline skopeo+umoci+mkfs.erofs: ${b} s   [runs: ${base_times[*]}]"
echo "ratio cella/baseline:             $(python3 -c "print(f'{$c / $b:.2f}')")x (goal <= 0.60x)"
echo "cella second pull (cached):       ${k} s   [runs: ${cached_times[*]}]"
