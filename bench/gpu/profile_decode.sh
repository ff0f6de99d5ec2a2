#!/usr/bin/env bash
# Nsight Compute counters for the decode products of one format, on the GPU machine: the first
# single-row GEMV launches after tuning, with the sections that say whether a kernel is bound by
# memory, by arithmetic or by latency (occupancy, warp stall reasons).
# Usage: bench/gpu/profile_decode.sh MOXIN_VLM_BINARY CHECKPOINT_DIR OUT_FILE [BITS]
set -uo pipefail
bin="$1"
ckpt="$2"
out="$3"
bits="${4:-4}"
quant=()
[[ $bits != 16 ]] && quant=(--quantize "$bits" --group-size 64)
# Skip the tuning launches (each shape times its variants once) and profile 12 decode products.
timeout 400 ncu --kernel-name regex:gemv --launch-skip 400 --launch-count 12 \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
  --section LaunchStats --section WarpStateStats --section ComputeWorkloadAnalysis \
  "$bin" bench --model "$ckpt" --device cuda --prompt-tokens 24 --decode-tokens 4 "${quant[@]}" \
  >"$out" 2>&1
echo "ncu rc=$?"
grep -E "gemv|Duration|DRAM Throughput|Memory Throughput|Compute \(SM\)|Achieved Occupancy|Registers Per|Theoretical Occupancy|Block Limit|Stall|Issue Slots|Executed Ipc" "$out" | head -150
