#!/usr/bin/env bash
# Configures and builds the sanitizer tree SAN_BUILD: clang-16 with
# ASan+UBSan (every report fatal) and libFuzzer's coverage instrumentation,
# one set of libraries for both the unit tests (`make asan-test`) and the
# fuzzers (`make fuzz-test`). -O0: with this much instrumentation clang
# compiles in about half the time of -O1, and the fuzzers' short CI runs
# need coverage more than speed; line tables are enough for symbolized
# reports.
set -euo pipefail
san=${1:?sanitizer build dir}
jobs=${2:-$(nproc)}
cd "$(dirname "$0")/.."
CC=clang-16 CXX=clang++-16 cmake -S . -B "$san" -G Ninja -DCELLA_WERROR=ON \
  -DCELLA_SANITIZE=ON -DCELLA_FUZZ=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O0 -gline-tables-only" \
  "-DCMAKE_C_FLAGS_RELWITHDEBINFO=-O0 -gline-tables-only" >/dev/null
cmake --build "$san" -j "$jobs" --target cella_unit_tests fuzzers
