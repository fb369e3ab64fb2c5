"""What weight-only quantisation (``--quantize int8`` / ``int4``) costs in quality, and what it saves (prints figures).

    python bench/quantize.py                   # parity-a's LLaMA + random 256x4, 1024x8, 4096x2 + the toy gallery
    python bench/quantize.py --skip-gallery --sizes 1024x8

LLaMA, each size against its own float32 model (same weights): logits relative error ||q - f|| / ||f|| over a
48-token teacher-forced call with a visual injection (through each model's own base wv), greedy-token agreement
(argmax at each of those positions), and a free greedy generation of 32 tokens from a 16-token prompt (how many
tokens come before the first that differs from float32's), with decode ms per token and the bytes of the LLaMA
weights side by side. bfloat16 alone is listed as well: the quantised models compute in it. Random weights have flat
logits (many near-ties), so agreement on them is a harsher test than on a trained model.
Encoders (int8 quantises them too): the cosine between the toy model's int8 and float32 embeddings of a gallery file
of each modality.
Gallery: the shipped toy model's 16 gallery examples (tests/test_default_model.py), greedy, cache on: how many name
the right thing, and how many answers are word for word float32's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ibllm.config import GenerationConfig, LlamaConfig, VisualCacheConfig  # noqa: E402
from ibllm.factory import load_default  # noqa: E402
from ibllm.llm.generate import generate_tokens  # noqa: E402
from ibllm.llm.llama import Transformer, init_weights  # noqa: E402
from ibllm.llm.quantize import SERVING_DTYPE, quantize_transformer, tensor_nbytes  # noqa: E402
from ibllm.parity.fixture import Fixture, build_network  # noqa: E402
from ibllm.types import Attachment  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PARITY = REPO.parent / "shared" / "fixtures" / "parity-a"
GALLERY = REPO / "examples" / "toy" / "gallery.json"
MODES = ("float32", "bfloat16", "int8", "int4")


def random_config(size: str) -> LlamaConfig:
    dim, layers = (int(x) for x in size.split("x"))
    return LlamaConfig(dim=dim, n_layers=layers, n_heads=max(dim // 128, 4), vocab_size=1024 if dim <= 256 else 32000,
                       multiple_of=32 if dim <= 256 else 256, lora_rank=16, w_lora=True, w_bias=True, max_seq_len=128)


def build(name: str, mode: str) -> Transformer:
    """The model ``name`` (a size, or "parity-a") served in ``mode``; the same weights every time it is built."""
    if name == "parity-a":
        model = build_network(Fixture(PARITY)).llama  # through the strict official loader
    else:
        model = Transformer(random_config(name))
        init_weights(model, torch.Generator().manual_seed(0), nonzero=0.02)
    model.eval()
    if mode in ("int8", "int4"):
        quantize_transformer(model, mode)
        return model.to(SERVING_DTYPE)
    model.merge_lora()
    return model.to(torch.float32 if mode == "float32" else SERVING_DTYPE)


@torch.no_grad()
def run_one(name: str, mode: str) -> dict:
    model = build(name, mode)
    cfg = model.cfg
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (1, 48), generator=g)
    adapters = torch.randn(model.query_layer, 1, 1, cfg.dim, generator=g) * 0.5
    injection = model.visual_injection(adapters.to(model.tok_embeddings.weight.dtype))
    logits = model(tokens, injection=injection, use_cache=False)
    model.setup_cache(1, cfg.max_seq_len)
    start = time.perf_counter()
    generated = list(generate_tokens(model, tokens[0, :16].tolist(), injection, GenerationConfig.greedy(32),
                                     eos_id=-1))
    elapsed = time.perf_counter() - start
    weight_bytes = sum(tensor_nbytes(p) for p in model.parameters())
    return {"logits": logits[0], "generated": generated, "decode_ms": elapsed / max(len(generated), 1) * 1e3,
            "bytes": weight_bytes}


def bench_llama(names: list[str]) -> None:
    print("LLaMA against its own float32 model (teacher-forced 48 tokens with injection; greedy 32 from 16):")
    for name in names:
        ref = run_one(name, "float32")
        f = ref["logits"]
        for mode in MODES:
            r = ref if mode == "float32" else run_one(name, mode)
            err = ((r["logits"] - f).norm() / f.norm()).item()
            agree = (r["logits"].argmax(-1) == f.argmax(-1)).float().mean().item()
            pairs = list(zip(r["generated"], ref["generated"], strict=True))
            same = next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))
            print(f"  {name:>9} {mode:>8}: logits rel err {err:.2e}, argmax agreement {agree:6.1%}, greedy: the "
                  f"first {same:2d}/{len(pairs)} tokens equal; weights {r['bytes'] / 2**20:8.1f} MiB, decode "
                  f"{r['decode_ms']:7.1f} ms/token", flush=True)


def bench_gallery() -> None:
    from tests.test_default_model import CHECKED  # imported here: the gallery's checked list lives with its test

    examples = {e["name"]: e for e in json.loads(GALLERY.read_text())["examples"]}
    answers: dict[str, dict[str, str]] = {}
    for mode in ("float32", "int8", "int4"):
        try:
            engine = load_default(quantize=None if mode == "float32" else mode, max_batch=1)
        except ValueError as refused:  # int4 on a CPU with torchao 0.16
            print(f"  toy gallery {mode:>8}: not run here ({refused})")
            continue
        answers[mode] = {}
        for name in CHECKED:
            entry = examples[name]
            files = [Attachment(str(GALLERY.parent / f["path"]), f["modality"], f["weight"]) for f in entry["files"]]
            answers[mode][name] = engine.answer(entry["question"], attachments=files,
                                                visual_cache=VisualCacheConfig(enabled=True),
                                                generation=GenerationConfig(temperature=0.0, max_new_tokens=32))
        engine.close()
        right = sum(all(w.lower() in answers[mode][n].lower() for w in examples[n]["expect"]) for n in CHECKED)
        same = sum(answers[mode][n] == answers["float32"][n] for n in CHECKED)
        print(f"  toy gallery {mode:>8}: {right}/{len(CHECKED)} name the right thing, {same}/{len(CHECKED)} word for "
              "word float32's", flush=True)
        for n in CHECKED:
            if answers[mode][n] != answers["float32"][n]:
                print(f"    {n}: {answers['float32'][n]!r} -> {answers[mode][n]!r}")


def bench_encoders() -> None:
    """int8 also quantises the encoders (and the bind network): how far each modality's embedding of a gallery file
    moves, as the cosine between the toy model's int8 and float32 embeddings (1 = unchanged)."""
    examples = json.loads(GALLERY.read_text())["examples"]
    files: dict[str, str] = {}
    for entry in examples:  # the first gallery file of each modality
        for f in entry["files"]:
            files.setdefault(f["modality"], str(GALLERY.parent / f["path"]))
    engines = {mode: load_default(quantize=None if mode == "float32" else mode, max_batch=1)
               for mode in ("float32", "int8")}
    for modality, path in files.items():
        emb = {mode: e.embed(Attachment(path, modality)) for mode, e in engines.items()}
        cos = torch.nn.functional.cosine_similarity(emb["int8"], emb["float32"], dim=0).item()
        print(f"  toy encoder {modality:>7} ({Path(path).name}): int8 vs float32 embedding cosine {cos:.5f}",
              flush=True)
    for e in engines.values():
        e.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="*", default=["256x4", "1024x8", "4096x2"], help="random LLaMA sizes DIMxLAYERS")
    p.add_argument("--skip-gallery", action="store_true")
    p.add_argument("--skip-llama", action="store_true", help="only the encoders and the gallery")
    args = p.parse_args()
    names = (["parity-a"] if (PARITY / "config.json").is_file() else []) + args.sizes
    if not args.skip_llama:
        bench_llama(names)
    bench_encoders()
    if not args.skip_gallery:
        bench_gallery()
    return 0


if __name__ == "__main__":
    sys.exit(main())
