"""Evaluation: the paper's claim in miniature, asked the way people chat. Per input kind and visual-cache mode, on
held-out scenes (latent combinations never seen in training), with the strict judge (``toyworld.judge``: the right
value named and no other value of the same latent):

- ``trained``: one question per latent the input carries, from the training part of the question grammar;
- ``heldout``: the same from the grammar's held-out ``test`` part (whole templates training never saw);
- ``followup``: a conversation of held-out phrasings: a first question, the model's own answer, then a question
  about another latent (turn 2), the model's answer, then a third (turn 3); turns 2 and 3 are judged, over
  every latent and "describe", and (``followup_latent``, the headline's) over the judged latents only;
- ``cannot_tell``: a held-out question about a latent the input does not carry; right = "I cannot tell ..."
  naming no value of it;
- ``describe``: a held-out "describe" question; right = every carried latent named right;
- ``named``, ``named_followup`` (``named_followup_latent``), ``named_cannot_tell``: the held-out, follow-up and
  can't-tell suites with questions that name the input as people do ("What colour is the object in this
  picture?", "What shape does this text talk about?"; ``toyworld.draw(..., named=modality)``): every question of
  the first two turns of a conversation names it, the third at random.

Inputs: each modality's file alone, and mixes of two held-out scenes' files whose modalities carry disjoint
latents (a point cloud of one scene with an IMU trace of another: the shape comes from one, the motion from the
other).

Every answer goes through the engine's own path: each file through ``ChatEngine.embed`` (media loader ->
encoder), ``fuse`` of the inputs, the visual cache's ``mix`` (cache on: the model's own settings), the bind
network, the chat prompt of ``llm.prompt.build_chat_prompt`` (history included), and greedy decoding (the toy
model's default) through the engine's decode loop (``DecodeBatch``), all scenes of one question step together.

The headline per input is the held-out figure over its carried latents among shape, colour and motion. Questions
are drawn per scene from a generator seeded by the scene's index, so every model is asked the same questions.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ibllm.bind import fuse
from ibllm.config import GenerationConfig
from ibllm.llm.batching import DecodeBatch, Request
from ibllm.llm.prompt import build_chat_prompt
from ibllm.train import toyworld as tw
from ibllm.train.common import progress
from ibllm.types import Attachment, Turn

HEADLINE = ("shape", "colour", "motion")
TARGETS = {"image": 0.90, "text": 0.90, "video": 0.85, "point": 0.90, "audio": 0.85, "imu": 0.80}
SUITES = ("trained", "heldout", "followup", "cannot_tell", "describe", "named", "named_followup",
          "named_cannot_tell")
# Mixed inputs: two held-out scenes, one file each, of modalities that carry disjoint latents.
MIXES = (("point", "imu"), ("audio", "imu"), ("depth", "imu"))
FOLLOWUP_TARGET = 0.85
CANNOT_TELL_TARGET = 0.90
SLOTS = 32  # decode rows at once


@torch.no_grad()
def answer_all(engine: Any, questions: list[str], histories: list[list[Turn]], injection: torch.Tensor,
               max_new_tokens: int) -> list[str]:
    """Greedy answers, one per row of ``injection`` (query_layer, B, H, 1, hd), each to its own question after
    its own history, prompted exactly as the chat prompts (``build_chat_prompt``) and decoded together."""
    llama, tok = engine.net.llama, engine.tokenizer
    max_prompt = llama.cfg.max_seq_len - max_new_tokens
    prompts = [build_chat_prompt(q, h, tok, max_prompt).ids for q, h in zip(questions, histories, strict=True)]
    batch = DecodeBatch(llama, min(SLOTS, len(prompts)), max_seq_len=llama.cfg.max_seq_len,
                        vocab_limit=tok.vocab_size)
    greedy = GenerationConfig.greedy(max_new_tokens)
    requests = [Request(p, injection[:, i:i + 1], greedy, tok.eos_id) for i, p in enumerate(prompts)]
    return [tok.decode(ids) for ids in batch.run(requests)]


class _Tally:
    """Right / asked per (suite, latent), and a few wrong answers per suite to show."""

    def __init__(self, keep: int):
        self.right: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
        self.wrong: dict[str, list[dict[str, str]]] = defaultdict(list)
        self.keep = keep

    def add(self, suite: str, latent: str, ok: bool, scene: tw.Scene, question: str, answer: str,
            history: list[Turn] | None = None) -> None:
        self.right[suite][latent].append(ok)
        if not ok and len(self.wrong[suite]) < self.keep:
            item = {"scene": repr(scene), "question": question, "answer": answer}
            if history:
                item["history"] = " / ".join(f"{t.user} -> {t.assistant}" for t in history)
            self.wrong[suite].append(item)

    def summary(self, carried: tuple[str, ...]) -> dict[str, Any]:
        def rate(values: list[bool]) -> float | None:
            return sum(values) / len(values) if values else None

        judged = [n for n in HEADLINE if n in carried]
        out: dict[str, Any] = {"judged": judged, "accuracy": {}, "wrong_examples": dict(self.wrong)}
        for suite, per in self.right.items():
            out["accuracy"][suite] = {latent: rate(v) for latent, v in per.items()}
            out["accuracy"][suite]["all"] = rate([x for v in per.values() for x in v])
        for suite in ("trained", "heldout", "followup_latent", "named", "named_followup_latent"):
            per = self.right.get(suite, {})
            out.setdefault("headline", {})[suite] = rate([x for n in judged for x in per.get(n, [])])
        return out


def _ask_suite(engine: Any, tally: _Tally, suite: str, scenes: list[tw.Scene], carried: tuple[str, ...],
               injection: torch.Tensor, latents_per_scene: list[list[str]], part: str, max_new: int,
               rngs: list[np.random.Generator], named: str | None = None) -> None:
    """One question per scene per round: round r asks scene i about ``latents_per_scene[i][r]`` (naming the
    input as a ``named`` one where given)."""
    rounds = max(len(x) for x in latents_per_scene)
    for r in range(rounds):
        rows = [i for i, x in enumerate(latents_per_scene) if r < len(x)]
        questions = [tw.draw(latents_per_scene[i][r], rngs[i], part, named) for i in rows]
        answers = answer_all(engine, questions, [[] for _ in rows], injection[:, rows], max_new)
        for i, q, a in zip(rows, questions, answers, strict=True):
            latent = latents_per_scene[i][r]
            tally.add(suite, latent, tw.judge(a, scenes[i], latent, carried), scenes[i], q, a)


def _ask_followups(engine: Any, tally: _Tally, scenes: list[tw.Scene], carried: tuple[str, ...],
                   injection: torch.Tensor, max_new: int, rngs: list[np.random.Generator], part: str,
                   named: str | None = None) -> None:
    """Three-turn conversations about different latents (carried ones and "describe"); turns 2 and 3 judged.
    ``named``: the first two questions name the input as that modality's, the third at random."""
    suite = "followup" if named is None else "named_followup"
    plans = [list(rng.permutation([*carried, "describe"]))[:3] for rng in rngs]
    histories: list[list[Turn]] = [[] for _ in scenes]
    for turn in range(3):
        rows = [i for i, p in enumerate(plans) if turn < len(p)]
        if not rows:
            break
        questions = [tw.draw(str(plans[i][turn]), rngs[i], part,
                             named if named is not None and (turn < 2 or rngs[i].random() < 0.5) else None)
                     for i in rows]
        answers = answer_all(engine, questions, [histories[i] for i in rows], injection[:, rows], max_new)
        for i, q, a in zip(rows, questions, answers, strict=True):
            latent = str(plans[i][turn])
            if turn:
                ok = tw.judge(a, scenes[i], latent, carried)
                tally.add(suite, f"turn{turn + 1}", ok, scenes[i], q, a, histories[i])
                tally.add(f"{suite}_latent", latent, ok, scenes[i], q, a, histories[i])
            histories[i] = [*histories[i], Turn(q, a)]


