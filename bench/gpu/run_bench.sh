#!/usr/bin/env bash
# The GPU benchmark of issue 5, in one run on the GPU machine:
#   1. a full-size random-weight checkpoint (real dimensions) generated into /tmp (~17 GB),
#   2. moxin-vlm bench --device cuda at bf16, 8-bit and 4-bit (group 64, quantized at load),
#   3. the HF transformers bf16 baseline on the same weights and prompt (hf_baseline.py).
# The bench JSON carries the card's measured copy bandwidth and the roofline it implies.
#
# Usage: bench/gpu/run_bench.sh MOXIN_VLM_BINARY OUT_DIR [CHECKPOINT_DIR]
set -uo pipefail
bin="$1"
out="$2"
ckpt="${3:-/tmp/moxin-full}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem \
  --format=csv | tee -a "$out/gpu.txt"
if [[ ! -f "$ckpt/config.json" ]]; then
  echo "generating the full-size checkpoint into $ckpt ..."
  python3 "$repo/reference/make_checkpoints.py" --variant full --out "$ckpt" >/tmp/gen_full.log 2>&1 || exit 1
fi
for bits in 0 8 4; do
  args=(bench --model "$ckpt" --device cuda --prompt-tokens 24 --decode-tokens 128)
  name=bf16
  if [[ $bits != 0 ]]; then args+=(--quantize "$bits" --group-size 64); name="q${bits}"; fi
  echo "== moxin-vlm $name"
  timeout 240 "$bin" "${args[@]}" >"$out/bench_${name}.json" 2>>"$out/bench.err"
  echo "rc=$?"; cat "$out/bench_${name}.json"; tail -3 "$out/bench.err"
done
echo "== HF transformers bf16"
PYTHONUNBUFFERED=1 timeout 300 python3 "$repo/bench/gpu/hf_baseline.py" --model "$ckpt" \
  --prompt-tokens 24 --decode-tokens 64 >"$out/bench_hf.json" 2>>"$out/bench.err"
echo "rc=$?"; cat "$out/bench_hf.json"; tail -5 "$out/bench.err"
