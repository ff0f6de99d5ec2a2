#!/usr/bin/env bash
# The quick-start demo: installs what is missing, builds, writes a random-weight checkpoint in
# the released layout (the real DINOv2 + SigLIP towers and projector, a small decoder), and runs
# the engine on a real photo. Random weights: the numbers are real computation, not meaning.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)" --target moxin-vlm

checkpoint=demo/checkpoint
if ! python3 reference/make_checkpoints.py --variant real-towers --out "$checkpoint" --verify >/dev/null 2>&1; then
  echo "demo: writing the random-weight checkpoint to $checkpoint (about 1.5 GB)..."
  python3 reference/make_checkpoints.py --variant real-towers --out "$checkpoint"
fi
photo=tests/fixtures/parity/photo.png

echo; echo "== moxin-vlm inspect --model $checkpoint"
build/moxin-vlm inspect --model "$checkpoint"

echo; echo "== moxin-vlm logits --model $checkpoint --image $photo --ids 1,415,1469,1747 --last 1"
build/moxin-vlm logits --model "$checkpoint" --image "$photo" --ids 1,415,1469,1747 --last 1 \
  --out demo/logits.npy
python3 - <<'PY'
import numpy as np
logits = np.load("demo/logits.npy")
top = np.argsort(logits[-1])[::-1][:5]
print(f"logits {logits.shape} {logits.dtype}; top-5 next-token ids {top.tolist()} "
      f"with logits {np.round(logits[-1][top], 3).tolist()}")
PY

# A real question about the photo. The demo decoder has random weights and a 2048-id
# vocabulary, so the answer is random words; the bundled Mistral tokenizer (32001 ids) is copied
# beside it, and --allow-vocab-mismatch lets the pair run (prompt ids the small model lacks
# become <unk>). With the released Moxin-7B-VLM-hf the same command runs without that flag.
cp tests/fixtures/tokenizer/mistral/* "$checkpoint"/
echo; echo "== moxin-vlm generate --model $checkpoint --image $photo --prompt 'What is in the image?'"
echo "   (random weights: random words)"
build/moxin-vlm generate --model "$checkpoint" --image "$photo" --prompt "What is in the image?" \
  --max-tokens 24 --allow-vocab-mismatch
