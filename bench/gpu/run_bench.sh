#!/usr/bin/env bash
# The GPU benchmark of issue 5, in one run on the GPU machine:
#   1. a full-size random-weight checkpoint (real dimensions) generated into /tmp (~17 GB),
#   2. moxin-vlm bench --device cuda at bf16, 8-bit and 4-bit (group 64, quantized at load),
#   3. batched decoding at bf16: aggregate eager decode tokens/s for 1, 8 and 32 sequences
#      (bench --batch N: decode_tok_s_aggregate = N * steps / seconds),
#   4. the HF transformers bf16 baseline on the same weights and prompt (hf_baseline.py).
# The bench JSON carries the card's measured copy bandwidth and the roofline it implies.
#
# Usage: bench/gpu/run_bench.sh MOXIN_VLM_BINARY OUT_DIR [CHECKPOINT_DIR]
set -uo pipefail
bin="$1"
out="$2"
ckpt="${3:-/tmp/moxin-full}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
mkdir -p "$out"
export MOXIN_CUDA_TUNE_LOG=1  # the GEMV variant chosen per shape, into bench.err
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem \
  --format=csv | tee -a "$out/gpu.txt"
if [[ ! -f "$ckpt/config.json" ]]; then
  echo "generating the full-size checkpoint into $ckpt ..."
  python3 "$repo/reference/make_checkpoints.py" --variant full --out "$ckpt" >/tmp/gen_full.log 2>&1 || exit 1
fi
summary() {
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in d.items() if k in ('vision_ms','ttft_ms','prefill_ms','decode_tok_s','decode_eager_tok_s','decode_fraction_of_roofline','host_us_per_token','peak_gpu_mem_gb','peak_gpu_mem_over_weights_kv_gb','gpu_copy_bandwidth_gbs','first_tokens','decode_roofline_tok_s','weights_on_gpu_gb','batch','decode_tok_s_aggregate','decode_batch_steps','batch_prefill_ms')})" "$1" 2>&1 | cut -c1-900
}
# bf16_nopdl (with MOXIN_BENCH_PDL_COMPARE=1): the same run with programmatic dependent launch
# off (MOXIN_CUDA_PDL=0), to measure what overlapping kernel launches gives.
formats=(bf16 q8 q4)
[[ ${MOXIN_BENCH_PDL_COMPARE:-0} == 1 ]] && formats+=(bf16_nopdl)
for name in "${formats[@]}"; do
  args=(bench --model "$ckpt" --device cuda --prompt-tokens 24 --decode-tokens 128)
  env=()
  case $name in
    q8) args+=(--quantize 8 --group-size 64) ;;
    q4) args+=(--quantize 4 --group-size 64) ;;
    bf16_nopdl) env=(MOXIN_CUDA_PDL=0) ;;
  esac
  echo "== moxin-vlm $name"
  echo "== $name" >>"$out/bench.err"
  env "${env[@]}" timeout 240 "$bin" "${args[@]}" >"$out/bench_${name}.json" 2>>"$out/bench.err"
  echo "rc=$?"; summary "$out/bench_${name}.json"
done
# Batched decoding (eager decode_token steps for the whole batch, greedy tokens picked on the
# host): the aggregate throughput at batch 1, 8 and 32, bf16.
for batch in 1 8 32; do
  echo "== moxin-vlm bf16 batch $batch"
  echo "== batch $batch" >>"$out/bench.err"
  timeout 300 "$bin" bench --model "$ckpt" --device cuda --prompt-tokens 24 --decode-tokens 64 \
    --batch "$batch" >"$out/bench_batch${batch}.json" 2>>"$out/bench.err"
  echo "rc=$?"; summary "$out/bench_batch${batch}.json"
done
echo "== HF transformers bf16"
PYTHONUNBUFFERED=1 timeout 300 python3 "$repo/bench/gpu/hf_baseline.py" --model "$ckpt" \
  --prompt-tokens 24 --decode-tokens 64 >"$out/bench_hf.json" 2>>"$out/bench.err"
echo "rc=$?"; cat "$out/bench_hf.json" | tr -d '\n' | cut -c1-1200; echo; tail -3 "$out/bench.err"
