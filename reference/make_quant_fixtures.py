#!/usr/bin/env python3
"""MLX affine-quantization fixtures for tests/unit/test_quantize.cpp.

The oracle is MLX itself (PyPI `mlx[cpu]`, tested with mlx 0.32.4 on Linux x86-64):
mx.quantize / mx.dequantize / mx.quantized_matmul(transpose=True).

Layout: tests/fixtures/quant/<case>/<tensor>.<dtype>.npy plus tests/fixtures/quant/manifest.json.
The dtype infix names the logical dtype of the file:
  f32 -> '<f4', f16 -> '<f2', u32 -> '<u4',
  bf16 -> '<u2' holding the raw bfloat16 bits (NumPy has no bfloat16).
Tensors per case: q.u32 (packed words), scales.<dt>, biases.<dt>, deq.<dt> (mx.dequantize output,
same dtype as scales), x.f32 [M, in] and y.f32 [M, out] (mx.quantized_matmul with scales/biases
upcast to f32, so MLX accumulates in f32), and the input w.<dt> when `input` is "stored".

Large cases do not store their input: it comes from synth_matrix(), a counter-based generator
whose values are exact in f32 (24-bit mantissas) or bf16 (8-bit mantissas), so the C++ test
rebuilds the identical matrix (it checks the generator against the stored small cases first).

Usage: python reference/make_quant_fixtures.py [--out tests/fixtures/quant]
"""
import argparse
import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np

U64 = np.uint64


def splitmix64(x):
    x = np.asarray(x, dtype=U64)
    z = x + U64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> U64(30))) * U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> U64(27))) * U64(0x94D049BB133111EB)
    return z ^ (z >> U64(31))


