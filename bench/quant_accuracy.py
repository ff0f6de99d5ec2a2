#!/usr/bin/env python3
"""Top-1 agreement and mean KL divergence of quantized logits against the stored-precision ones.

    python3 bench/quant_accuracy.py REFERENCE.npy QUANTIZED.npy [...]

Each file holds float32 logits [positions, vocab] written by `moxin-vlm logits` for the same
image and ids. Prints one JSON line per quantized file.
"""
import json
import sys

import numpy as np


def log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    reference = np.load(sys.argv[1])
    lp = log_softmax(reference)
    for path in sys.argv[2:]:
        quantized = np.load(path)
        if quantized.shape != reference.shape:
            sys.exit(f"{path}: shape {quantized.shape} differs from {reference.shape}")
        lq = log_softmax(quantized)
        kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
        top1 = (reference.argmax(-1) == quantized.argmax(-1)).mean()
        print(json.dumps({"file": path, "positions": int(reference.shape[0]),
                          "top1_agreement": round(float(top1), 4),
                          "mean_kl": float(kl.mean()), "max_kl": float(kl.max())}))


if __name__ == "__main__":
    main()
