#!/usr/bin/env python3
"""Deterministic random-weight Moxin-VLM checkpoints in the real checkpoint layouts.

Depends on numpy only (CI has no torch). Every byte written is a pure function of the variant
name: weights come from a counter-based hash (splitmix64 over the element index, keyed by a
SHA-256 of the variant seed and the tensor name), never from numpy's random generators, whose
streams are not promised to be stable across versions. The float arithmetic that maps hash bits
to weights is a fixed sequence of correctly rounded IEEE float32 operations, and the cast to bf16
is done with integer bit operations (round to nearest, ties to even), so two machines with
different numpy versions write identical files.

Usage:
  python3 reference/make_checkpoints.py --variant tiny-hf --out DIR
  python3 reference/make_checkpoints.py --all --out-root DIR        # every test variant
  python3 reference/make_checkpoints.py --variant tiny-hf --out DIR --verify
  python3 reference/make_checkpoints.py --list

--verify compares the sha256 of every file in DIR against
tests/fixtures/parity/<variant>/meta.json (exit status 1 on any mismatch).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
PARITY_DIR = REPO_ROOT / "tests" / "fixtures" / "parity"

# Elements generated per step while streaming one tensor: small enough that the temporaries stay
# in cache (2.5x faster than 4M-element steps), large enough to amortise the Python overhead.
CHUNK_ELEMENTS = 1 << 16
# Safetensors dtype names and the little-endian numpy storage types behind them.
STORAGE = {"bf16": ("BF16", "<u2", 2), "f16": ("F16", "<f2", 2), "f32": ("F32", "<f4", 4)}
TORCH_DTYPE_NAME = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}

# --------------------------------------------------------------------------------------------
# Variant definitions
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TowerDims:
    width: int
    depth: int
    heads: int
    mlp: int
    layer_scale: bool  # DINOv2 has ls1/ls2, SigLIP none
    prefix: bool  # DINOv2 has cls + 4 registers, SigLIP none
    attn_pool: bool  # SigLIP's MAP head (attn_pool.*), unused by the VLM


@dataclasses.dataclass(frozen=True)
class DecoderDims:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    rms_eps: float
    rope_theta: float
    tied: bool
    # Token-embedding standard deviation; 0 picks the default rule in _decoder_specs.
    embed_std: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    seed: int
    layout: str  # "hf" (HF-converted Prismatic names) or "native" (other names seen in the wild)
    dtype: str  # bf16 | f16 | f32
    dino: TowerDims
    siglip: TowerDims
    decoder: DecoderDims
    shards: int = 1  # exact number of shards (1 = single model.safetensors) ...
    max_shard_bytes: int = 0  # ... or, when non-zero, HF-style size-limited sharding
    is_test: bool = True  # test variants get reference fixtures; `full` is for benchmarks
    image_size: int = 224
    patch: int = 14

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch) ** 2


REAL_DINO = TowerDims(1024, 24, 16, 4096, layer_scale=True, prefix=True, attn_pool=False)
REAL_SIGLIP = TowerDims(1152, 27, 16, 4304, layer_scale=False, prefix=False, attn_pool=True)
# Tiny towers keep the real head dims (64 and 72): the engine infers heads = width / head_dim.
TINY_DINO = TowerDims(128, 3, 2, 512, layer_scale=True, prefix=True, attn_pool=False)
TINY_SIGLIP = TowerDims(144, 3, 2, 288, layer_scale=False, prefix=False, attn_pool=True)
TINY_DECODER = DecoderDims(64, 2, 4, 2, 128, 512, 1e-5, 10000.0, tied=False)

VARIANTS = {
    v.name: v
    for v in [
        Variant("real-towers", 101, "hf", "bf16", REAL_DINO, REAL_SIGLIP,
                DecoderDims(256, 2, 8, 4, 512, 2048, 1e-5, 10000.0, tied=False), shards=3),
        Variant("tiny-hf", 102, "hf", "bf16", TINY_DINO, TINY_SIGLIP, TINY_DECODER),
        Variant("tiny-native", 103, "native", "f16", TINY_DINO, TINY_SIGLIP,
                dataclasses.replace(TINY_DECODER, tied=True), shards=2),
        Variant("tiny-f32", 104, "hf", "f32", TINY_DINO, TINY_SIGLIP,
                # Embeddings of RMS 0.003 (mean square ~1e-5, realistic for a trained model) so
                # that the RMSNorm eps of 1e-6, not 1e-5, visibly changes the text positions.
                dataclasses.replace(TINY_DECODER, rms_eps=1e-6, rope_theta=1e6, embed_std=0.003)),
        Variant("full", 105, "hf", "bf16", REAL_DINO, REAL_SIGLIP,
                DecoderDims(4096, 36, 32, 8, 14336, 32064, 1e-5, 10000.0, tied=False),
                max_shard_bytes=4_500_000_000, is_test=False),
    ]
}
TEST_VARIANTS = [v for v in VARIANTS.values() if v.is_test]

# --------------------------------------------------------------------------------------------
# Tensor specs: name, shape and how its values are distributed
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Init:
    """Values are offset + amp * u with u uniform on (-1, 1)."""

    offset: float
    amp: float


def linear_init(fan_in: int, gain: float = 1.0) -> Init:
    # Uniform with standard deviation gain / sqrt(fan_in): unit-variance inputs give
    # outputs of variance ~gain^2, so activations stay O(1) through deep stacks.
    return Init(0.0, gain * math.sqrt(3.0 / fan_in))


NORM_WEIGHT = Init(1.0, 0.1)  # 1 + small noise, so a skipped scale is caught
SMALL_BIAS = Init(0.0, 0.05)
LAYER_SCALE = Init(0.125, 0.075)  # in [0.05, 0.2]: timm's 1e-5 would make blocks near-identity
# Larger than a trained model's 0.02 so that a mistake in where the position embedding or the
# prefix tokens enter (e.g. adding pos_embed after prepending cls/registers) moves the features
# well beyond bf16 tolerances.
TOKEN_INIT = Init(0.0, 0.5)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple
    init: Init

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _tower_specs(prefix: str, t: TowerDims, v: Variant, native: bool) -> list[TensorSpec]:
    d, m = t.width, t.mlp
    specs = []

    def add(name, shape, init):
        specs.append(TensorSpec(prefix + name, tuple(shape), init))

    if t.prefix:
        add("cls_token", [1, 1, d], TOKEN_INIT)
        add("register_tokens" if native else "reg_token", [1, 4, d], TOKEN_INIT)
    add("pos_embed", [1, v.num_patches, d], TOKEN_INIT)
    add("patch_embed.proj.weight", [d, 3, v.patch, v.patch], linear_init(3 * v.patch * v.patch))
    add("patch_embed.proj.bias", [d], SMALL_BIAS)
    ls_name = "gamma" if native else "scale_factor"
    # Without LayerScale every block adds an O(1) update; scaling the residual branches by
    # sqrt(3 / depth) keeps the 27-block SigLIP's features near the DINOv2 ones in size (rms ~2
    # rather than ~7), so neither tower drowns the other in the projector. 1 for tiny towers.
    branch = 1.0 if t.layer_scale else min(1.0, math.sqrt(3.0 / t.depth))
    for i in range(t.depth):
        b = f"blocks.{i}."
        add(b + "norm1.weight", [d], NORM_WEIGHT)
        add(b + "norm1.bias", [d], SMALL_BIAS)
        if native:
            for proj in ("q_proj", "k_proj", "v_proj"):
                add(b + f"attn.{proj}.weight", [d, d], linear_init(d, 1.2))
                add(b + f"attn.{proj}.bias", [d], SMALL_BIAS)
            add(b + "attn.out_proj.weight", [d, d], linear_init(d, branch))
            add(b + "attn.out_proj.bias", [d], SMALL_BIAS)
        else:
            add(b + "attn.qkv.weight", [3 * d, d], linear_init(d, 1.2))
            add(b + "attn.qkv.bias", [3 * d], SMALL_BIAS)
            add(b + "attn.proj.weight", [d, d], linear_init(d, branch))
            add(b + "attn.proj.bias", [d], SMALL_BIAS)
        if t.layer_scale:
            add(b + f"ls1.{ls_name}", [d], LAYER_SCALE)
        add(b + "norm2.weight", [d], NORM_WEIGHT)
        add(b + "norm2.bias", [d], SMALL_BIAS)
        add(b + "mlp.fc1.weight", [m, d], linear_init(d))
        add(b + "mlp.fc1.bias", [m], SMALL_BIAS)
        add(b + "mlp.fc2.weight", [d, m], linear_init(m, 1.4 * branch))
        add(b + "mlp.fc2.bias", [d], SMALL_BIAS)
        if t.layer_scale:
            add(b + f"ls2.{ls_name}", [d], LAYER_SCALE)
    add("norm.weight", [d], NORM_WEIGHT)
    add("norm.bias", [d], SMALL_BIAS)
    if t.attn_pool:  # timm's AttentionPoolLatent, names exactly as timm's state_dict has them
        add("attn_pool.latent", [1, 1, d], TOKEN_INIT)
        add("attn_pool.q.weight", [d, d], linear_init(d))
        add("attn_pool.q.bias", [d], SMALL_BIAS)
        add("attn_pool.kv.weight", [2 * d, d], linear_init(d))
        add("attn_pool.kv.bias", [2 * d], SMALL_BIAS)
        add("attn_pool.proj.weight", [d, d], linear_init(d))
        add("attn_pool.proj.bias", [d], SMALL_BIAS)
        add("attn_pool.norm.weight", [d], NORM_WEIGHT)
        add("attn_pool.norm.bias", [d], SMALL_BIAS)
        add("attn_pool.mlp.fc1.weight", [m, d], linear_init(d))
        add("attn_pool.mlp.fc1.bias", [m], SMALL_BIAS)
        add("attn_pool.mlp.fc2.weight", [d, m], linear_init(m))
        add("attn_pool.mlp.fc2.bias", [d], SMALL_BIAS)
    return specs


def _decoder_specs(prefix: str, dec: DecoderDims) -> list[TensorSpec]:
    h, hd, inter = dec.hidden, dec.head_dim, dec.intermediate
    specs = []

    def add(name, shape, init):
        specs.append(TensorSpec(prefix + name, tuple(shape), init))

    # Tied embeddings double as the LM head, so they need the head's spread of a few logit units;
    # untied ones get ~1/sqrt(hidden) (0.016 at the real 4096).
    embed_std = dec.embed_std or (3.0 / math.sqrt(h) if dec.tied else 1.0 / math.sqrt(h))
    add("model.embed_tokens.weight", [dec.vocab, h], Init(0.0, embed_std * math.sqrt(3.0)))
    for i in range(dec.layers):
        b = f"model.layers.{i}."
        # q/k gain 2.5: attention scores with a spread of ~6 units, so that attention is
        # selective and greedy decoding does not collapse onto one repeated token (which would
        # make a broken KV cache or position handling invisible).
        add(b + "self_attn.q_proj.weight", [dec.heads * hd, h], linear_init(h, 2.5))
        add(b + "self_attn.k_proj.weight", [dec.kv_heads * hd, h], linear_init(h, 2.5))
        add(b + "self_attn.v_proj.weight", [dec.kv_heads * hd, h], linear_init(h, 1.5))
        add(b + "self_attn.o_proj.weight", [h, dec.heads * hd], linear_init(dec.heads * hd, 1.5))
        add(b + "mlp.gate_proj.weight", [inter, h], linear_init(h))
        add(b + "mlp.up_proj.weight", [inter, h], linear_init(h))
        add(b + "mlp.down_proj.weight", [h, inter], linear_init(inter, 1.5))
        add(b + "input_layernorm.weight", [h], NORM_WEIGHT)
        add(b + "post_attention_layernorm.weight", [h], NORM_WEIGHT)
    add("model.norm.weight", [h], NORM_WEIGHT)
    if not dec.tied:
        # RMSNorm output has unit RMS, so gain 3 gives logits with a spread of ~3 units.
        add("lm_head.weight", [dec.vocab, h], linear_init(h, 3.0))
    return specs


def tensor_specs(v: Variant) -> list[TensorSpec]:
    native = v.layout == "native"
    if native:
        dino_prefix, siglip_prefix = "vision_backbone.featurizer.0.", "vision_backbone.featurizer.1."
        proj_names = ("projector.0", "projector.2", "projector.4")
        llm_prefix = "llm_backbone.llm."
    else:
        dino_prefix, siglip_prefix = "vision_backbone.featurizer.", "vision_backbone.fused_featurizer."
        proj_names = ("projector.fc1", "projector.fc2", "projector.fc3")
        llm_prefix = "language_model."
    specs = _tower_specs(dino_prefix, v.dino, v, native)
    specs += _tower_specs(siglip_prefix, v.siglip, v, native)
    fused = v.dino.width + v.siglip.width
    h = v.decoder.hidden
    # Prismatic's FusedMLPProjector: fused -> 4*fused -> GELU -> llm -> GELU -> llm.
    for name, (out_dim, in_dim) in zip(proj_names, [(4 * fused, fused), (h, 4 * fused), (h, h)]):
        specs.append(TensorSpec(name + ".weight", (out_dim, in_dim), linear_init(in_dim)))
        specs.append(TensorSpec(name + ".bias", (out_dim,), SMALL_BIAS))
    specs += _decoder_specs(llm_prefix, v.decoder)
    names = [s.name for s in specs]
    assert len(names) == len(set(names)), "duplicate tensor names"
    return specs


# --------------------------------------------------------------------------------------------
# Deterministic values
# --------------------------------------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_LANES = 4  # each 64-bit hash feeds four 16-bit uniforms (ample for bf16/f16 mantissas)


def tensor_key(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"moxin-vlm-test-weights/{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def uniform_values(key: int, init: Init, start: int, count: int) -> np.ndarray:
    """float32 values of elements [start, start + count) of a tensor; start % 4 == 0.

    Element e takes 16 bits of splitmix64(key + (e // 4 + 1) * golden): bits [16*(e%4), +16).
    With k those 16 bits, the value is float32(k * c1) + c0 (two correctly rounded float32
    operations), where c1 = amp * 2^-15 and c0 = offset + amp * (2^-16 - 1), i.e. offset + amp * u
    with u = (2k + 1) / 65536 - 1 uniform on (-1, 1).
    """
    assert start % _LANES == 0
    first = start // _LANES
    last = (start + count + _LANES - 1) // _LANES
    with np.errstate(over="ignore"):
        z = np.arange(first + 1, last + 1, dtype=np.uint64)
        z *= _GOLDEN
        z += np.uint64(key)
        z ^= z >> np.uint64(30)
        z *= _MIX1
        z ^= z >> np.uint64(27)
        z *= _MIX2
        z ^= z >> np.uint64(31)
    lanes = z.astype("<u8", copy=False).view("<u2")[:count]
    c1 = np.float32(init.amp * 2.0**-15)
    c0 = np.float32(init.offset + init.amp * (2.0**-16 - 1.0))
    values = np.multiply(lanes, c1, dtype=np.float32)
    values += c0
    return values


def f32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bf16, as little-endian uint16 bit patterns (no NaNs here)."""
    bits = values.view(np.uint32)
    rounding = bits >> np.uint32(16)
    rounding &= np.uint32(1)
    rounding += np.uint32(0x7FFF)
    bits += rounding
    bits >>= np.uint32(16)
    return bits.astype("<u2")


def encode(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bf16":
        return f32_to_bf16_bits(values)
    if dtype == "f16":
        return values.astype("<f2")  # IEEE round-to-nearest-even, same on every platform
    return values.astype("<f4", copy=False)


def tensor_bytes_chunks(spec: TensorSpec, seed: int, dtype: str):
    key = tensor_key(seed, spec.name)
    n = spec.numel
    for start in range(0, n, CHUNK_ELEMENTS):
        count = min(CHUNK_ELEMENTS, n - start)
        yield encode(uniform_values(key, spec.init, start, count), dtype)


def tensor_array(v: Variant, spec: TensorSpec) -> np.ndarray:
    """Whole tensor as float32 (after rounding to the stored dtype); for small tensors / tests."""
    parts = [np.asarray(c) for c in tensor_bytes_chunks(spec, v.seed, v.dtype)]
    raw = np.concatenate(parts) if parts else np.zeros(0, STORAGE[v.dtype][1])
    if v.dtype == "bf16":
        out = (raw.astype(np.uint32) << np.uint32(16)).view(np.float32)
    else:
        out = raw.astype(np.float32)
    return out.reshape(spec.shape)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def plan_shards(v: Variant, specs: list[TensorSpec]) -> list[list[TensorSpec]]:
    width = STORAGE[v.dtype][2]
    sizes = [s.numel * width for s in specs]
    shards, current, current_bytes = [], [], 0
    if v.max_shard_bytes:
        for spec, size in zip(specs, sizes):
            # Like HF's max_shard_size: a new shard when this tensor would overflow the limit.
            if current and current_bytes + size > v.max_shard_bytes:
                shards.append(current)
                current, current_bytes = [], 0
            current.append(spec)
            current_bytes += size
        shards.append(current)
    else:
        # Exactly v.shards shards of similar size: a tensor goes where its midpoint falls.
        total = sum(sizes)
        shards = [[] for _ in range(v.shards)]
        offset = 0
        for spec, size in zip(specs, sizes):
            shards[min(v.shards - 1, (2 * offset + size) * v.shards // (2 * total))].append(spec)
            offset += size
        shards = [s for s in shards if s]
    if not v.max_shard_bytes and len(shards) != v.shards:
        raise RuntimeError(f"{v.name}: planned {len(shards)} shards, wanted {v.shards}")
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def safetensors_header(specs: list[TensorSpec], dtype: str) -> bytes:
    st_dtype, _, width = STORAGE[dtype]
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        size = s.numel * width
        header[s.name] = {"dtype": st_dtype, "shape": list(s.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format wants the data to start 8-byte aligned
    return struct.pack("<Q", len(text)) + text


class HashingWriter:
    def __init__(self, path: Path):
        self.file = open(path, "wb")
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> None:
        mv = memoryview(data).cast("B")
        self.file.write(mv)
        self.sha.update(mv)
        self.size += len(mv)

    def close(self) -> str:
        self.file.close()
        return self.sha.hexdigest()


def config_json(v: Variant) -> dict:
    d = v.decoder
    return {
        "architectures": ["PrismaticForConditionalGeneration"],
        "model_type": "prismatic",
        "vision_backbone_id": "dinosiglip-vit-so-224px",
        "llm_backbone_id": "moxin-7b",
        "arch_specifier": "no-align+fused-gelu-mlp",
        "use_fused_vision_backbone": True,
        "image_resize_strategy": "resize-naive",
        "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
        "timm_override_act_layers": [None, None],
        "image_sizes": [v.image_size, v.image_size],
        "pad_token_id": 32000,
        "pad_to_multiple_of": 64,
        "image_token_index": 32000,
        "torch_dtype": TORCH_DTYPE_NAME[v.dtype],
        "text_config": {
            "model_type": "mistral",
            "hidden_size": d.hidden,
            "num_hidden_layers": d.layers,
            "num_attention_heads": d.heads,
            "num_key_value_heads": d.kv_heads,
            "intermediate_size": d.intermediate,
            "vocab_size": d.vocab,
            "rms_norm_eps": d.rms_eps,
            "rope_theta": d.rope_theta,
            "max_position_embeddings": 32768,
            "sliding_window": 4096,
            "tie_word_embeddings": d.tied,
            "hidden_act": "silu",
            "torch_dtype": TORCH_DTYPE_NAME[v.dtype],
        },
    }


def write_text(path: Path, text: str) -> str:
    data = text.encode()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def generate(v: Variant, out: Path, quiet: bool = False) -> dict[str, str]:
    """Write the variant into `out`; returns {file name: sha256}."""
    out.mkdir(parents=True, exist_ok=True)
    specs = tensor_specs(v)
    shards = plan_shards(v, specs)
    names = shard_file_names(len(shards))
    hashes = {}
    start = time.time()
    for fname, shard in zip(names, shards):
        tmp = out / (fname + ".partial")
        w = HashingWriter(tmp)
        w.write(safetensors_header(shard, v.dtype))
        for spec in shard:
            for chunk in tensor_bytes_chunks(spec, v.seed, v.dtype):
                w.write(chunk)
        hashes[fname] = w.close()
        os.replace(tmp, out / fname)
        if not quiet:
            print(f"  {v.name}/{fname}: {w.size / 1e9:.3f} GB, {time.time() - start:.1f} s", flush=True)
    if len(shards) > 1:
        width = STORAGE[v.dtype][2]
        index = {
            "metadata": {"total_size": sum(s.numel * width for s in specs)},
            "weight_map": {s.name: fname for fname, shard in zip(names, shards) for s in shard},
        }
        hashes["model.safetensors.index.json"] = write_text(
            out / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    hashes["config.json"] = write_text(out / "config.json", json.dumps(config_json(v), indent=2) + "\n")
    return dict(sorted(hashes.items()))


def expected_files(v: Variant) -> list[str]:
    shards = plan_shards(v, tensor_specs(v))
    files = shard_file_names(len(shards)) + ["config.json"]
    if len(shards) > 1:
        files.append("model.safetensors.index.json")
    return sorted(files)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def recorded_hashes(v: Variant) -> dict[str, str] | None:
    meta = PARITY_DIR / v.name / "meta.json"
    if not meta.exists():
        return None
    return json.loads(meta.read_text())["checkpoint_sha256"]


def record_hashes(v: Variant, hashes: dict[str, str]) -> None:
    meta_path = PARITY_DIR / v.name / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {
        "variant": v.name,
        "description": "sha256 of the checkpoint written by reference/make_checkpoints.py "
                       f"--variant {v.name}; no reference outputs (benchmark checkpoint)",
    }
    meta["checkpoint_files"] = sorted(hashes)
    meta["checkpoint_sha256"] = hashes
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"recorded hashes in {meta_path}")


def verify(v: Variant, out: Path) -> list[str]:
    """Returns a list of problems (empty when every file matches the recorded sha256)."""
    want = recorded_hashes(v)
    if want is None:
        return [f"{v.name}: no recorded hashes in {PARITY_DIR / v.name / 'meta.json'}"]
    problems = []
    if sorted(want) != expected_files(v):
        problems.append(f"{v.name}: meta.json lists {sorted(want)}, the generator writes {expected_files(v)}")
    for fname, digest in sorted(want.items()):
        path = out / fname
        if not path.exists():
            problems.append(f"{v.name}: missing {path}")
            continue
        got = sha256_file(path)
        if got != digest:
            problems.append(f"{v.name}: sha256 mismatch for {path}: got {got}, meta.json records {digest}")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=sorted(VARIANTS))
    p.add_argument("--out", type=Path, help="output directory for --variant")
    p.add_argument("--all", action="store_true", help="every test variant (not `full`)")
    p.add_argument("--out-root", type=Path, help="with --all: writes OUT_ROOT/<variant>/")
    p.add_argument("--verify", action="store_true",
                   help="check existing files against tests/fixtures/parity/<variant>/meta.json "
                        "(without generating)")
    p.add_argument("--record", action="store_true",
                   help="after generating, write the sha256 of every file into "
                        "tests/fixtures/parity/<variant>/meta.json (for `full`, which has no "
                        "reference outputs; make_fixtures.py records the test variants)")
    p.add_argument("--list", action="store_true", help="print variants and tensor counts")
    args = p.parse_args(argv)

    if args.list:
        for v in VARIANTS.values():
            specs = tensor_specs(v)
            nbytes = sum(s.numel for s in specs) * STORAGE[v.dtype][2]
            print(f"{v.name:12s} {len(specs):5d} tensors {nbytes / 1e9:8.3f} GB {v.dtype} {v.layout}"
                  f" files={expected_files(v)}")
        return 0
    if args.all == bool(args.variant):
        p.error("give exactly one of --variant or --all")
    if args.variant:
        if args.out is None:
            p.error("--variant needs --out")
        jobs = [(VARIANTS[args.variant], args.out)]
    else:
        if args.out_root is None:
            p.error("--all needs --out-root")
        jobs = [(v, args.out_root / v.name) for v in TEST_VARIANTS]

    status = 0
    for v, out in jobs:
        if args.verify:
            problems = verify(v, out)
            for line in problems:
                print("MISMATCH " + line, file=sys.stderr)
            if problems:
                print(f"{v.name}: checkpoint in {out} does not match the recorded fixtures; "
                      f"regenerate it (scripts/make_test_checkpoints.sh) or, if the generator "
                      f"changed on purpose, regenerate the fixtures (reference/make_fixtures.py)",
                      file=sys.stderr)
                status = 1
            else:
                print(f"{v.name}: OK ({out})")
        else:
            t0 = time.time()
            hashes = generate(v, out)
            print(f"{v.name}: wrote {out} in {time.time() - t0:.1f} s")
            for fname, digest in hashes.items():
                print(f"  {digest}  {fname}")
            if args.record:
                record_hashes(v, hashes)
    return status


if __name__ == "__main__":
    sys.exit(main())
