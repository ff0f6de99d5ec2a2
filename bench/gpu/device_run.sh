#!/usr/bin/env bash
# One call on the GPU machine: unpack the binaries built on the CPU machine (build-cuda/
# dist.tar.xz: moxin-vlm, test_cuda_ops, test_cuda_model, libsentencepiece), generate the
# test checkpoints and the full-size checkpoint in the background, run the CUDA tests, then
# the benchmark. Logs go to $OUT (or ./gpu-out).
#
# Usage (from the repository root): bench/gpu/device_run.sh [tests|bench|all]
set -uo pipefail
what="${1:-all}"
out="${OUT:-$PWD/gpu-out}"
mkdir -p "$out"
repo="$PWD"
# The tests find their fixtures through the source path compiled into them.
if [[ ! -e /work/main ]]; then mkdir -p /work && ln -s "$repo" /work/main; fi
dist=/tmp/moxin-dist
mkdir -p "$dist" && tar -C "$dist" -xJf build-cuda/dist.tar.xz
export LD_LIBRARY_PATH="$dist:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi -L | tee "$out/gpu.txt"
ldd "$dist/moxin-vlm" | grep -i "not found" && echo "missing libraries" 

if [[ $what != tests ]]; then
  [[ -f /tmp/moxin-full/config.json ]] || \
    (python3 reference/make_checkpoints.py --variant full --out /tmp/moxin-full \
       >/tmp/gen_full.log 2>&1; echo "full: rc=$?" >>/tmp/gen_full.log) &
fi
if [[ $what != bench ]]; then
  for v in tiny-hf tiny-native tiny-f32 real-towers; do
    (python3 reference/make_checkpoints.py --variant "$v" --out "tests/fixtures/checkpoints/$v" \
       >"/tmp/gen_$v.log" 2>&1) &
  done
  echo "== test_cuda_ops"
  timeout 180 "$dist/test_cuda_ops" 2>&1 | tee "$out/test_cuda_ops.log" | grep -E "OK|FAIL|Failure|rel|PASSED|SKIPPED|error"
  while pgrep -f "make_checkpoints.py --variant (tiny|real)" >/dev/null; do sleep 2; done
  echo "== test_cuda_model"
  timeout 240 "$dist/test_cuda_model" 2>&1 | tee "$out/test_cuda_model.log" | grep -E "OK|FAIL|Failure|cuda|greedy|host time|PASSED|SKIPPED|error|Expected|Which|actual"
fi
if [[ $what != tests ]]; then
  while [[ ! -f /tmp/moxin-full/config.json ]] || pgrep -f "variant full" >/dev/null; do sleep 3; done
  tail -2 /tmp/gen_full.log
  bench/gpu/run_bench.sh "$dist/moxin-vlm" "$out" /tmp/moxin-full
fi
