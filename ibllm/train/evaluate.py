"""Evaluation: the paper's claim in miniature. Per modality, on held-out scenes (latent combinations never seen in
training), how often the greedy answer names the right shape / colour / motion — only what that modality carries
(``toyworld.CARRIES``) — with the visual cache on and off.

Every answer goes through the engine's own path: the file through ``ChatEngine.embed`` (media loader ->
encoder), ``fuse`` of the single input, the visual cache's ``mix`` (cache on, the UI's default settings), the
bind network, then greedy decoding of the Alpaca prompt. Decoding is batched over scenes that share a question
(same prompt, one injection per row), which gives the same tokens as one-by-one greedy decoding.

Questions are ``toyworld.questions_for(modality, scene)`` without a generator: the first phrasing for each
carried latent, plus "Describe it." (correct when the description names every carried latent). The headline
figure per modality is the mean over its carried latents among shape, colour and motion.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ibllm.bind import fuse
from ibllm.config import GenerationConfig
from ibllm.llm.batching import DecodeBatch, Request
from ibllm.llm.prompt import format_prompt
from ibllm.train import toyworld as tw
from ibllm.train.common import progress
from ibllm.types import Attachment

HEADLINE = ("shape", "colour", "motion")
TARGETS = {"image": 0.90, "text": 0.90, "video": 0.85, "point": 0.80, "audio": 0.70, "imu": 0.70}
COLUMNS = (*tw.LATENTS, "describe")


@torch.no_grad()
def greedy_batch(llama: Any, prompt: list[int], injection: torch.Tensor, max_new_tokens: int,
                 eos_id: int, vocab_limit: int | None = None) -> list[list[int]]:
    """Greedy continuations of one prompt under B injections (query_layer, B, H, 1, hd), decoded together by the
    engine's own decode loop (``DecodeBatch``, with its own KV cache); ids at or past ``vocab_limit`` are never
    picked, as in the engine."""
    b = injection.shape[1]
    batch = DecodeBatch(llama, b, max_seq_len=min(len(prompt) + max_new_tokens, 2 * llama.cfg.max_seq_len),
                        vocab_limit=vocab_limit)
    greedy = GenerationConfig.greedy(max_new_tokens)
    return batch.run([Request(prompt, injection[:, i:i + 1], greedy, eos_id) for i in range(b)])


def evaluate(engine: Any, data_root: str | Path, *, split: str = "heldout", n: int | None = None,
             modalities: tuple[str, ...] = tw.MODALITIES, cache_modes: tuple[bool, ...] = (False, True),
             max_new_tokens: int = 40, show: bool = True, keep_answers: int = 3) -> dict[str, Any]:
    """Accuracy per modality, cache mode and latent. ``engine`` is a ``ChatEngine`` (e.g. ``load_default``)."""
    records = tw.read_manifest(Path(data_root) / f"{split}.jsonl")[:n]
    scenes: list[tw.Scene] = [r["scene"] for r in records]
    opts = engine.cfg.visual_cache
    net, tok = engine.net, engine.tokenizer
    device = engine.device
    results: dict[str, Any] = {"n_scenes": len(scenes), "split": split, "cache_options": vars(opts),
                               "modalities": {}}
    has_cache = engine.visual_cache is not None
    work = sum(len(records) for m in modalities if m in records[0]["files"]) if records else 0
    bar = progress(work, "eval: encode", disable=not show, unit="file")
    features: dict[str, torch.Tensor] = {}
    for m in modalities:
        if not records or m not in records[0]["files"]:
            continue
        rows = []
        for r in records:
            rows.append(fuse([engine.embed(Attachment(str(r["files"][m]), m))[None]], [1.0]))
            bar.update()
        features[m] = torch.cat(rows)
    bar.close()
    n_batches = sum(len(tw.CARRIES[m]) + 1 for m in features) * len([c for c in cache_modes if has_cache or not c])
    bar = progress(n_batches, "eval: answer", disable=not show, unit="question")
    for m, feat in features.items():
        per_mode: dict[str, Any] = {}
        for cache_on in cache_modes:
            if cache_on and not has_cache:
                continue
            cache = engine.visual_cache
            f = cache.mix(feat, min(opts.top_k, len(cache)), opts.temperature, opts.weight) if cache_on else feat
            injection = net.injection(f.to(device))
            items_per_scene = [tw.questions_for(m, s) for s in scenes]
            correct: dict[str, list[bool]] = defaultdict(list)
            examples: dict[str, list[dict[str, str]]] = defaultdict(list)
            for q_index, item0 in enumerate(items_per_scene[0]):
                prompt = tok.encode(format_prompt(item0["question"]), bos=True, eos=False)
                answers = [tok.decode(ids) for ids in greedy_batch(net.llama, prompt, injection, max_new_tokens,
                                                                       tok.eos_id, tok.vocab_size)]
                for s, items, answer in zip(scenes, items_per_scene, answers, strict=True):
                    item = items[q_index]
                    ok = tw.answer_is_correct(answer, item["expected"])
                    correct[item["latent"]].append(ok)
                    if len(examples[item["latent"]]) < keep_answers and not ok:
                        examples[item["latent"]].append({"scene": repr(s), "question": item["question"],
                                                         "answer": answer, "expected": " ".join(item["expected"])})
                bar.update()
            acc = {latent: sum(v) / len(v) for latent, v in correct.items()}
            judged = [latent for latent in HEADLINE if latent in tw.CARRIES[m]]
            headline = sum(sum(correct[latent]) for latent in judged) / sum(len(correct[latent]) for latent in judged)
            per_mode["on" if cache_on else "off"] = {"accuracy": acc, "headline": headline, "judged": judged,
                                                     "wrong_examples": dict(examples)}
        results["modalities"][m] = per_mode
    bar.close()
    return results


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f} %"


def markdown(results: dict[str, Any]) -> str:
    """The README table (headline per modality, cache off/on) and the per-latent breakdown."""
    mods = results["modalities"]
    n = results["n_scenes"]
    opts = results["cache_options"]
    lines = [
        f"Held-out toy-world scenes (latent combinations never seen in training), {n} per modality, greedy "
        f"answers. Judged on the modality's carried latents among shape / colour / motion. Cache on: top-"
        f"{opts['top_k']}, temperature {opts['temperature']:g}, weight {opts['weight']:g}.",
        "",
        "| input | judged on | cache off | cache on | target |",
        "|---|---|---|---|---|",
    ]
    for m, per in mods.items():
        off, on = per.get("off"), per.get("on")
        judged = ", ".join((off or on)["judged"])
        target = f"≥ {100 * TARGETS[m]:.0f} %" if m in TARGETS else "–"
        lines.append(f"| {m} | {judged} | {_pct(off and off['headline'])} | {_pct(on and on['headline'])} | "
                     f"{target} |")
    lines += ["", "Every carried latent (cache off / on):", "",
              "| input | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for m, per in mods.items():
        cells = []
        for c in COLUMNS:
            vals = [per[k]["accuracy"].get(c) for k in ("off", "on") if k in per]
            cells.append(" / ".join(_pct(v) for v in vals) if vals and vals[0] is not None else "")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ensure_heldout(data_root: str | Path, n: int, seed: int = 0, workers: int = 1, show: bool = True) -> Path:
    """Held-out scenes with every modality under ``data_root`` (generated when absent or too few)."""
    root = Path(data_root)
    manifest = root / "heldout.jsonl"
    if manifest.is_file() and sum(1 for _ in manifest.open()) >= n:
        return manifest
    return tw.make_dataset(root, n, seed, "heldout", tw.MODALITIES, workers=workers, progress=show)
