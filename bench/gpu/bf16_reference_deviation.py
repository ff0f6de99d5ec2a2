#!/usr/bin/env python3
"""How far the reference itself lands from its float32 fixtures when run in bf16.

The CUDA parity tests hold bf16 checkpoints to tolerances against the float32 reference
(tests/fixtures/parity/<variant>/*.npy). This runs the same reference pipeline
(reference/make_fixtures.py: timm towers, the projector, HF transformers' Mistral) with every
weight and activation in bf16, as a user of the reference would run a bf16 model on a GPU,
and prints the same statistic the tests use (max |error| / max |reference|) per stage. It
tells which deviations from the float32 fixtures a bf16 computation makes on its own.

Usage (GPU machine, after the test checkpoints are generated):
    python3 bench/gpu/bf16_reference_deviation.py [--variant tiny-hf] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "reference"))
import make_checkpoints as mc  # noqa: E402
import make_fixtures as mf  # noqa: E402


def deviation(got: torch.Tensor, fixture: Path) -> dict:
    want = np.load(fixture).astype(np.float64)
    have = got.detach().float().cpu().numpy().astype(np.float64).reshape(want.shape)
    err = np.abs(have - want)
    a, b = have.ravel(), want.ravel()
    return {"max_rel": float(err.max() / np.abs(want).max()), "max_abs": float(err.max()),
            "cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", action="append", help="default: every bf16 test variant")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    variants = [v for v in mc.TEST_VARIANTS
                if (args.variant and v.name in args.variant) or (not args.variant and v.dtype == "bf16")]
    dt, dev = torch.bfloat16, torch.device(args.device)
    report = {}
    for v in variants:
        ckpt = REPO / "tests" / "fixtures" / "checkpoints" / v.name
        weights = mf.load_checkpoint(ckpt)
        native = v.layout == "native"
        if native:
            dino_p, siglip_p = "vision_backbone.featurizer.0.", "vision_backbone.featurizer.1."
            proj = [mf.take_prefix(weights, f"projector.{i}.") for i in (0, 2, 4)]
            llm_p = "llm_backbone.llm."
        else:
            dino_p, siglip_p = "vision_backbone.featurizer.", "vision_backbone.fused_featurizer."
            proj = [mf.take_prefix(weights, f"projector.fc{i}.") for i in (1, 2, 3)]
            llm_p = "language_model."
        dino = mf.build_tower("dino", v.dino, mf.tower_state_dict_for_timm(
            mf.take_prefix(weights, dino_p), native)).to(dev, dt)
        siglip = mf.build_tower("siglip", v.siglip, mf.tower_state_dict_for_timm(
            mf.take_prefix(weights, siglip_p), native)).to(dev, dt)
        decoder = mf.build_decoder(v, mf.take_prefix(weights, llm_p)).to(dev, dt)
        proj = [{k: t.to(dev, dt) for k, t in layer.items()} for layer in proj]
        fixtures = mc.PARITY_DIR / v.name
        pix_dino = torch.from_numpy(np.load(fixtures / "pixel_dino.npy")).to(dev, dt)
        pix_siglip = torch.from_numpy(np.load(fixtures / "pixel_siglip.npy")).to(dev, dt)
        # The fixtures hold NHWC pixels (the engine's layout); timm takes NCHW.
        pix_dino, pix_siglip = (x.permute(0, 3, 1, 2) if x.shape[-1] == 3 else x
                                for x in (pix_dino, pix_siglip))
        ids = torch.tensor([mf.INPUT_IDS[v.name]], device=dev)
        with torch.no_grad():
            dino_feat = dino.get_intermediate_layers(pix_dino, n={len(dino.blocks) - 2})[0]
            siglip_feat = siglip.get_intermediate_layers(pix_siglip, n={len(siglip.blocks) - 2})[0]
            h = torch.cat([dino_feat, siglip_feat], dim=-1)
            h = F.gelu(F.linear(h, proj[0]["weight"], proj[0]["bias"]))
            h = F.gelu(F.linear(h, proj[1]["weight"], proj[1]["bias"]))
            projected = F.linear(h, proj[2]["weight"], proj[2]["bias"])
            embed = decoder.get_input_embeddings()
            sequence = torch.cat([embed(ids[:, :1]), projected, embed(ids[:, 1:])], dim=1)
            logits = decoder(inputs_embeds=sequence).logits
        report[v.name] = {
            "dino": deviation(dino_feat, fixtures / "dino_features.npy"),
            "siglip": deviation(siglip_feat, fixtures / "siglip_features.npy"),
            "projector": deviation(projected, fixtures / "projector.npy"),
            "logits": deviation(logits, fixtures / "logits.npy"),
        }
        for stage, d in report[v.name].items():
            print(f"[{v.name}] bf16 reference {stage:9s} max_rel={d['max_rel']:.4g} "
                  f"max_abs={d['max_abs']:.4g} cosine={d['cosine']:.6f}", flush=True)
    print(json.dumps({"device": str(dev), "torch": torch.__version__, "report": report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
