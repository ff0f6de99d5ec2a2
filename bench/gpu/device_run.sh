#!/usr/bin/env bash
# One call on the GPU machine: unpack the binaries built on the CPU machine (build-cuda/
# dist.tar.xz: moxin-vlm, test_cuda_ops, test_cuda_model, libsentencepiece), generate the
# test checkpoints and the full-size checkpoint in the background, run the CUDA tests, then
# the benchmark. Logs go to $OUT (or ./gpu-out).
#
# Usage (from the repository root): bench/gpu/device_run.sh [tests|bench|all|check|profile|final|pdl]
#        [BUILD_DIR]   (profile: tests, then Nsight Compute on the 4-bit decode products;
#        final: tests and the benchmark without the full-checkpoint diagnostics;
#        pdl: tests, decode with and without PDL in the graph, prefill kernel times;
#        quick: tests, decode at every format with the tuner's log, 4-bit with the float
#        kernels as the same-run baseline, decode counters and the kernel times of vision +
#        prefill; ttft: tests, the bf16 bench and the kernel times of vision + prefill;
#        attn: tests, then Nsight Compute on the prefill attention kernel with its source view;
#        prefill_ab: tests, then TTFT runs under several settings;
#        decode_ab: tests, then bf16 and 4-bit decode with and without $AB_ENV set;
#        decode_kernels: no tests; every kernel's time in a 4-bit bench under Nsight Compute)
set -uo pipefail
what="${1:-all}"
build="${2:-build-cuda2}"
# Logs are gathered in a work folder and packed into one archive under $OUT after each phase
# (the device tool returns at most 8 files), so a phase that runs out of time loses nothing.
out=/tmp/gpu-out
final="${OUT:-$PWD/gpu-out}"
mkdir -p "$out" "$final"
pack() { tar -C "$out" -czf "$final/results.tar.gz" --exclude='*.npy' . ; }
repo="$PWD"
# The tests find their fixtures through the source path compiled into them.
if [[ ! -e /work/main ]]; then mkdir -p /work && ln -s "$repo" /work/main; fi
dist=/tmp/moxin-dist
mkdir -p "$dist" && tar -C "$dist" -xJf "$build/dist.tar.xz"
export LD_LIBRARY_PATH="$dist:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi -L | tee "$out/gpu.txt"
ldd "$dist/moxin-vlm" | grep -i "not found" && echo "missing libraries" 

if [[ $what != tests ]]; then
  [[ -f /tmp/moxin-full/config.json ]] || \
    (python3 reference/make_checkpoints.py --variant full --out /tmp/moxin-full \
       >/tmp/gen_full.log 2>&1; echo "full: rc=$?" >>/tmp/gen_full.log) &
fi
# SKIP_TESTS=1: straight to the measurements (a comparison whose code was tested in this pass).
if [[ -z ${SKIP_TESTS:-} ]] && [[ $what == tests || $what == all || $what == profile ||
      $what == final || $what == pdl || $what == quick || $what == ttft || $what == attn ||
      $what == prefill_ab || $what == decode_ab ]]; then
  for v in tiny-hf tiny-native tiny-f32 real-towers; do
    (python3 reference/make_checkpoints.py --variant "$v" --out "tests/fixtures/checkpoints/$v" \
       >"/tmp/gen_$v.log" 2>&1) &
  done
  echo "== test_cuda_ops"
  timeout 180 "$dist/test_cuda_ops" 2>&1 | tee "$out/test_cuda_ops.log" | grep -E "OK|FAIL|Failure|rel|PASSED|SKIPPED|error"
  while pgrep -f "make_checkpoints.py --variant (tiny|real)" >/dev/null; do sleep 2; done
  echo "== test_cuda_model"
  timeout 240 "$dist/test_cuda_model" 2>&1 | tee "$out/test_cuda_model.log" | grep -E "OK|FAIL|Failure|cuda|greedy|host time|PASSED|SKIPPED|error|Expected|Which|actual"
  echo "== test_cuda_batch"
  timeout 240 "$dist/test_cuda_batch" 2>&1 | tee "$out/test_cuda_batch.log" | grep -E "OK|FAIL|Failure|PASSED|SKIPPED|error|Expected|Which|actual"
  pack
