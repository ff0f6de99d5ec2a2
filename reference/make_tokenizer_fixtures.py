#!/usr/bin/env python3
"""Builds the tokenizer fixtures under tests/fixtures/tokenizer/.

The vocabulary is the real Mistral-7B SentencePiece model (32000 pieces, byte fallback), shipped
as mistral_common/data/tokenizer.model.v1 in the Apache-2.0 `mistral-common` wheel. The
tokenizer.json is what transformers' LlamaConverter makes of it (legacy Prepend+Replace
normalizer), with `<PAD>` = 32000 added the way Prismatic does (add_special_tokens pad_token).

transformers 5.x cannot convert a .model (it writes a 3-entry vocabulary), so run this in a venv
with an older transformers:

  python3 -m venv /tmp/tokvenv
  /tmp/tokvenv/bin/pip install "transformers==4.46.3" sentencepiece protobuf
  /tmp/tokvenv/bin/pip install --no-deps mistral-common==1.13.1
  /tmp/tokvenv/bin/python reference/make_tokenizer_fixtures.py

Outputs (all deterministic):
  mistral/tokenizer.model, tokenizer.json, tokenizer_config.json, added_tokens.json,
  special_tokens_map.json
  cases.json: the corpus, and per text the ids and decoded strings of HF `tokenizers` (for the
  committed tokenizer.json and for variants of it patched as recorded in the file) and of the
  `sentencepiece` package (for tokenizer.model); plus decode-only id sequences.
"""
import copy
import importlib.util
import json
import os
import shutil
import sys
import tempfile

import sentencepiece as spm
import tokenizers
import transformers
from transformers import LlamaTokenizerFast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizer")
MODEL_DIR = os.path.join(OUT, "mistral")

CORPUS = [
    "",
    "Hello world",
    "Hello, world! How are you today?",
    "In: What is in the image?\nOut:",
    "In: What is in the image?\nOut: A cat sitting on a red sofa.</s>",
    "The year 2024 had 366 days; pi is 3.14159265358979.",
    "1234567890 0x1F 1e-9 -42 +7 100%",
    "ASCII punctuation: !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "   leading spaces",
    "trailing spaces   ",
    " one leading and one trailing ",
    "runs  of   spaces    and     more",
    "line one\nline two\n\nline four\n",
    "\n\n\nstarts with newlines",
    "tabs\tbetween\t\twords\t",
    "mixed \t \n whitespace \r\n windows line ending",
    " ",
    "  ",
    "\n",
    "\t",
    "Café déjà vu, naïve façade, Ångström, Œuvre, straße, İstanbul",
    "Ελληνικά, русский язык, עברית, العربية, हिन्दी, ไทย",
    "日本語のテキストです。東京タワーは333メートル。",
    "中文：我爱北京天安门，今天天气很好。",
    "한국어 텍스트 입니다.",
    "Emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🦀",
    "Rare characters: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀 𐍈 ꙮ ﷺ \u200b zero-width \u00a0 nbsp",
    "Control chars: \x01\x02\x7f end",
    "NUL inside: a\x00b",
    "<s>",
    "</s>",
    "<PAD>",
    "<unk>",
    "<s>Hello</s>",
    "text with <PAD> inside and </s> and <s> markers",
    "<PAD><PAD> double",
    " <s> spaced </s> ",
    "<s ><PAD >< /s>",
    "def f(x):\n    return x ** 2  # square\n",
    "{\"json\": [1, 2, 3], \"nested\": {\"k\": null}}",
    "https://example.com/path?query=1&other=two#frag",
    "▁ literal metaspace ▁▁ chars ▁",
    "A" * 64,
    "The quick brown fox jumps over the lazy dog. " * 8,
]

# Hand-made id sequences for decode-only checks: byte runs cut short, invalid bytes, a lone
# metaspace, unknown and control pieces, the added pad token.
def b(x):
    return 3 + x

DECODE_ONLY = [
    [1, 22557, 1526, 2],
    [28705, 22557],
    [1, 28705, 22557],
    [0, 22557],
    [b(0x20), 22557],
    [b(0xE4), b(0xBD), 22557],
    [b(0xE4), b(0xBD), b(0xA0), b(0xE4), 22557],
    [b(0xE4), b(0xBD), b(0xA0)],
    [b(0xE4), b(0xBD)],
    [b(0xFF), b(0x41)],
    [22557, 0, 1526],
    [28705],
    [28705, 28705, 1526],
    [32000, 22557, 32000],
    [22557, 32000, 28705, 1526],
    [1, 2, 32000],
    [b(0xF0), b(0x9F), b(0x98), b(0x80), 28705, b(0xF0), b(0x9F)],
    [259, 22557, 259],  # "▁▁" first: a Metaspace decoder drops every "▁" of the first token
    [1, 259, 1526],
]

