#!/usr/bin/env bash
# Installs the Debian packages cella needs to build, test and run.
# Idempotent and quiet when everything is already present.
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build pkg-config git
  clang clang-format clang-tidy clang-16 clang-tidy-16 libclang-rt-16-dev
  libgtest-dev googletest
  nlohmann-json3-dev libcli11-dev libarchive-dev libssl-dev libcurl4-openssl-dev
  libsqlite3-dev libseccomp-dev liblz4-dev nftables iproute2
  qemu-system-x86 busybox-static erofs-utils e2fsprogs cpio kmod
  docker-registry skopeo umoci mmdebstrap apache2-utils python3 curl openssl file
  help2man zsh
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "cella: installing Debian packages: ${missing[*]}" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
