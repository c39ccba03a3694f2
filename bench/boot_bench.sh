#!/usr/bin/env bash
# Boot benchmark: a cold `cella run --cold -- true` (boot, init, agent,
# attach, exit, teardown; never a warm start from a template) beside a bare
# QEMU boot of the same kernel on the same machine type whose /init powers
# off at once (as the bzImage, the floor; and as the PVH ELF cella boots),
# and cella told to boot the bzImage (CELLA_KERNEL_BOOT=bzimage), measured
# in the same run, alternating. Prints medians and the
# ratio. With BASE_BUILD_DIR, that build's `cella run --cold -- true` runs in
# the same rotation too (A/B of two builds on a noisy machine: read ratios).
# Usage: bench/boot_bench.sh [BUILD_DIR] [RUNS] [BASE_BUILD_DIR]
set -euo pipefail
build=${1:-build}
runs=${2:-5}
base_build=${3:-}
cella="$build/cella"
home=$("$cella" diagnose --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["home"])')
manifest="$home/kernel/manifest"
vmlinuz=$(sed -n 's/^vmlinuz=//p' "$manifest")
khz=$("$cella" diagnose --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["tsc_khz"])')
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Baseline initramfs: static busybox, /init powers off immediately.
mkdir -p "$work/initrd/bin" "$work/initrd/dev"
cp /bin/busybox "$work/initrd/bin/busybox"
printf '#!/bin/busybox sh\n/bin/busybox poweroff -f\n' > "$work/initrd/init"
chmod +x "$work/initrd/init"
(cd "$work/initrd" && find . | cpio -o -H newc --quiet) > "$work/bare.cpio"

now_ms() { date +%s%3N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# The bare boot as a script, so `timeout` can run it. $1: the kernel.
cat > "$work/bare.sh" <<EOF
#!/usr/bin/env bash
exec qemu-system-x86_64 -M microvm -accel tcg -cpu max -smp 1 -m 512M -nodefaults -no-user-config \\
  -no-reboot -display none -serial "file:$work/bare.log" -kernel "\$1" -initrd "$work/bare.cpio" \\
  -append "console=ttyS0 panic=-1 quiet tsc_early_khz=$khz no_timer_check pci=off rdinit=/init"
EOF
chmod +x "$work/bare.sh"

# One untimed run each: builds (or finds) each build's initramfs, and the
# kernel's PVH ELF that cella boots (host/kernel/pvh.h).
"$cella" run --cold -- true >/dev/null 2>&1 || { echo "cella run failed; see: $cella run --cold -- true" >&2; exit 1; }
CELLA_KERNEL_BOOT=bzimage "$cella" run --cold -- true >/dev/null 2>&1 || { echo "cella run (bzImage) failed" >&2; exit 1; }
if [[ -n "$base_build" ]]; then
  "$base_build/cella" run --cold -- true >/dev/null 2>&1 || { echo "$base_build/cella run failed" >&2; exit 1; }
fi
pvh_elf=$(ls -t "$home"/cache/kernel/*.pvh.elf 2>/dev/null | head -1 || true)
: > "$work/bare.ms"; : > "$work/pvh.ms"; : > "$work/cella.ms"; : > "$work/bz.ms"; : > "$work/base.ms"
timed() {  # OUT_FILE COMMAND... (a failed or timed-out run is said, not counted)
  local out=$1 t0 t1 rc=0; shift
  t0=$(now_ms); timeout 120 "$@" >/dev/null 2>&1 || rc=$?; t1=$(now_ms)
  if [[ $rc -ne 0 ]]; then echo "boot: run failed (rc $rc), not counted: $*" >&2; return 0; fi
  echo $((t1 - t0)) >> "$out"
}
for i in $(seq "$runs"); do
  timed "$work/bare.ms" "$work/bare.sh" "$vmlinuz"
  if [[ -n "$pvh_elf" ]]; then timed "$work/pvh.ms" "$work/bare.sh" "$pvh_elf"; fi
  # The two builds swap places every round: a load that drifts during the
  # run then favours neither.
  if [[ -n "$base_build" && $((i % 2)) -eq 0 ]]; then
    timed "$work/base.ms" "$base_build/cella" run --cold -- true; timed "$work/cella.ms" "$cella" run --cold -- true
  else
    timed "$work/cella.ms" "$cella" run --cold -- true
    if [[ -n "$base_build" ]]; then timed "$work/base.ms" "$base_build/cella" run --cold -- true; fi
  fi
  timed "$work/bz.ms" env CELLA_KERNEL_BOOT=bzimage "$cella" run --cold -- true
done
bare_ms=$(median < "$work/bare.ms")
cella_ms=$(median < "$work/cella.ms")
bz_ms=$(median < "$work/bz.ms")
echo "boot: bare QEMU+bzImage to poweroff  median ${bare_ms} ms  (runs: $(tr '\n' ' ' < "$work/bare.ms"))"
if [[ -s "$work/pvh.ms" ]]; then
  pvh_ms=$(median < "$work/pvh.ms")
  echo "boot: bare QEMU+PVH ELF to poweroff  median ${pvh_ms} ms  (runs: $(tr '\n' ' ' < "$work/pvh.ms"))"
fi
echo "boot: cella run --cold -- true        median ${cella_ms} ms  (runs: $(tr '\n' ' ' < "$work/cella.ms"))"
echo "boot: same, CELLA_KERNEL_BOOT=bzimage median ${bz_ms} ms  (runs: $(tr '\n' ' ' < "$work/bz.ms"))"
awk -v c="$cella_ms" -v b="$bare_ms" 'BEGIN {printf "boot: ratio cella/bare = %.2fx, overhead %d ms (the floor: the bzImage as users pass it)\n", c/b, c-b}'
awk -v c="$bz_ms" -v b="$bare_ms" 'BEGIN {printf "boot: ratio cella(bzImage)/bare = %.2fx, overhead %d ms\n", c/b, c-b}'
if [[ -s "$work/pvh.ms" ]]; then
  awk -v c="$cella_ms" -v b="$pvh_ms" 'BEGIN {printf "boot: ratio cella/bare PVH = %.2fx, overhead %d ms (both boot the ELF)\n", c/b, c-b}'
fi
if [[ -n "$base_build" ]]; then
  base_ms=$(median < "$work/base.ms")
  echo "boot: $base_build run --cold -- true   median ${base_ms} ms  (runs: $(tr '\n' ' ' < "$work/base.ms"))"
  awk -v c="$base_ms" -v b="$bare_ms" 'BEGIN {printf "boot: ratio base/bare = %.2fx, overhead %d ms\n", c/b, c-b}'
  awk -v c="$cella_ms" -v b="$base_ms" 'BEGIN {printf "boot: ratio cella/base = %.2fx (of medians)\n", c/b}'
  # Each round's own ratio: robust to a load that changes between rounds.
  round=$(paste "$work/cella.ms" "$work/base.ms" | awk '{printf "%.3f\n", $1/$2}' | median)
  echo "boot: ratio cella/base = ${round}x (median of per-round ratios: $(paste "$work/cella.ms" "$work/base.ms" | awk '{printf "%.2f ", $1/$2}'))"
fi
