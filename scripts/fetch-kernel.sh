#!/usr/bin/env bash
# Fetches the default guest kernel (Debian's cloud kernel, pinned in
# src/host/kernel/kernel.pin) into <cella home>/kernel/<version>/ without
# installing it on the host: `apt-get download` + sha256 check + `dpkg-deb -x`.
# Writes <home>/kernel/manifest (key=value lines) that FindKernel() reads.
# Idempotent: exits at once when the manifest names an existing kernel.
#
# Home: $CELLA_HOME, else /var/lib/cella as root, else
# ${XDG_DATA_HOME:-~/.local/share}/cella (same rule as src/host/os/paths.h).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# CELLA_KERNEL_PIN: another pin file (used to test the fallback path).
PIN="${CELLA_KERNEL_PIN:-$ROOT/src/host/kernel/kernel.pin}"

if [ -n "${CELLA_HOME:-}" ]; then
  HOME_DIR="$CELLA_HOME"
elif [ "$(id -u)" -eq 0 ]; then
  HOME_DIR=/var/lib/cella
else
  HOME_DIR="${XDG_DATA_HOME:-$HOME/.local/share}/cella"
fi
KDIR="$HOME_DIR/kernel"
MANIFEST="$KDIR/manifest"

pin() { sed -n "s/^$1=//p" "$PIN"; }
manifest_get() { sed -n "s/^$1=//p" "$MANIFEST"; }

if [ -f "$MANIFEST" ]; then
  vmlinuz="$(manifest_get vmlinuz)"
  modules="$(manifest_get modules_dir)"
  if [ -f "$vmlinuz" ] && [ -f "$modules/modules.dep" ]; then
    exit 0
  fi
fi

META="$(pin metapackage)"
PACKAGE="$(pin package)"
VERSION="$(pin version)"
SHA256="$(pin sha256)"
NOTICE=""

have_version() {  # package version -> 0 when apt can download exactly that
  # apt-cache exits 0 even for an unknown version: look for it in the output.
  # Not `grep -q`: it exits at the first match, apt-cache dies of SIGPIPE,
  # and pipefail turns the match into a failure.
  apt-cache show "$1=$2" 2>/dev/null | grep -x "Version: $2" >/dev/null
}

if ! have_version "$PACKAGE" "$VERSION"; then
  echo "cella: refreshing the Debian package lists (apt-get update)" >&2
  SUDO=""; if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
fi
if ! have_version "$PACKAGE" "$VERSION"; then
  # The archive keeps only the current kernel ABI: follow the metapackage.
  NEW_PACKAGE="$(apt-cache depends "$META" | awk '/Depends: linux-image-/{print $2; exit}')"
  if [ -z "$NEW_PACKAGE" ]; then
    echo "cella: neither $PACKAGE=$VERSION nor $META is in the Debian archive" >&2
    exit 1
  fi
  NEW_VERSION="$(apt-cache show "$NEW_PACKAGE" | sed -n 's/^Version: //p' | head -n1)"
  NOTICE="pinned $PACKAGE=$VERSION is no longer in the archive; used $META's dependency $NEW_PACKAGE=$NEW_VERSION"
  echo "cella: notice: $NOTICE (update src/host/kernel/kernel.pin)" >&2
  PACKAGE="$NEW_PACKAGE"
  VERSION="$NEW_VERSION"
  # No pinned hash for this one: check against the archive's signed index.
  SHA256="$(apt-cache show "$PACKAGE=$VERSION" | sed -n 's/^SHA256: //p' | head -n1)"
fi

mkdir -p "$KDIR"
WORK="$(mktemp -d "$KDIR/.fetch.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

echo "cella: downloading guest kernel $PACKAGE=$VERSION" >&2
APT_OPTS=()
# As root, apt hands the download to the _apt user, which cannot write into
# our private work dir; downloading as root there is what it falls back to.
if [ "$(id -u)" -eq 0 ]; then APT_OPTS=(-o APT::Sandbox::User=root); fi
(cd "$WORK" && apt-get download -qq "${APT_OPTS[@]}" "$PACKAGE=$VERSION" >/dev/null)
DEB="$(ls "$WORK"/*.deb)"
GOT="$(sha256sum "$DEB" | cut -d' ' -f1)"
if [ "$GOT" != "$SHA256" ]; then
  echo "cella: $DEB: sha256 $GOT does not match expected $SHA256" >&2
  exit 1
fi

dpkg-deb -x "$DEB" "$WORK/root"
KVER="$(ls "$WORK/root/lib/modules")"
if [ "$(echo "$KVER" | wc -l)" -ne 1 ] || [ ! -f "$WORK/root/boot/vmlinuz-$KVER" ]; then
  echo "cella: unexpected layout in $DEB (lib/modules: $KVER)" >&2
  exit 1
fi
# The .deb ships no modules.dep (depmod runs at install time): generate it
# for the unpacked tree, without touching the host's /lib/modules.
if [ ! -f "$WORK/root/lib/modules/$KVER/modules.dep" ]; then
  DEPMOD="$(PATH="$PATH:/usr/sbin:/sbin" command -v depmod || true)"
  if [ -z "$DEPMOD" ]; then
    echo "cella: depmod not found: install Debian's kmod package (scripts/install-deps.sh does)" >&2
    exit 1
  fi
  "$DEPMOD" -b "$WORK/root" "$KVER"
fi

DEST="$KDIR/$VERSION"
rm -rf "$DEST"
mv "$WORK/root" "$DEST"

TMP_MANIFEST="$KDIR/.manifest.tmp"
{
  echo "package=$PACKAGE"
  echo "version=$VERSION"
  echo "kernel_release=$KVER"
  echo "deb_sha256=$GOT"
  echo "vmlinuz=$DEST/boot/vmlinuz-$KVER"
  echo "modules_dir=$DEST/lib/modules/$KVER"
  if [ -n "$NOTICE" ]; then echo "notice=$NOTICE"; fi
} >"$TMP_MANIFEST"
mv "$TMP_MANIFEST" "$MANIFEST"
echo "cella: guest kernel ready: $DEST/boot/vmlinuz-$KVER" >&2
