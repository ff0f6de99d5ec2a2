#!/usr/bin/env bash
# Packs what the GPU machine runs (built here, carried there): the CLI, the CUDA tests and the
# one shared library the GPU image lacks (sentencepiece), stripped and xz-compressed so the
# carried build stays under the device tool's 64 MiB. Usage: bench/gpu/pack_dist.sh [BUILD_DIR]
set -euo pipefail
build="${1:-build-cuda2}"
rm -rf "$build/dist" "$build/dist.tar.xz"
mkdir -p "$build/dist"
tests=(test_cuda_ops test_cuda_model test_cuda_batch)
# The full-checkpoint diagnostics run only in device_run.sh's all/check modes; NO_FULL_TEST=1
# leaves them out to make room for a baseline binary.
[[ -z ${NO_FULL_TEST:-} ]] && tests+=(test_cuda_full)
cp "$build/moxin-vlm" "$build/dist/"
for t in "${tests[@]}"; do cp "$build/tests/$t" "$build/dist/"; done
cp "$(ldconfig -p | awk '/libsentencepiece.so.0 /{print $NF; exit}')" "$build/dist/"
# A baseline binary for same-call comparisons (device_run.sh decode_ab, AB_BIN), when given.
[[ -n ${BASE_BIN:-} ]] && cp "$BASE_BIN" "$build/dist/moxin-vlm-base" && strip "$build/dist/moxin-vlm-base"
# A second build of the change (another compile-time choice), run by decode_ab's "extra" items.
[[ -n ${EXTRA_BIN:-} ]] && cp "$EXTRA_BIN" "$build/dist/moxin-vlm-extra" && strip "$build/dist/moxin-vlm-extra"
strip "$build/dist/moxin-vlm" "${tests[@]/#/$build/dist/}"
# xz's largest window finds the binaries' shared library code once: 21-24 MB instead of 41 MB
# with a baseline binary and the three CUDA tests (about 1.5 minutes of CPU).
XZ_OPT="${XZ_OPT:--9e -T2}" tar -C "$build/dist" -cJf "$build/dist.tar.xz" .
ls -la "$build/dist.tar.xz"