fi
if [[ $what != tests ]]; then
  while [[ ! -f /tmp/moxin-full/config.json ]] || pgrep -f "variant full" >/dev/null; do sleep 3; done
  tail -2 /tmp/gen_full.log
  if [[ $what == all || $what == check ]]; then
    echo "== full checkpoint diagnostics (bench sequence, 4-bit; decode op times)"
    MOXIN_FULL_CHECKPOINT=/tmp/moxin-full timeout 200 "$dist/test_cuda_full" 2>&1 | \
      tee "$out/test_cuda_full.log" | grep -E "\[full\]|OK|FAIL|Failure|Expected|Which|actual"
    echo "-- the same op times with one-block-per-head decode attention (no split):"
    MOXIN_FULL_CHECKPOINT=/tmp/moxin-full MOXIN_CUDA_SPLIT_ATTENTION=0 timeout 60 \
      "$dist/test_cuda_full" --gtest_filter='*DecodeOpTimes*' 2>&1 | \
      tee "$out/test_cuda_full_nosplit.log" | grep -E "attention"
    pack
  fi
  if [[ $what == check ]]; then
    echo "== quantized full checkpoint: CPU vs GPU logits"
    bench/gpu/quant_check.sh "$dist/moxin-vlm" /tmp/moxin-full "$out" 4 2>&1 | tee "$out/quant_check.txt"
    pack
  fi
  [[ $what == check ]] && exit 0
  if [[ $what == pdl ]]; then
    # Decode with programmatic dependent launch inside the recorded graph, against without, in
    # one call; then per-kernel times of one prefill (Nsight Compute summary).
    for run in "bf16 0" "bf16 1" "4 0" "4 1" "8 0" "8 1" "4 0" "4 1"; do
      set -- $run
      quant=(); [[ $1 != bf16 ]] && quant=(--quantize $1 --group-size 64)
      echo "== $1 bits, MOXIN_CUDA_PDL_GRAPH=$2"
      MOXIN_CUDA_PDL_GRAPH=$2 timeout 200 "$dist/moxin-vlm" bench --model /tmp/moxin-full \
        --device cuda --prompt-tokens 24 --decode-tokens 128 "${quant[@]}" \
        >"$out/pdl_$1_$2.json" 2>>"$out/pdl.err"
      python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: d[k] for k in ('decode_tok_s','decode_fraction_of_roofline','ttft_ms')})" "$out/pdl_$1_$2.json"
    done
    pack
    echo "== ncu: kernel times of vision + prefill (bf16)"
    timeout 300 ncu --section LaunchStats --launch-count 1500 --print-summary per-kernel \
      "$dist/moxin-vlm" bench --model /tmp/moxin-full --device cuda --prompt-tokens 24 \
      --decode-tokens 1 >"$out/ncu_prefill.txt" 2>&1
    echo "ncu rc=$?"
    pack
    exit 0
  fi
  if [[ $what == attn ]]; then
    # Nsight Compute on the prefill attention kernel: launches 100-102 of it (the warm-up
    # forward's last two tower calls, DINOv2's, and its first decoder call), every section, and
    # the per-instruction stall samples of the source view.
    timeout 400 ncu --kernel-name regex:flash_attention --launch-skip 100 --launch-count 3 \
      --set full --import-source yes -f -o /tmp/attn "$dist/moxin-vlm" bench \
      --model /tmp/moxin-full --device cuda --prompt-tokens 24 --decode-tokens 2 \
      >"$out/ncu_attention_run.txt" 2>&1
    echo "ncu rc=$?"
    ncu -i /tmp/attn.ncu-rep --page details >"$out/ncu_attention.txt" 2>&1
    ncu -i /tmp/attn.ncu-rep --page source --csv --print-source sass \
      >"$out/ncu_attention_sass.csv" 2>&1
    echo "source page rc=$?"
    grep -E "flash_attention|Duration|Issue Slots|Occupancy|Registers Per|Warp Cycles" \
      "$out/ncu_attention.txt" | head -60
    pack
    exit 0
  fi
  if [[ $what == ttft ]]; then
    # The towers side by side (default), then one after the other, then side by side again.
    for side in 1 0 1; do
      MOXIN_CUDA_SIDE_STREAM=$side timeout 200 "$dist/moxin-vlm" bench --model /tmp/moxin-full \
        --device cuda --prompt-tokens 24 --decode-tokens 64 >"$out/ttft_bf16_side$side.json" \
        2>"$out/ttft_bf16.err"
      echo "side stream $side:"
      python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: d.get(k) for k in ('decode_tok_s','decode_fraction_of_roofline','ttft_ms','vision_ms','prefill_ms')})" "$out/ttft_bf16_side$side.json"
    done
    bench/gpu/profile_prefill.sh "$dist/moxin-vlm" /tmp/moxin-full "$out/prefill_kernels.txt" 16
    pack
    exit 0
  fi
  if [[ $what == decode_kernels ]]; then
    # Every kernel's time in a 4-bit bench (Nsight Compute, one metric, the card's own clocks
    # and caches), the last decode steps from the recorded graph at the end; then the same
    # bench without the profiler for its time per token.
    MOXIN_CUDA_TUNE_LOG=1 timeout 200 "$dist/moxin-vlm" bench --model /tmp/moxin-full \
      --device cuda --prompt-tokens 24 --decode-tokens 128 --quantize 4 --group-size 64 \
      >"$out/dk_q4.json" 2>"$out/dk_q4.err"
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: d.get(k) for k in ('decode_tok_s','decode_ms_per_token','decode_fraction_of_roofline','ttft_ms')})" "$out/dk_q4.json"
    timeout 400 ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum \
      --csv --print-units base "$dist/moxin-vlm" bench --model /tmp/moxin-full --device cuda \
      --prompt-tokens 24 --decode-tokens 3 --quantize 4 --group-size 64 \
      >"$out/dk_ncu_q4.csv" 2>"$out/dk_ncu_q4.err"
    echo "ncu rc=$?"; wc -l "$out/dk_ncu_q4.csv"
    pack
    exit 0
  fi
  if [[ $what == decode_ab ]]; then
    # Decode at bf16 and 4-bit with and without one change, in turn: "old" runs set $AB_ENV
    # (e.g. MOXIN_X=1), or run $AB_BIN (a baseline binary carried in the build's dist) instead.
    i=0
    # $AB_RUNS: "BITS new|old|extra|NAME=VALUE|old+NAME=VALUE" items separated by commas
    # (default: bf16 and 4-bit, twice each); NAME=VALUE runs the new binary with that variable
    # set; "extra" runs the second build pack_dist.sh carried (EXTRA_BIN).
    IFS=, read -r -a runs <<<"${AB_RUNS:-16 new,16 old,4 new,4 old,16 new,16 old,4 new,4 old}"
    for run in "${runs[@]}"; do
      set -- $run
      i=$((i + 1))
      # BITS "bN": bf16 decoding of a batch of N (bench --batch N, aggregate tokens/s); "4bN",
      # "8bN": the same at 4 or 8 bits.
      quant=(); [[ $1 != 16 && $1 != *b* ]] && quant=(--quantize $1 --group-size 64)
      [[ $1 == b* ]] && quant=(--batch "${1#b}")
      [[ $1 == [48]b* ]] && quant=(--quantize "${1%%b*}" --group-size 64 --batch "${1#*b}")
      # "old+NAME=VALUE": the baseline binary with that variable set.
      cfg=""; [[ $2 == old ]] && cfg="${AB_ENV:-}"; [[ $2 == *=* ]] && cfg="${2#old+}"
      bin="$dist/moxin-vlm"; [[ $2 == old* && -n ${AB_BIN:-} ]] && bin="$dist/$AB_BIN"
      [[ $2 == extra ]] && bin="$dist/moxin-vlm-extra"
      env $cfg MOXIN_CUDA_TUNE_LOG=1 timeout 200 "$bin" bench --model /tmp/moxin-full \
        --device cuda --prompt-tokens 24 --decode-tokens 128 "${quant[@]}" \
        >"$out/dab_$i.json" 2>"$out/dab_$i.err"
      echo "run $i [$1 bits, $2${cfg:+: $cfg}]:"
      python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: d.get(k) for k in ('decode_tok_s','decode_fraction_of_roofline','decode_eager_tok_s','decode_tok_s_aggregate','ttft_ms','prefill_ms','peak_gpu_mem_over_weights_kv_gb')})" "$out/dab_$i.json"
    done
    pack
    # AB_NCU=REGEX: then every Nsight Compute section, with the source view's stall samples, for
    # AB_NCU_COUNT (default 8) launches of the kernels matching REGEX in a 4-bit bench of the
    # new binary, after skipping AB_NCU_SKIP (default 400) of them.
    if [[ -n ${AB_NCU:-} ]]; then
      timeout 300 ncu --kernel-name "regex:$AB_NCU" --launch-skip "${AB_NCU_SKIP:-400}" \
        --launch-count "${AB_NCU_COUNT:-8}" --set full --import-source yes -f -o /tmp/abncu \
        "$dist/moxin-vlm" bench --model /tmp/moxin-full --device cuda --prompt-tokens 24 \
        --decode-tokens 8 --quantize 4 --group-size 64 >"$out/ncu_ab_run.txt" 2>&1
      echo "ncu rc=$?"
      ncu -i /tmp/abncu.ncu-rep --page details >"$out/ncu_ab_details.txt" 2>&1
      ncu -i /tmp/abncu.ncu-rep --page source --csv --print-source sass \
        >"$out/ncu_ab_sass.csv" 2>&1
      grep -E "gemv|Duration|DRAM Throughput|Issue Slots|Registers Per|Warp Cycles Per Issued" \
        "$out/ncu_ab_details.txt" | head -80
      pack
    fi
    exit 0
  fi
  if [[ $what == prefill_ab ]]; then
    # Time to first token (bf16) with each prefill change of a pass switched off alone, all of
    # them off, and all on (first and last), in one call; the first run logs the product tuning.
    i=0
    for cfg in "" "MOXIN_CUDA_RECORD=0" "" "MOXIN_CUDA_RECORD=0" "MOXIN_CUDA_SIDE_STREAM=0" ""; do
      i=$((i + 1))
      env $cfg MOXIN_CUDA_TUNE_LOG=1 timeout 200 "$dist/moxin-vlm" bench --model /tmp/moxin-full \
        --device cuda --prompt-tokens 24 --decode-tokens 32 >"$out/ab_$i.json" 2>"$out/ab_$i.err"
      echo "run $i [${cfg:-all on}]:"
      python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: d.get(k) for k in ('ttft_ms','vision_ms','vision_host_ms','prefill_ms','prefill_host_ms','decode_tok_s','decode_fraction_of_roofline')})" "$out/ab_$i.json"
    done
    pack
    exit 0
  fi
  if [[ $what == quick ]]; then
    for run in "16 auto" "4 auto" "4 float" "8 auto" "8 float"; do
      set -- $run
      quant=(); [[ $1 != 16 ]] && quant=(--quantize $1 --group-size 64)
      echo "== $1 bits, MOXIN_CUDA_QUANT_PATH=$2"
      MOXIN_CUDA_QUANT_PATH=$2 MOXIN_CUDA_TUNE_LOG=1 timeout 200 "$dist/moxin-vlm" bench \
        --model /tmp/moxin-full --device cuda --prompt-tokens 24 --decode-tokens 128 \
        "${quant[@]}" >"$out/quick_$1_$2.json" 2>"$out/quick_$1_$2.err"
      python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: d.get(k) for k in ('decode_tok_s','decode_fraction_of_roofline','ttft_ms','vision_ms','prefill_ms')})" "$out/quick_$1_$2.json"
      grep "tune" "$out/quick_$1_$2.err" | head -20
    done
    pack
    echo "== ncu: 4-bit decode products"
    bench/gpu/profile_decode.sh "$dist/moxin-vlm" /tmp/moxin-full "$out/ncu_q4.txt" 4 | head -80
    pack
    echo "== ncu: kernel times of vision + prefill (bf16)"
    bench/gpu/profile_prefill.sh "$dist/moxin-vlm" /tmp/moxin-full "$out/prefill_kernels.txt" 16
    pack
    if command -v nsys >/dev/null; then
      for bits in 16 4; do
        quant=(); [[ $bits != 16 ]] && quant=(--quantize $bits --group-size 64)
        echo "== nsys: kernel times, $bits bits (vision + prefill + 16 decode tokens)"
        timeout 240 nsys profile -o "/tmp/prof_$bits" --force-overwrite true \
          "$dist/moxin-vlm" bench --model /tmp/moxin-full --device cuda --prompt-tokens 24 \
          --decode-tokens 16 "${quant[@]}" >/dev/null 2>"$out/nsys_$bits.err"
        nsys stats --report cuda_gpu_kern_sum --format csv "/tmp/prof_$bits.nsys-rep" \
          >"$out/kernels_$bits.csv" 2>>"$out/nsys_$bits.err"
        head -25 "$out/kernels_$bits.csv" | cut -c1-220
      done
    else
      echo "no nsys on this machine"
    fi
    pack
    exit 0
  fi
  if [[ $what == profile ]]; then
    for bits in 16 4; do
      quant=(); [[ $bits != 16 ]] && quant=(--quantize $bits --group-size 64)
      echo "== quick bench, $bits bits"
      MOXIN_CUDA_TUNE_LOG=1 timeout 200 "$dist/moxin-vlm" bench --model /tmp/moxin-full --device cuda --prompt-tokens 24 \
        --decode-tokens 128 "${quant[@]}" >"$out/quick_$bits.json" 2>>"$out/quick.err"
      tr -d '\n' <"$out/quick_$bits.json" | cut -c1-700; echo
    done
    echo "== ncu: 4-bit decode products"
    bench/gpu/profile_decode.sh "$dist/moxin-vlm" /tmp/moxin-full "$out/ncu_q4.txt" 4
    pack
    exit 0
  fi
  bench/gpu/run_bench.sh "$dist/moxin-vlm" "$out" /tmp/moxin-full
  pack
fi