def _evaluate_input(engine: Any, feature: torch.Tensor, scenes: list[tw.Scene], carried: tuple[str, ...],
                    max_new: int, keep: int, part: str, named: str | None = None) -> dict[str, Any]:
    """Every suite for one input (``named``: its modality, for the suites whose questions name it)."""
    injection = engine.net.injection(feature.to(engine.device))
    n = len(scenes)

    def rngs(salt: int) -> list[np.random.Generator]:
        return [np.random.default_rng([i, salt]) for i in range(n)]

    tally = _Tally(keep)
    asked = [[*carried] for _ in scenes]
    _ask_suite(engine, tally, "trained", scenes, carried, injection, asked, "train", max_new, rngs(1))
    _ask_suite(engine, tally, "heldout", scenes, carried, injection, asked, part, max_new, rngs(2))
    _ask_suite(engine, tally, "describe", scenes, carried, injection, [["describe"]] * n, part, max_new, rngs(3))
    missing = [name for name in tw.LATENTS if name not in carried]
    if missing:
        pick = [[missing[int(r.integers(len(missing)))]] for r in rngs(4)]
        _ask_suite(engine, tally, "cannot_tell", scenes, carried, injection, pick, part, max_new, rngs(5))
    _ask_followups(engine, tally, scenes, carried, injection, max_new, rngs(6), part)
    if named is not None:
        _ask_suite(engine, tally, "named", scenes, carried, injection, asked, part, max_new, rngs(7), named)
        if missing:
            pick = [[missing[int(r.integers(len(missing)))]] for r in rngs(8)]
            _ask_suite(engine, tally, "named_cannot_tell", scenes, carried, injection, pick, part, max_new, rngs(9),
                       named)
        _ask_followups(engine, tally, scenes, carried, injection, max_new, rngs(10), part, named)
    return tally.summary(carried)


