#!/usr/bin/env python3
"""HF baseline on the GPU: the same checkpoint, image and prompt as `moxin-vlm bench`, bf16.

The vision towers are timm's ViTs (features of block depth-2, prefix tokens dropped, as
Prismatic takes them), the projector three bf16 linears with exact GELU, the decoder
transformers' MistralForCausalLM (sdpa attention, DynamicCache). Greedy decoding one token at a
time, every timed region ends with torch.cuda.synchronize(); medians of several runs.
Prints one JSON object.
"""
import argparse
import json
import statistics
import time

import torch
from safetensors import safe_open


def load_prefixed(directory, prefix):
    index = json.load(open(f"{directory}/model.safetensors.index.json"))["weight_map"]
    out = {}
    for name, file in index.items():
        if name.startswith(prefix):
            with safe_open(f"{directory}/{file}", "pt") as f:
                out[name[len(prefix):]] = f.get_tensor(name)
    return out


def tower(timm, name, directory, prefix):
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=224)
    missing, unexpected = model.load_state_dict(load_prefixed(directory, prefix), strict=False)
    return model.to(torch.bfloat16).cuda().eval()


def features(model, x):
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.norm_pre(x)
    for block in model.blocks[: len(model.blocks) - 1]:
        x = block(x)
    return x[:, model.num_prefix_tokens:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-tokens", type=int, default=24)
    ap.add_argument("--decode-tokens", type=int, default=64)
    args = ap.parse_args()
    import timm
    import transformers
    from transformers import MistralConfig, MistralForCausalLM

    cfg = json.load(open(f"{args.model}/config.json"))
    tc = dict(cfg["text_config"])
    tc.pop("model_type", None)
    t0 = time.time()
    dino = tower(timm, "vit_large_patch14_reg4_dinov2", args.model, "vision_backbone.featurizer.")
    siglip = tower(timm, "vit_so400m_patch14_siglip_224", args.model,
                   "vision_backbone.fused_featurizer.")
    p = load_prefixed(args.model, "projector.")
    proj = torch.nn.Sequential(
        torch.nn.Linear(p["fc1.weight"].shape[1], p["fc1.weight"].shape[0]), torch.nn.GELU(),
        torch.nn.Linear(p["fc2.weight"].shape[1], p["fc2.weight"].shape[0]), torch.nn.GELU(),
        torch.nn.Linear(p["fc3.weight"].shape[1], p["fc3.weight"].shape[0]))
    proj.load_state_dict({"0.weight": p["fc1.weight"], "0.bias": p["fc1.bias"],
                          "2.weight": p["fc2.weight"], "2.bias": p["fc2.bias"],
                          "4.weight": p["fc3.weight"], "4.bias": p["fc3.bias"]})
    proj = proj.to(torch.bfloat16).cuda().eval()
    config = MistralConfig(**tc)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        lm = MistralForCausalLM(config)
    state = load_prefixed(args.model, "language_model.")
    lm.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (rotary inv_freq) are not in the checkpoint: rebuild them for real.
    lm.model.rotary_emb = type(lm.model.rotary_emb)(config=config)
    lm = lm.cuda().eval()
    del state
    load_s = time.time() - t0

    torch.manual_seed(0)
    pix = torch.randn(1, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    ids = torch.tensor([[1] + [(i * 7919) % 32000 for i in range(1, args.prompt_tokens)]],
                       device="cuda")
    embed = lm.get_input_embeddings()

    def encode():
        v = torch.cat([features(dino, pix), features(siglip, pix)], dim=2)
        return proj(v)

    def prefill():
        visual = encode()
        text = embed(ids)
        fused = torch.cat([text[:, :1], visual, text[:, 1:]], dim=1)
        out = lm(inputs_embeds=fused, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        return token, out.past_key_values, fused.shape[1]

    def timed(fn, repeats=7):
        times = []
        result = None
        for r in range(repeats + 1):
            torch.cuda.synchronize()
            t = time.perf_counter()
            result = fn()
            torch.cuda.synchronize()
            if r:
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times), result

    with torch.inference_mode():
        vision_ms, _ = timed(encode)
        ttft_ms, (token, cache, positions) = timed(lambda: prefill())
        # warm-up decode
        for _ in range(4):
            out = lm(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        token, cache, positions = prefill()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.decode_tokens):
            out = lm(input_ids=token, past_key_values=cache,
                     use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            _ = token.item()  # greedy loops read the token each step
        torch.cuda.synchronize()
        decode_s = time.perf_counter() - t
    print(json.dumps({
        "impl": "hf-transformers", "transformers": transformers.__version__,
        "torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
        "load_s": load_s, "vision_ms": vision_ms, "ttft_ms": ttft_ms,
        "prefill_positions": positions, "decode_tokens": args.decode_tokens,
        "decode_tok_s": args.decode_tokens / decode_s,
        "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 1e9}, indent=2))


if __name__ == "__main__":
    main()