# Other tokenizer.json forms met in the wild, applied to the committed file as patches so only
# one 1.2 MB file is committed. The C++ test applies the same patches.
META = {"type": "Metaspace", "replacement": "\u2581"}
VARIANTS = {
    "metaspace_first": {"normalizer": None,
                        "pre_tokenizer": dict(META, prepend_scheme="first", split=False)},
    "metaspace_always_split": {"normalizer": None,
                               "pre_tokenizer": dict(META, prepend_scheme="always", split=True)},
    "metaspace_never": {"normalizer": None,
                        "pre_tokenizer": dict(META, prepend_scheme="never", split=False)},
    "no_strip_decoder": {"decoder": {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"}]}},
    "metaspace_decoder": {"normalizer": None,
                          "pre_tokenizer": dict(META, prepend_scheme="first", split=False),
                          "decoder": dict(META, prepend_scheme="first", split=False)},
    "merges_as_strings": {"merges_as_strings": True},
    "ignore_merges": {"ignore_merges": True},
    "pad_lstrip_rstrip": {"pad_lstrip": True, "pad_rstrip": True},
    "eos_template": {"post_processor": {"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": "</s>", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]},
                           "</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}}}},
}


def apply_variant(doc, patch):
    doc = copy.deepcopy(doc)
    for key, value in patch.items():
        if key == "merges_as_strings":
            doc["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m
                                      for m in doc["model"]["merges"]]
        elif key == "ignore_merges":
            doc["model"]["ignore_merges"] = value
        elif key in ("pad_lstrip", "pad_rstrip"):
            for token in doc["added_tokens"]:
                if token["content"] == "<PAD>":
                    token[key[4:]] = value
        else:
            doc[key] = value
    return doc


def find_spm_model():
    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        sys.exit("mistral-common is not installed (pip install --no-deps mistral-common==1.13.1)")
    path = os.path.join(spec.submodule_search_locations[0], "data", "tokenizer.model.v1")
    if not os.path.exists(path):
        sys.exit(f"{path} is missing from this mistral-common")
    return path


def build_model_dir():
    os.makedirs(MODEL_DIR, exist_ok=True)
    shutil.copyfile(find_spm_model(), os.path.join(MODEL_DIR, "tokenizer.model"))
    with tempfile.TemporaryDirectory() as tmp:
        fast = LlamaTokenizerFast(vocab_file=os.path.join(MODEL_DIR, "tokenizer.model"),
                                  legacy=True, from_slow=True, add_prefix_space=True)
        fast.add_special_tokens({"pad_token": "<PAD>"})
        fast.save_pretrained(tmp)
        for name in ("tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"):
            shutil.copyfile(os.path.join(tmp, name), os.path.join(MODEL_DIR, name))
        # Compact serialisation: same document, a third of the pretty-printed size.
        doc = json.load(open(os.path.join(tmp, "tokenizer.json"), encoding="utf-8"))
    with open(os.path.join(MODEL_DIR, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, separators=(",", ":"))
    assert len(doc["model"]["vocab"]) == 32000 and len(fast) == 32001, len(fast)
    return doc


def main():
    doc = build_model_dir()
    sp = spm.SentencePieceProcessor(model_file=os.path.join(MODEL_DIR, "tokenizer.model"))
    hf = tokenizers.Tokenizer.from_file(os.path.join(MODEL_DIR, "tokenizer.json"))
    assert hf.get_vocab_size(with_added_tokens=True) == 32001
    variants = {name: tokenizers.Tokenizer.from_str(json.dumps(apply_variant(doc, patch)))
                for name, patch in VARIANTS.items()}

    cases = []
    for text in CORPUS:
        ids = hf.encode(text, add_special_tokens=True).ids
        sp_ids = sp.encode(text)
        case = {
            "text": text,
            "hf_ids": ids,
            "hf_ids_no_bos": hf.encode(text, add_special_tokens=False).ids,
            "hf_decoded": hf.decode(ids, skip_special_tokens=True),
            "hf_decoded_with_special": hf.decode(ids, skip_special_tokens=False),
            "sp_ids": sp_ids,
            "sp_decoded": sp.decode(sp_ids),
            "variants": {},
        }
        for name, tok in variants.items():
            v_ids = tok.encode(text, add_special_tokens=True).ids
            case["variants"][name] = {
                "ids": v_ids,
                "decoded": tok.decode(v_ids, skip_special_tokens=True),
                "decoded_with_special": tok.decode(v_ids, skip_special_tokens=False),
            }
        cases.append(case)

    decode_only = []
    for ids in DECODE_ONLY:
        decode_only.append({
            "ids": ids,
            "hf_decoded": hf.decode(ids, skip_special_tokens=True),
            "hf_decoded_with_special": hf.decode(ids, skip_special_tokens=False),
            "variants": {name: {"decoded": tok.decode(ids, skip_special_tokens=True),
                                "decoded_with_special": tok.decode(ids, skip_special_tokens=False)}
                         for name, tok in variants.items()},
            # sentencepiece knows nothing of the added <PAD>; its reference skips that id.
            "sp_decoded": sp.decode([i for i in ids if i < sp.get_piece_size()]),
        })

    out = {
        "generator": "reference/make_tokenizer_fixtures.py",
        "versions": {"tokenizers": tokenizers.__version__, "sentencepiece": spm.__version__,
                     "transformers": transformers.__version__},
        "variants": VARIANTS,
        "cases": cases,
        "decode_only": decode_only,
    }
    with open(os.path.join(OUT, "cases.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
    print(f"wrote {len(cases)} cases, {len(decode_only)} decode-only sequences to {OUT}")


if __name__ == "__main__":
    main()
