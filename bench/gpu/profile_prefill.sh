#!/usr/bin/env bash
# Where the time to first token goes, on the GPU machine (which has Nsight Compute but no Nsight
# Systems): GPU time of every kernel of about one vision encode + prefill of the bench, after
# its warm-up iteration, summed per kernel name, largest first. Clocks and caches as the
# application leaves them (not locked, not flushed), so times are close to a normal run's;
# the kernels still run one at a time.
# Usage: bench/gpu/profile_prefill.sh MOXIN_VLM_BINARY CHECKPOINT_DIR OUT_FILE [BITS]
set -uo pipefail
bin="$1"
ckpt="$2"
out="$3"
bits="${4:-16}"
quant=()
[[ $bits != 16 ]] && quant=(--quantize "$bits" --group-size 64)
timeout 400 ncu --metrics gpu__time_duration.sum --launch-skip 3000 --launch-count 2200 \
  --cache-control none --clock-control none \
  --csv --page raw "$bin" bench --model "$ckpt" --device cuda --prompt-tokens 24 \
  --decode-tokens 2 "${quant[@]}" >"$out.csv" 2>"$out.err"
echo "ncu rc=$?"
python3 - "$out.csv" <<'PY' | tee "$out"
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if r]
head = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
names = rows[head]
k, t = names.index("Kernel Name"), names.index("gpu__time_duration.sum")
total, count = collections.Counter(), collections.Counter()
for r in rows[head + 2:]:
    try:
        us = float(r[t].replace(",", "")) / 1e3  # ns -> us
    except (ValueError, IndexError):
        continue
    name = r[k].split("(")[0][:90]
    total[name] += us
    count[name] += 1
all_us = sum(total.values())
print(f"{sum(count.values())} kernels, {all_us / 1e3:.2f} ms of GPU time")
for name, us in total.most_common(30):
    print(f"{us / 1e3:8.3f} ms {100 * us / all_us:5.1f}% {count[name]:6d}x  {name}")
PY