def evaluate(engine: Any, data_root: str | Path, *, split: str = "heldout", n: int | None = None,
             modalities: tuple[str, ...] = tw.MODALITIES, mixes: tuple[tuple[str, str], ...] = MIXES,
             cache_modes: tuple[bool, ...] = (False, True), max_new_tokens: int = 40, show: bool = True,
             keep_answers: int = 3, part: str = "test") -> dict[str, Any]:
    """Every suite per input and cache mode. ``engine`` is a ``ChatEngine`` (e.g. ``load_default``).

    ``part``: the grammar part of the held-out questions ("test"; "validation" with a validation ``split`` for
    choosing settings without touching the reported figures)."""
    records = tw.read_manifest(Path(data_root) / f"{split}.jsonl")[:n]
    scenes: list[tw.Scene] = [r["scene"] for r in records]
    opts = engine.cfg.visual_cache
    results: dict[str, Any] = {"n_scenes": len(scenes), "split": split, "part": part,
                               "cache_options": vars(opts), "inputs": {}}
    has_cache = engine.visual_cache is not None
    present = [m for m in modalities if records and m in records[0]["files"]]
    bar = progress(len(records) * len(present), "eval: encode", disable=not show, unit="file")
    embeddings: dict[str, torch.Tensor] = {}
    for m in present:
        rows = []
        for r in records:
            rows.append(engine.embed(Attachment(str(r["files"][m]), m))[None])
            bar.update()
        embeddings[m] = torch.cat(rows)
    bar.close()

    inputs: dict[str, tuple[torch.Tensor, list[tw.Scene], tuple[str, ...]]] = {}
    for m in present:
        inputs[m] = fuse([embeddings[m]], [1.0]), scenes, tw.carried_by(m)
    shifted = scenes[1:] + scenes[:1]  # the second input of a mix shows the next scene
    for a, b in mixes:
        if a in embeddings and b in embeddings and len(scenes) > 1:
            mixed = [tw.mixed_scene([(s, a), (t, b)]) for s, t in zip(scenes, shifted, strict=True)]
            other = torch.cat([embeddings[b][1:], embeddings[b][:1]])
            inputs[f"{a}+{b}"] = fuse([embeddings[a], other], [1.0, 1.0]), [s for s, _ in mixed], mixed[0][1]

    modes = [c for c in cache_modes if has_cache or not c]
    bar = progress(len(inputs) * len(modes), "eval: answer", disable=not show, unit="input")
    for name, (feature, input_scenes, carried) in inputs.items():
        per_mode = {}
        for cache_on in modes:
            f = feature
            if cache_on:
                f = engine.visual_cache.mix(feature, min(opts.top_k, len(engine.visual_cache)), opts.temperature,
                                            opts.weight)
            per_mode["on" if cache_on else "off"] = _evaluate_input(engine, f, input_scenes, carried,
                                                                    max_new_tokens, keep_answers, part,
                                                                    name if name in tw.MODALITIES else None)
            bar.update()
        results["inputs"][name] = per_mode
    bar.close()
    return results


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f} %"


