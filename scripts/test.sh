#!/usr/bin/env bash
# The test command (README, .ci/run): installs what is missing, builds the release and the
# AddressSanitizer + UndefinedBehaviorSanitizer configurations with warnings as errors,
# generates the random-weight test checkpoints, and runs every test in both builds.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)

scripts/setup.sh
scripts/make_test_checkpoints.sh

cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOXIN_WERROR=ON >/dev/null
cmake --build build -j "$jobs"
ctest --test-dir build --output-on-failure -j "$jobs"

# CUDA code cannot run without a GPU, so the sanitizer build leaves the CUDA backend out.
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOXIN_SANITIZE=ON \
  -DMOXIN_WERROR=ON -DMOXIN_CUDA=OFF >/dev/null
cmake --build build-asan -j "$jobs"
# The real-size towers run the same code as the tiny ones at 200x the arithmetic; under the
# sanitizers they would only add time, so that one parity case runs in the release build alone.
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir build-asan --output-on-failure -j "$jobs" -E "real_towers"