def synth_matrix(seed, rows, cols, mantissa_bits):
    """Deterministic test matrix, mirrored by synth_matrix() in tests/unit/test_quantize.cpp.

    Element (r, c): a uniform value in [-1, 1) with `mantissa_bits` bits, times 2^e where e in
    [-8, 4] is drawn per 32-wide block; a quarter of the blocks are forced all-positive or
    all-negative. Every step is exact in f32, so C++ reproduces it bit for bit.
    """
    assert cols % 32 == 0
    idx = np.arange(rows * cols, dtype=U64)
    h = splitmix64((U64(seed) << U64(32)) ^ idx)
    u = (h >> U64(64 - mantissa_bits)).astype(np.int64) - (1 << (mantissa_bits - 1))
    v = u.astype(np.float32) * np.float32(2.0 ** -(mantissa_bits - 1))
    block = (np.arange(rows * cols) // 32).astype(U64)
    hb = splitmix64((U64(seed + 1) << U64(32)) ^ block)
    exponent = (hb % U64(13)).astype(np.int64) - 8
    kind = ((hb >> U64(8)) % U64(8)).astype(np.int64)
    v = np.ldexp(v, exponent).astype(np.float32)
    v = np.where(kind == 0, np.abs(v), v)
    v = np.where(kind == 1, -np.abs(v), v)
    return v.reshape(rows, cols).astype(np.float32)


MX_DTYPES = {"f32": mx.float32, "bf16": mx.bfloat16, "f16": mx.float16}


def to_numpy_store(a, dt):
    """An mlx array of logical dtype dt as the NumPy array we store."""
    if dt == "bf16":
        return np.array(a.view(mx.uint16))
    if dt == "f16":
        return np.array(a).astype(np.float16)
    if dt == "u32":
        return np.array(a).astype(np.uint32)
    return np.array(a).astype(np.float32)


def save(folder, name, a, dt):
    np.save(folder / f"{name}.{dt}.npy", to_numpy_store(a, dt))


def edge_matrix(rng):
    """16 x 128 rows of awkward groups (each row's pattern repeats in all its groups)."""
    rows = []
    r = lambda: rng.standard_normal(128).astype(np.float32)
    rows.append(np.full(128, 3.0, np.float32))                   # constant positive
    rows.append(np.zeros(128, np.float32))                        # all zero
    rows.append(np.full(128, -2.5, np.float32))                   # constant negative
    rows.append(-np.abs(r()) - 0.5)                               # negative only
    rows.append(np.abs(r()) + 0.5)                                # positive only
    rows.append(r() * np.float32(1e30))                           # huge
    rows.append(r() * np.float32(1e-30))                          # tiny
    rows.append(r() * np.float32(1e-39))                          # f32 subnormals
    rows.append(np.tile(np.array([3e38, -3e38], np.float32), 64))  # max - min overflows to inf
    sym = r()
    sym[::32] = 2.0
    sym[1::32] = -2.0
    rows.append(sym)                                              # max == -min
    spike = np.zeros(128, np.float32)
    spike[5::32] = 7.0
    rows.append(spike)                                            # one outlier among zeros
    rows.append(np.tile((np.arange(32, dtype=np.float32) * 0.5 + 0.25), 4))  # rounding ties
    rows.append(np.abs(r()) * np.float32(1e-8))                   # range below eps: q0 == 0
    rows.append(np.tile(np.array([-1.0, 1.0], np.float32), 64))   # two levels
    rows.append(np.tile(np.array([1.0, 1.0, 1.0, 1.0 + 2**-20], np.float32), 32))  # near-constant
    rows.append(r())
    return np.stack(rows).astype(np.float32)


def make_case(root, manifest, name, w32, dt, bits, gs, m, seed, store_input, store_deq,
              matmul=True, input_name=None):
    folder = root / name
    folder.mkdir(parents=True)
    w = mx.array(w32).astype(MX_DTYPES[dt])
    q, s, b = mx.quantize(w, group_size=gs, bits=bits)
    mx.eval(q, s, b)
    save(folder, "q", q, "u32")
    save(folder, "scales", s, dt)
    save(folder, "biases", b, dt)
    if store_input:
        save(folder, "w", w, dt)
    if store_deq:
        save(folder, "deq", mx.dequantize(q, s, b, group_size=gs, bits=bits), dt)
    if matmul:
        x = mx.array(synth_matrix(seed + 7, m, w32.shape[1], 24))
        y = mx.quantized_matmul(x, q, s.astype(mx.float32), b.astype(mx.float32),
                                transpose=True, group_size=gs, bits=bits)
        save(folder, "x", x, "f32")
        save(folder, "y", y, "f32")
    manifest.append(dict(name=name, dtype=dt, bits=bits, group_size=gs, out=int(w32.shape[0]),
                         **{"in": int(w32.shape[1])}, m=m if matmul else 0, seed=seed,
                         input=input_name or ("stored" if store_input else "synth"),
                         deq=store_deq))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent /
                                             "tests/fixtures/quant"))
    args = parser.parse_args()
    root = Path(args.out)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    manifest = []

    # Grid: every supported bits x group size x {f32, bf16}, small awkward shapes, all stored.
    seed = 100
    for dt in ("f32", "bf16"):
        for bits in (1, 2, 3, 4, 5, 6, 8):
            for gs in (32, 64, 128):
                seed += 1
                out = 31 if (bits + gs // 32) % 2 else 33
                cols = {32: 96, 64: 128, 128: 256}[gs]
                w32 = synth_matrix(seed, out, cols, 24 if dt == "f32" else 8)
                make_case(root, manifest, f"grid_{dt}_b{bits}_g{gs}", w32, dt, bits, gs, 3, seed,
                          store_input=True, store_deq=True)

    # f16 input (scales/biases come back as f16).
    w32 = synth_matrix(300, 33, 128, 8) * np.float32(0.25)
    make_case(root, manifest, "f16_b4_g64", w32, "f16", 4, 64, 2, 300, True, True)

    # Prefill-sized batches (MLX's result for M > 4).
    make_case(root, manifest, "prefill_f32_b4_g64", synth_matrix(310, 33, 256, 24), "f32", 4, 64,
              37, 310, True, True)
    make_case(root, manifest, "prefill_bf16_b8_g32", synth_matrix(311, 31, 192, 8), "bf16", 8, 32,
              20, 311, True, True)

    # Large, awkward shapes: input regenerated from the seed in C++, dequantized matrix not stored.
    large = [("large_f32_b4_g64_o4304_i64", "f32", 4, 64, 4304, 64),
             ("large_bf16_b4_g32_o4304_i64", "bf16", 4, 32, 4304, 64),
             ("large_bf16_b8_g128_o33_i4352", "bf16", 8, 128, 33, 4352),
             ("large_f32_b3_g32_o31_i4352", "f32", 3, 32, 31, 4352),
             ("large_f32_b6_g64_o33_i1088", "f32", 6, 64, 33, 1088),
             ("large_bf16_b5_g128_o31_i1152", "bf16", 5, 128, 31, 1152)]
    for i, (name, dt, bits, gs, out, cols) in enumerate(large):
        s = 400 + i
        make_case(root, manifest, name, synth_matrix(s, out, cols, 24 if dt == "f32" else 8), dt,
                  bits, gs, 2, s, store_input=False, store_deq=False)

    # Edge-case groups, every bits x group size, both dtypes. The input holds values such as
    # 3e38 and subnormals that the generator never makes, so it is stored, once per dtype
    # (manifest input "shared:<file>", relative to the fixture root).
    edges = edge_matrix(np.random.default_rng(0))
    for dt in ("f32", "bf16"):
        save(root, "edge_input", mx.array(edges).astype(MX_DTYPES[dt]), dt)
        for bits in (1, 2, 3, 4, 5, 6, 8):
            for gs in (32, 64, 128):
                make_case(root, manifest, f"edge_{dt}_b{bits}_g{gs}", edges, dt, bits, gs, 0, 0,
                          store_input=False, store_deq=True, matmul=False,
                          input_name=f"shared:edge_input.{dt}.npy")

    (root / "manifest.json").write_text(json.dumps(
        {"mlx_version": mx.__version__, "cases": manifest}, indent=1) + "\n")
    total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    print(f"{len(manifest)} cases, {total / 1e6:.2f} MB in {root}")


if __name__ == "__main__":
    main()
