#!/usr/bin/env bash
# Open question of run 2 (GPU_NOTES.md): does the quantized full-size checkpoint decode the same
# on the GPU as on the CPU (the reference-exact path)? Writes the logits of the last 4 positions
# for one image + short prompt, 4-bit g64 quantized at load, from: the CPU, the GPU's default
# product paths, and the GPU forced to one path (dequantize + cuBLASLt everywhere, or GEMV
# everywhere), then compares argmax / top-5 / error.
# Usage: bench/gpu/quant_check.sh MOXIN_VLM CHECKPOINT OUT_DIR [BITS]
set -uo pipefail
bin="$1"; ckpt="$2"; out="$3"; bits="${4:-4}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
img="$repo/tests/fixtures/images/jpeg_17x9_420.jpg"
ids="1,415,2936,9060,285,1142,28723,13,3000,42"
common=(logits --model "$ckpt" --image "$img" --ids "$ids" --last 4 --quantize "$bits" --group-size 64)
mkdir -p "$out"
for v in cpu cuda cuda_dense cuda_gemv; do
  dev=cuda; env=()
  [[ $v == cpu ]] && dev=cpu
  [[ $v == cuda_dense ]] && env=(MOXIN_CUDA_QUANT_PATH=dense)
  [[ $v == cuda_gemv ]] && env=(MOXIN_CUDA_QUANT_PATH=gemv)
  start=$SECONDS
  env "${env[@]}" timeout 200 "$bin" "${common[@]}" --device "$dev" --out "/tmp/q${bits}_$v.npy" \
    2>>"$out/quant_check.err"
  echo "q${bits} $v: rc=$? $((SECONDS - start)) s"
done
python3 - "$out" "$bits" <<'PY'
import sys, numpy as np, os
out, bits = sys.argv[1], sys.argv[2]
ref = np.load(f"/tmp/q{bits}_cpu.npy")
print("cpu: argmax", ref.argmax(-1).tolist(), "top5 last", np.argsort(-ref[-1])[:5].tolist(),
      "nan", int(np.isnan(ref).sum()))
for v in ["cuda", "cuda_dense", "cuda_gemv"]:
    p = f"/tmp/q{bits}_{v}.npy"
    if not os.path.exists(p):
        print(v, "missing"); continue
    a = np.load(p)
    err = np.abs(a - ref).max() / np.abs(ref).max()
    cos = (a * ref).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(ref, axis=-1)
    print(f"{v}: argmax {a.argmax(-1).tolist()} top5 last {np.argsort(-a[-1])[:5].tolist()} "
          f"nan {int(np.isnan(a).sum())} max_rel {err:.3e} cos_min {cos.min():.6f}")
PY