def _pair(per: dict[str, Any], get: Any) -> str:
    values = [get(per[k]) for k in ("off", "on") if k in per]
    return " / ".join(_pct(v) for v in values)


def markdown(results: dict[str, Any]) -> str:
    """README's tables: every suite per input (cache off / on), then the held-out figure per latent."""
    inputs = results["inputs"]
    opts = results["cache_options"]
    lines = [
        f"Held-out toy-world scenes (latent combinations never seen in training), {results['n_scenes']} per input, "
        "greedy answers through the chat's own prompt and decode path, strict judge. Each cell: cache off / on "
        f"(top-{opts['top_k']}, temperature {opts['temperature']:g}, weight {opts['weight']:g}). "
        "*Trained* and *held-out phrasings*: mean over the input's carried latents among shape / colour / motion; "
        "*follow-ups*: turns 2 and 3 of a held-out-phrased conversation, asking about any latent or to describe "
        "(*all*) or about the judged latents only (*judged*); *can't tell*: asked about a latent the "
        "input does not carry; *describe*: every carried latent named.",
        "",
        "| input | judged on | trained phrasings | held-out phrasings | follow-ups, judged | follow-ups, all "
        "| can't tell | describe | target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, per in inputs.items():
        first = per.get("off") or per.get("on")
        target = f"≥ {100 * TARGETS[name]:.0f} %" if name in TARGETS else "–"
        lines.append(
            f"| {name} | {', '.join(first['judged'])} "
            f"| {_pair(per, lambda r: r['headline']['trained'])} "
            f"| {_pair(per, lambda r: r['headline']['heldout'])} "
            f"| {_pair(per, lambda r: r['headline'].get('followup_latent'))} "
            f"| {_pair(per, lambda r: r['accuracy'].get('followup', {}).get('all'))} "
            f"| {_pair(per, lambda r: r['accuracy'].get('cannot_tell', {}).get('all'))} "
            f"| {_pair(per, lambda r: r['accuracy'].get('describe', {}).get('all'))} | {target} |")
    targets = f"follow-ups ≥ {100 * FOLLOWUP_TARGET:.0f} %, can't tell ≥ {100 * CANNOT_TELL_TARGET:.0f} %"
    lines += ["", f"Targets: {targets}.",
              "", "Held-out phrasings, every carried latent (cache off / on):", "",
              "| input | " + " | ".join(tw.LATENTS) + " |", "|---|" + "---|" * len(tw.LATENTS)]
    for name, per in inputs.items():
        cells = []
        for latent in tw.LATENTS:
            first = (per.get("off") or per.get("on"))["accuracy"]["heldout"].get(latent)
            cells.append(_pair(per, lambda r, n=latent: r["accuracy"]["heldout"].get(n)) if first is not None else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    named = {name: per for name, per in inputs.items()
             if (per.get("off") or per.get("on"))["headline"].get("named") is not None}
    if named:
        lines += ["", "Questions that name the input (\"the object in this picture\", \"What shape does this text "
                  "talk about?\"), held-out phrasings (cache off / on):", "",
                  "| input | held-out phrasings | follow-ups, judged | follow-ups, all | can't tell |",
                  "|---|---|---|---|---|"]
        for name, per in named.items():
            lines.append(
                f"| {name} | {_pair(per, lambda r: r['headline']['named'])} "
                f"| {_pair(per, lambda r: r['headline'].get('named_followup_latent'))} "
                f"| {_pair(per, lambda r: r['accuracy'].get('named_followup', {}).get('all'))} "
                f"| {_pair(per, lambda r: r['accuracy'].get('named_cannot_tell', {}).get('all'))} |")
    return "\n".join(lines) + "\n"


def ensure_heldout(data_root: str | Path, n: int, seed: int = 0, workers: int = 1, show: bool = True) -> Path:
    """Held-out scenes with every modality under ``data_root`` (generated when absent or too few)."""
    root = Path(data_root)
    manifest = root / "heldout.jsonl"
    if manifest.is_file() and sum(1 for _ in manifest.open()) >= n:
        return manifest
    return tw.make_dataset(root, n, seed, "heldout", tw.MODALITIES, workers=workers, progress=show)
