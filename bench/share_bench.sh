#!/bin/sh
# Host directory share against the guest's own writable layer (ext4
# upper.img of a detached sandbox), in the same VM and the same run, once per
# share transport (FUSE over the agent link, the default; virtiofs): write a
# 200 MB file (fsync), read it back with cold caches, untar 5,000 small
# files. Prints seconds for each and the ratio share/own (>1: slower).
#
#   bench/share_bench.sh [BUILD_DIR] [TRANSPORTS]
#   TRANSPORTS: default "fuse virtiofs" (virtiofs needs root; skipped with a
#   note otherwise)
set -eu
BUILD=${1:-build}
TRANSPORTS=${2:-fuse virtiofs}
CELLA="$BUILD/cella"
WORK=$(mktemp -d /tmp/cella-share-bench-XXXXXX)
export CELLA_SANDBOX_HOME="$WORK/home"
ID=
cleanup() {
  [ -n "$ID" ] && "$CELLA" rm -f "$ID" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$WORK/share" "$WORK/tree"
i=0
while [ $i -lt 5000 ]; do
  d="$WORK/tree/d$((i / 100))"
  [ -d "$d" ] || mkdir "$d"
  printf 'file %d\n' $i >"$d/f$i"
  i=$((i + 1))
done
tar -C "$WORK/tree" -cf "$WORK/share/tree.tar" .
rm -rf "$WORK/tree"

for transport in $TRANSPORTS; do
if [ "$transport" = virtiofs ] && [ "$(id -u)" != 0 ]; then
  echo "($transport skipped: needs root)"
  continue
fi
ID=$(CELLA_SHARE_TRANSPORT=$transport "$CELLA" run -d --memory 512m -v "$WORK/share:/mnt/share")
# Timings in the guest from /proc/uptime (10 ms resolution; each step takes
# seconds under TCG).
"$CELLA" exec "$ID" -- sh -c '
now() { cut -d" " -f1 /proc/uptime; }
step() {  # step NAME DIR
  dir=$2; rm -rf "$dir/b"; mkdir -p "$dir/b"
  t0=$(now); dd if=/dev/zero of="$dir/b/big" bs=1M count=200 conv=fsync 2>/dev/null; t1=$(now)
  sync; echo 3 > /proc/sys/vm/drop_caches
  t2=$(now); dd if="$dir/b/big" of=/dev/null bs=1M 2>/dev/null; t3=$(now)
  rm -f "$dir/b/big"; mkdir "$dir/b/t"
  t4=$(now); tar -C "$dir/b/t" -xf /mnt/share/tree.tar; sync; t5=$(now)
  echo "$1 $(awk "BEGIN{print $t1-$t0}") $(awk "BEGIN{print $t3-$t2}") $(awk "BEGIN{print $t5-$t4}")"
  rm -rf "$dir/b"
}
step own /var/tmp
step share /mnt/share
' >"$WORK/times"
"$CELLA" rm -f "$ID" >/dev/null
ID=
echo "== share over $transport"
awk '
  $1 == "own" { ow = $2; or = $3; ot = $4 }
  $1 == "share" { sw = $2; sr = $3; st = $4 }
  END {
    printf "%-28s %10s %10s %8s\n", "", "own (s)", "share (s)", "ratio"
    printf "%-28s %10.2f %10.2f %7.2fx\n", "write 200 MB + fsync", ow, sw, sw / ow
    printf "%-28s %10.2f %10.2f %7.2fx\n", "read 200 MB (cold cache)", or, sr, sr / or
    printf "%-28s %10.2f %10.2f %7.2fx\n", "untar 5,000 files + sync", ot, st, st / ot
  }' "$WORK/times"
done
