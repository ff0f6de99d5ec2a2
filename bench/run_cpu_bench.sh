#!/usr/bin/env bash
# The CPU benchmark: a full-size random-weight checkpoint (real dimensions, ~17.8 GB bf16) at
# 16, 8 and 4 bits in one run, each load from a checkpoint stored in that format.
#   bench/run_cpu_bench.sh [WORKDIR]      (default /tmp/moxin-bench; needs ~35 GB free)
# Prints one JSON object per format and writes them to bench/results/cpu-<host>-<date>.json.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/moxin-bench}
mkdir -p "$work" bench/results
bin=${MOXIN_BIN:-build/moxin-vlm}
[ -x "$bin" ] || { cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null; cmake --build build --target moxin-vlm; }

full=${MOXIN_FULL_CHECKPOINT:-$work/full}
if ! python3 reference/make_checkpoints.py --variant full --out "$full" --verify >/dev/null 2>&1; then
  echo "bench: writing the full-size random checkpoint to $full" >&2
  python3 reference/make_checkpoints.py --variant full --out "$full"
fi
for bits in 8 4; do
  [ -f "$work/q$bits/config.json" ] || "$bin" quantize --model "$full" --bits "$bits" --group-size 64 --out "$work/q$bits"
done

out=bench/results/cpu-$(hostname)-$(date -u +%Y%m%dT%H%M%SZ).json
{
  echo "{\"machine\": \"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB\","
  echo " \"load_average_before\": \"$(cut -d' ' -f1-3 /proc/loadavg)\","
  echo " \"bf16\": $("$bin" bench --model "$full" --decode-tokens 8),"
  echo " \"q8_g64\": $("$bin" bench --model "$work/q8" --decode-tokens 8),"
  echo " \"q4_g64\": $("$bin" bench --model "$work/q4" --decode-tokens 8)}"
} | tee "$out"
echo "bench: results in $out" >&2

# Accuracy of the quantized checkpoints on the same image and a 24-token prompt: logits at the
# last 32 positions (the last image patches and the text) against bf16.
ids=1$(python3 -c "print(''.join(f',{(i * 7919) % 32000}' for i in range(1, 24)))")
photo=tests/fixtures/parity/photo.png
for name in full q8 q4; do
  dir=$work/$name; [ "$name" = full ] && dir=$full
  "$bin" logits --model "$dir" --image "$photo" --ids "$ids" --last 32 --out "$work/logits-$name.npy"
done
python3 bench/quant_accuracy.py "$work/logits-full.npy" "$work/logits-q8.npy" "$work/logits-q4.npy" \
  | tee "${out%.json}-accuracy.jsonl"
