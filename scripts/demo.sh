#!/usr/bin/env bash
# cella's main job on its embedded default: boot a microVM from the built-in
# busybox image, run a command in it, and come back with its exit code.
set -euo pipefail
build=${1:-build}
set -x
"$build/cella" diagnose
"$build/cella" run -- sh -c 'echo "hello from $(hostname), kernel $(uname -r)"; cat /proc/cpuinfo | grep -m1 "model name"'
