#!/usr/bin/env python3
"""Parity fixtures: what the reference Moxin-VLM pipeline computes on the test checkpoints.

The reference is the Prismatic pipeline rebuilt from its own libraries, in float32:
  PIL resize (bicubic, 224x224, aspect not kept) + torchvision ToTensor/Normalize
  -> timm ViTs (DINOv2 ViT-L/14-reg4 and SigLIP SO400M/14 constructors; tiny dims for tiny variants)
     -> get_intermediate_layers(n={depth - 2}) (no final norm, prefix tokens dropped)
  -> fused GELU MLP projector (fc1 -> GELU -> fc2 -> GELU -> fc3, exact erf GELU)
  -> transformers MistralForCausalLM (eager attention) on [embed(BOS), 256 patches, embed(ids[1:])].
Weights are read from the checkpoint files written by make_checkpoints.py (with the `safetensors`
package, an independent reader) and upcast exactly from their stored dtype. Each stage is also
recomputed by a hand-written forward (plain torch ops, written from the architecture description)
and the script fails if the two disagree, so a library default that differs from REFERENCE.md
cannot slip into the fixtures unnoticed.

Usage:
  python3 reference/make_fixtures.py                      # every test variant
  python3 reference/make_fixtures.py --variant tiny-hf
  python3 reference/make_fixtures.py --checkpoints DIR    # default tests/fixtures/checkpoints

Generates the checkpoints first (make_checkpoints.py) if a variant's directory is missing.
Writes tests/fixtures/parity/<variant>/{pixel_dino,pixel_siglip,dino_features,siglip_features,
projector,logits}.npy and meta.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ["TIMM_USE_NAFLEXVIT"] = "false"  # the classic VisionTransformer is the reference

import numpy as np
import PIL
import torch
import torch.nn.functional as F
from PIL import Image

import timm
import torchvision
import transformers
from safetensors import safe_open
from timm.models.vision_transformer import VisionTransformer
from torchvision import transforms
from transformers import MistralConfig, MistralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_checkpoints as mc  # noqa: E402

PHOTO = mc.PARITY_DIR / "photo.png"
DINO_MEAN, DINO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
GREEDY_NEW_TOKENS = 32

# Prompt ids per variant: BOS then 7 ids below the variant's vocabulary size.
INPUT_IDS = {
    "real-towers": [1, 1733, 29, 873, 1960, 13, 402, 1024],
    "tiny-hf": [1, 402, 77, 311, 19, 250, 13, 468],
    "tiny-native": [1, 97, 455, 3, 288, 130, 511, 64],
    "tiny-f32": [1, 402, 77, 311, 19, 250, 13, 468],
}


# --------------------------------------------------------------------------------------------
# Checkpoint reading and name mapping
# --------------------------------------------------------------------------------------------


def load_checkpoint(ckpt: Path) -> dict[str, torch.Tensor]:
    index = ckpt / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    tensors = {}
    for fname in files:
        with safe_open(ckpt / fname, framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name).to(torch.float32)  # exact upcast
    return tensors


def take_prefix(weights: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def tower_state_dict_for_timm(sd: dict, native: bool) -> dict:
    """Our checkpoint names -> timm's VisionTransformer state_dict names."""
    out = {}
    for k, v in sd.items():
        if native:
            k = k.replace("register_tokens", "reg_token").replace("attn.out_proj.", "attn.proj.")
        else:
            k = k.replace(".scale_factor", ".gamma")
        out[k] = v
    if native:  # fuse split q/k/v rows back into timm's qkv (rows ordered q, k, v)
        for k in [k for k in out if ".attn.q_proj." in k]:
            base, kind = k.split(".attn.q_proj.")
            parts = [out.pop(f"{base}.attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{base}.attn.qkv.{kind}"] = torch.cat(parts, 0)
    return out


def build_tower(kind: str, dims: mc.TowerDims, sd: dict) -> VisionTransformer:
    # The exact constructors Prismatic uses; tiny variants override only the dimensions, so every
    # other option (reg_tokens, no_embed_class, class_token, global_pool, init_values, norms, act)
    # stays what the real model name configures.
    if kind == "dino":
        args = dict(img_size=224, num_classes=0)
        model_name = "vit_large_patch14_reg4_dinov2"
    else:
        args = dict(num_classes=0)
        model_name = "vit_so400m_patch14_siglip_224"
    real = mc.REAL_DINO if kind == "dino" else mc.REAL_SIGLIP
    if dims != real:
        args.update(embed_dim=dims.width, depth=dims.depth, num_heads=dims.heads,
                    mlp_ratio=dims.mlp / dims.width)
    model = timm.create_model(model_name, pretrained=False, **args)
    assert type(model) is VisionTransformer, type(model)
    assert model.blocks[0].mlp.fc1.out_features == dims.mlp
    assert model.blocks[0].attn.head_dim == (64 if kind == "dino" else 72)
    for m in model.modules():  # REFERENCE.md: exact GELU, LayerNorm eps 1e-6 everywhere
        if isinstance(m, torch.nn.GELU):
            assert m.approximate == "none", m
        if isinstance(m, torch.nn.LayerNorm):
            assert m.eps == 1e-6, m
    missing, unexpected = model.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    return model.eval()


def build_decoder(v: mc.Variant, sd: dict) -> MistralForCausalLM:
    d = v.decoder
    config = MistralConfig(
        hidden_size=d.hidden, num_hidden_layers=d.layers, num_attention_heads=d.heads,
        num_key_value_heads=d.kv_heads, intermediate_size=d.intermediate, vocab_size=d.vocab,
        rms_norm_eps=d.rms_eps, rope_theta=d.rope_theta, max_position_embeddings=32768,
        sliding_window=4096, tie_word_embeddings=d.tied, hidden_act="silu",
        attn_implementation="eager", torch_dtype=torch.float32)
    model = MistralForCausalLM(config).to(torch.float32).eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert missing == (["lm_head.weight"] if d.tied else []), missing
    if d.tied:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # transformers 5 keeps rope_theta under rope_parameters; make sure ours took effect.
    inv_freq = model.model.rotary_emb.inv_freq
    want = 1.0 / d.rope_theta ** (torch.arange(0, d.head_dim, 2, dtype=torch.float64) / d.head_dim)
    assert torch.allclose(inv_freq.double(), want, rtol=1e-6), (inv_freq[:4], want[:4])
    assert model.model.norm.variance_epsilon == d.rms_eps
    return model


# --------------------------------------------------------------------------------------------
# Hand-written forwards (independent cross-checks of the library outputs)
# --------------------------------------------------------------------------------------------


def manual_vit_features(sd: dict, pixels: torch.Tensor, dims: mc.TowerDims) -> torch.Tensor:
    """[1, 3, 224, 224] -> [1, 256, D]: output of block depth-2, no final norm, no prefix."""
    d, heads = dims.width, dims.heads
    x = F.conv2d(pixels, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14)
    x = x.flatten(2).transpose(1, 2)  # [1, 256, D], patches in row-major order
    x = x + sd["pos_embed"]  # patches only: added before the prefix tokens are prepended
    prefix = 0
    if dims.prefix:
        x = torch.cat([sd["cls_token"], sd["reg_token"], x], dim=1)
        prefix = 5
    for i in range(dims.depth - 1):  # blocks 0 .. depth-2
        b = f"blocks.{i}."
        h = F.layer_norm(x, (d,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-6)
        qkv = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])
        q, k, vv = qkv.view(1, -1, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) * (d // heads) ** -0.5, dim=-1)
        o = (att @ vv).transpose(1, 2).reshape(1, -1, d)
        o = F.linear(o, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        x = x + (o * sd[b + "ls1.gamma"] if dims.layer_scale else o)
        h = F.layer_norm(x, (d,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
        h = F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
        h = F.linear(h, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        x = x + (h * sd[b + "ls2.gamma"] if dims.layer_scale else h)
    return x[:, prefix:]


def manual_decoder_logits(sd: dict, embeds: torch.Tensor, d: mc.DecoderDims) -> torch.Tensor:
    """[1, L, H] fused embeddings -> [1, L, V]; RoPE rotate-half, GQA, causal, RMSNorm."""
    L, hd = embeds.shape[1], d.head_dim

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + d.rms_eps) * w

    inv_freq = 1.0 / d.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angles = torch.arange(L, dtype=torch.float32)[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

    def rope(t):  # [1, heads, L, hd]
        rotated = torch.cat([-t[..., hd // 2:], t[..., : hd // 2]], -1)
        return t * cos + rotated * sin

    mask = torch.full((L, L), float("-inf")).triu(1)
    x = embeds
    for i in range(d.layers):
        b = f"model.layers.{i}."
        h = rms(x, sd[b + "input_layernorm.weight"])
        q = F.linear(h, sd[b + "self_attn.q_proj.weight"]).view(1, L, d.heads, hd).transpose(1, 2)
        k = F.linear(h, sd[b + "self_attn.k_proj.weight"]).view(1, L, d.kv_heads, hd).transpose(1, 2)
        v = F.linear(h, sd[b + "self_attn.v_proj.weight"]).view(1, L, d.kv_heads, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        group = d.heads // d.kv_heads  # query head j uses KV head j // group
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5 + mask, -1)
        o = (att @ v).transpose(1, 2).reshape(1, L, d.heads * hd)
        x = x + F.linear(o, sd[b + "self_attn.o_proj.weight"])
        h = rms(x, sd[b + "post_attention_layernorm.weight"])
        gate = F.silu(F.linear(h, sd[b + "mlp.gate_proj.weight"]))
        x = x + F.linear(gate * F.linear(h, sd[b + "mlp.up_proj.weight"]), sd[b + "mlp.down_proj.weight"])
    head = sd["model.embed_tokens.weight"] if d.tied else sd["lm_head.weight"]
    return F.linear(rms(x, sd["model.norm.weight"]), head)


def check_close(what: str, got: torch.Tensor, want: torch.Tensor, tol: float = 2e-5) -> float:
    err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
    print(f"    {what}: max |diff| / max |ref| = {err:.2e}")
    if not err <= tol:
        raise SystemExit(f"{what}: hand-written forward disagrees with the library ({err:.3e} > {tol})")
    return err


# --------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------


def ensure_photo() -> None:
    if PHOTO.exists():
        return
    from skimage import data  # a real photo (451x300) bundled with scikit-image

    PHOTO.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data.chelsea()).save(PHOTO, optimize=True)


def preprocess(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Prismatic "resize-naive": Resize((224, 224), BICUBIC) on the PIL image, ToTensor, Normalize."""
    image = Image.open(path).convert("RGB")
    # torchvision's Resize on a PIL image calls PIL's resize; done by hand here to pin exactly it.
    resized = image.resize((224, 224), Image.BICUBIC)
    tensor = transforms.ToTensor()(resized)  # [3, 224, 224] float32 in [0, 1]
    via_tv = transforms.ToTensor()(transforms.Resize((224, 224), transforms.InterpolationMode.BICUBIC)(image))
    assert torch.equal(tensor, via_tv)
    dino = transforms.Normalize(DINO_MEAN, DINO_STD)(tensor)
    siglip = transforms.Normalize(SIGLIP_MEAN, SIGLIP_STD)(tensor)
    return dino[None], siglip[None]


def sha256_file(path: Path) -> str:
    return mc.sha256_file(path)


def save_npy(out: Path, name: str, tensor: torch.Tensor) -> None:
    np.save(out / f"{name}.npy", np.ascontiguousarray(tensor.detach().numpy().astype("<f4")))


def run_variant(v: mc.Variant, ckpt: Path) -> None:
    print(f"== {v.name} ({ckpt})", flush=True)
    if not ckpt.exists():
        mc.generate(v, ckpt)
    problems = [f for f in mc.expected_files(v) if not (ckpt / f).exists()]
    if problems:
        raise SystemExit(f"{ckpt}: missing {problems}")
    t0 = time.time()
    weights = load_checkpoint(ckpt)
    native = v.layout == "native"
    if native:
        dino_p, siglip_p = "vision_backbone.featurizer.0.", "vision_backbone.featurizer.1."
        proj = [take_prefix(weights, f"projector.{i}.") for i in (0, 2, 4)]
        llm_p = "llm_backbone.llm."
    else:
        dino_p, siglip_p = "vision_backbone.featurizer.", "vision_backbone.fused_featurizer."
        proj = [take_prefix(weights, f"projector.fc{i}.") for i in (1, 2, 3)]
        llm_p = "language_model."
    dino_sd = tower_state_dict_for_timm(take_prefix(weights, dino_p), native)
    siglip_sd = tower_state_dict_for_timm(take_prefix(weights, siglip_p), native)
    llm_sd = take_prefix(weights, llm_p)
    used = len(dino_sd) + len(siglip_sd) + sum(len(p) for p in proj) + len(llm_sd)
    if native:  # each fused qkv tensor stands for three split ones
        used += 2 * sum(".attn.qkv." in k for sd in (dino_sd, siglip_sd) for k in sd)
    assert used == len(weights), "unmapped tensors in the checkpoint"

    dino = build_tower("dino", v.dino, dino_sd)
    siglip = build_tower("siglip", v.siglip, siglip_sd)
    decoder = build_decoder(v, llm_sd)
    print(f"  loaded and built in {time.time() - t0:.1f} s", flush=True)

    pix_dino, pix_siglip = preprocess(PHOTO)
    ids = INPUT_IDS[v.name]
    assert ids[0] == 1 and max(ids) < v.decoder.vocab
    with torch.no_grad():
        # Prismatic's own call: partial(get_intermediate_layers, n={len(blocks) - 2}).
        dino_feat = dino.get_intermediate_layers(pix_dino, n={len(dino.blocks) - 2})[0]
        siglip_feat = siglip.get_intermediate_layers(pix_siglip, n={len(siglip.blocks) - 2})[0]
        assert torch.equal(dino_feat, dino.get_intermediate_layers(pix_dino, n=[v.dino.depth - 2])[0])
        assert dino_feat.shape == (1, v.num_patches, v.dino.width), dino_feat.shape
        assert siglip_feat.shape == (1, v.num_patches, v.siglip.width), siglip_feat.shape
        check_close("dino features vs manual", manual_vit_features(dino_sd, pix_dino, v.dino), dino_feat)
        check_close("siglip features vs manual",
                    manual_vit_features(siglip_sd, pix_siglip, v.siglip), siglip_feat)

        fused = torch.cat([dino_feat, siglip_feat], dim=-1)
        h = F.gelu(F.linear(fused, proj[0]["weight"], proj[0]["bias"]))
        h = F.gelu(F.linear(h, proj[1]["weight"], proj[1]["bias"]))
        projected = F.linear(h, proj[2]["weight"], proj[2]["bias"])  # [1, 256, H]

        embed = decoder.get_input_embeddings()
        ids_t = torch.tensor([ids])
        sequence = torch.cat([embed(ids_t[:, :1]), projected, embed(ids_t[:, 1:])], dim=1)
        logits = decoder(inputs_embeds=sequence).logits  # [1, L, V]
        check_close("logits vs manual", manual_decoder_logits(llm_sd, sequence, v.decoder), logits)

        # Greedy continuation, EOS ignored: append the argmax's embedding and rerun the sequence.
        greedy, gaps, seq = [], [], sequence
        for step in range(GREEDY_NEW_TOKENS):
            last = logits[0, -1] if step == 0 else decoder(inputs_embeds=seq).logits[0, -1]
            top2 = torch.topk(last, 2)
            token = int(top2.indices[0])
            greedy.append(token)
            gaps.append(float(top2.values[0] - top2.values[1]))
            seq = torch.cat([seq, embed(torch.tensor([[token]]))], dim=1)
        # The same continuation through generate()'s KV cache, as long as EOS doesn't stop it.
        gen = decoder.generate(inputs_embeds=sequence, max_new_tokens=GREEDY_NEW_TOKENS,
                               do_sample=False, eos_token_id=None, pad_token_id=0,
                               attention_mask=torch.ones(sequence.shape[:2], dtype=torch.long))
        gen_ids = gen[0, -GREEDY_NEW_TOKENS:].tolist()
        agree = next((i for i, (a, b) in enumerate(zip(gen_ids, greedy)) if a != b), len(greedy))
        print(f"    generate() agrees with the greedy loop for {agree}/{len(greedy)} tokens"
              f" (min gap before: {min(gaps[:agree] or [0]):.3f})")
        if agree < len(greedy) and gaps[agree] > 1e-3:
            raise SystemExit("generate() and the greedy loop diverge at a clear gap")

    out = mc.PARITY_DIR / v.name
    out.mkdir(parents=True, exist_ok=True)
    save_npy(out, "pixel_dino", pix_dino.permute(0, 2, 3, 1))  # NHWC [1, 224, 224, 3]
    save_npy(out, "pixel_siglip", pix_siglip.permute(0, 2, 3, 1))
    save_npy(out, "dino_features", dino_feat)
    save_npy(out, "siglip_features", siglip_feat)
    save_npy(out, "projector", projected)
    save_npy(out, "logits", logits)

    def stats(t):
        return {"rms": float(t.pow(2).mean().sqrt()), "max_abs": float(t.abs().max())}

    last_top2 = torch.topk(logits[0], 2, dim=-1).values
    d = v.decoder
    meta = {
        "variant": v.name,
        "description": "reference outputs (float32) of the seeded random-weight checkpoint written by "
                       "reference/make_checkpoints.py; see reference/README.md",
        "image": PHOTO.name,
        "image_sha256": sha256_file(PHOTO),
        "input_ids": ids,
        "sequence_length": int(sequence.shape[1]),
        "greedy_new_tokens": GREEDY_NEW_TOKENS,
        "greedy_ids": greedy,
        "greedy_top2_gap": [round(g, 6) for g in gaps],
        "logits_top2_gap": [round(float(g), 6) for g in (last_top2[:, 0] - last_top2[:, 1])],
        "checkpoint_layout": v.layout,
        "checkpoint_dtype": v.dtype,
        "checkpoint_files": mc.expected_files(v),
        "checkpoint_sha256": {f: sha256_file(ckpt / f) for f in mc.expected_files(v)},
        "dims": {
            "image_size": v.image_size, "patch_size": v.patch, "num_patches": v.num_patches,
            "dino": {"width": v.dino.width, "depth": v.dino.depth, "heads": v.dino.heads,
                     "head_dim": v.dino.width // v.dino.heads, "mlp": v.dino.mlp,
                     "prefix_tokens": 5, "feature_block": v.dino.depth - 2},
            "siglip": {"width": v.siglip.width, "depth": v.siglip.depth, "heads": v.siglip.heads,
                       "head_dim": v.siglip.width // v.siglip.heads, "mlp": v.siglip.mlp,
                       "prefix_tokens": 0, "feature_block": v.siglip.depth - 2},
            "projector": [v.dino.width + v.siglip.width, 4 * (v.dino.width + v.siglip.width),
                          d.hidden, d.hidden],
            "decoder": {"hidden": d.hidden, "layers": d.layers, "heads": d.heads,
                        "kv_heads": d.kv_heads, "head_dim": d.head_dim,
                        "intermediate": d.intermediate, "vocab": d.vocab, "rms_norm_eps": d.rms_eps,
                        "rope_theta": d.rope_theta, "tied_embeddings": d.tied},
        },
        "stats": {"dino_features": stats(dino_feat), "siglip_features": stats(siglip_feat),
                  "projector": stats(projected), "logits": stats(logits),
                  "logits_std": float(logits.std())},
        "arrays": {
            "pixel_dino.npy": "[1, 224, 224, 3] NHWC, DINOv2-normalised",
            "pixel_siglip.npy": "[1, 224, 224, 3] NHWC, SigLIP-normalised",
            "dino_features.npy": "[1, 256, Dd] block depth-2 output, no final norm, prefix dropped",
            "siglip_features.npy": "[1, 256, Ds] same for SigLIP",
            "projector.npy": "[1, 256, H] projector output",
            "logits.npy": "[1, L, V] at every position of [BOS, 256 patches, ids[1:]]",
        },
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "timm": timm.__version__, "transformers": transformers.__version__,
                     "torchvision": torchvision.__version__, "Pillow": PIL.__version__,
                     "numpy": np.__version__},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"  wrote {out} ({size / 1e6:.2f} MB) in {time.time() - t0:.1f} s; logits std "
          f"{meta['stats']['logits_std']:.2f}; greedy {greedy[:8]}...; min greedy gap {min(gaps):.3f}",
          flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=[v.name for v in mc.TEST_VARIANTS], action="append")
    p.add_argument("--checkpoints", type=Path, default=mc.REPO_ROOT / "tests" / "fixtures" / "checkpoints")
    args = p.parse_args(argv)
    torch.manual_seed(0)  # nothing here should be random; pinned anyway
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    ensure_photo()
    names = args.variant or [v.name for v in mc.TEST_VARIANTS]
    for name in names:
        run_variant(mc.VARIANTS[name], args.checkpoints / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
