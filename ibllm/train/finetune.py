"""Fine-tuning on your own data: the paper's stage 2 on image-instruction pairs from a JSONL file.

    python -m ibllm.train finetune --data pairs.jsonl --from assets/toy --out runs/mine
    python -m ibllm.train finetune --data pairs.jsonl --from 7B.pth --llama-dir LLaMA/7B_chinese \\
        --imagebind imagebind_w3D.pth --out runs/mine
    python app.py --adapter runs/mine/adapter.pth [--llama-dir ... --imagebind ...]

``pairs.jsonl`` holds one example per line (one JSON object each; shown wrapped here); paths are relative to the
file's folder::

    {"image": "shots/cube1.jpg", "question": "What shape is it?", "answer": "It is a blok."}
    {"files": ["clip.mp4", {"path": "scan.png", "modality": "depth", "weight": 0.5}], "question": "...",
     "answer": "..."}
    {"question": "Say hello.", "answer": "Hello."}

A modality's name as a key (``image``, ``audio``, ``point``, ...) takes a path or a list of paths; ``files`` takes
paths (modality detected as the chat does) or ``{"path", "modality", "weight"}`` objects; no files at all is a
text-only example (the all-zero image, as in the reference's stage 2). ``id`` is allowed and ignored.

What trains (REFERENCE.md section 6, stage 2): LLaMA's LoRA (through peft), biases and norms; the encoders, bind
network, prefix queries and gates stay frozen. The loss is next-token cross-entropy on the answer after the prompt
the chat itself builds for the question. Each example's inputs go once through the chat engine's own loaders,
encoders and fusion (``ChatEngine.fused_feature``); encoder outputs are kept in ``OUT/embeddings.safetensors``,
keyed by file content, so neither epochs nor reruns encode a file twice.

``OUT`` holds ``checkpoint.pt`` (every ``save_every`` steps and when a run stops early: the trained tensors, the
optimiser, the step; rerunning the same command continues from it), ``adapter.pth`` when done (the official
``7B.pth`` layout, ``{"model": {...}}``: bind network, prefix queries, gates, LoRA, biases, norms) and
``report.json`` (losses, validation losses, timings). Under ``torchrun`` every rank trains on its share of each
batch (``ibllm.train.common.Dist``); rank 0 encodes, validates and writes.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ibllm.bind import is_mix_weight
from ibllm.config import IMAGEBIND_HUGE, ImageBindConfig
from ibllm.engine import ChatEngine
from ibllm.factory import DEFAULT_ASSETS, load_default, load_official
from ibllm.kinds import MEDIA_KINDS
from ibllm.llm.lora import from_peft, mark_stage2_trainable, to_peft
from ibllm.llm.prompt import build_chat_prompt
from ibllm.media import detect_modality
from ibllm.media.errors import MediaError
from ibllm.train.common import (
    SINGLE,
    Dist,
    Resume,
    count,
    progress,
    read_json,
    seed_everything,
    train_loop,
    write_json,
)
from ibllm.train.language import IGNORE, Example, _visual_answer_loss, collate
from ibllm.types import Attachment

# Learning rates of stage 2: the paper's for the released 7B model (REFERENCE.md section 6), the toy recipe's
# for the embedded model (ibllm/train/pipeline.py, s2_lr).
LR_OFFICIAL = 1.25e-4
LR_TOY = 1e-3
FIELDS = ("files", "question", "answer", "id", *MEDIA_KINDS)


class FinetuneError(ValueError):
    """A fine-tuning run cannot start or continue; the message says why and what to do."""


class DataError(FinetuneError):
    """A line of the pairs file cannot be used; the message names the file and the line."""


@dataclass(frozen=True)
class Pair:
    line: int
    attachments: tuple[Attachment, ...]
    question: str
    answer: str


@dataclass(frozen=True)
class Settings:
    """What a run's result depends on; a rerun continues only when they are unchanged."""

    base: str
    data_sha256: str
    steps: int
    batch: int
    lr: float
    weight_decay: float = 0.0
    val_fraction: float = 0.1
    seed: int = 0


@dataclass
class Report:
    settings: dict[str, Any]
    pairs: int = 0
    train_pairs: int = 0
    val_pairs: int = 0
    trainable: int = 0
    encoded_files: int = 0  # by this invocation (the rest came from embeddings.safetensors)
    reused_files: int = 0
    resumed_from: int = 0
    steps_done: int = 0
    val_loss: list[tuple[int, float]] = field(default_factory=list)  # (step, loss); step 0 = before training
    seconds: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# Reading the pairs


def _attachment(item: Any, modality: str | None, root: Path, where: str) -> Attachment:
    weight = 1.0
    if isinstance(item, dict):
        unknown = sorted(set(item) - {"path", "modality", "weight"})
        if unknown or "path" not in item:
            raise DataError(f"{where}: a file entry is {{\"path\": ..., \"modality\": ..., \"weight\": ...}}"
                            + (f"; unknown keys {unknown}" if unknown else "; \"path\" is missing"))
        modality = item.get("modality", modality)
        weight = item.get("weight", 1.0)
        item = item["path"]
    if not isinstance(item, str) or not item:
        raise DataError(f"{where}: a file is a path string, got {item!r}")
    if not is_mix_weight(weight):
        raise DataError(f"{where}: weight must be a finite number >= 0, got {weight!r}")
    path = (root / item).resolve()
    if not path.is_file():
        raise DataError(f"{where}: file not found: {path}")
    if modality is None:
        try:
            modality = detect_modality(path)
        except MediaError as exc:
            raise DataError(f"{where}: {exc}") from None
    elif modality not in MEDIA_KINDS:
        raise DataError(f"{where}: unknown modality {modality!r}; accepted: {', '.join(MEDIA_KINDS)}")
    return Attachment(str(path), modality, float(weight))


def parse_pair(record: Any, line: int, root: Path, where: str) -> Pair:
    """One line's JSON object as a Pair (DataError naming ``where`` for anything unusable)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise DataError(f"{where}: unknown keys {unknown}; a line has question, answer and files and/or one key "
                        f"per modality ({', '.join(MEDIA_KINDS)})")
    for key in ("question", "answer"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise DataError(f"{where}: {key!r} must be a non-empty string")
    attachments = []
    for key in ("files", *MEDIA_KINDS):
        value = record.get(key)
        if value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            attachments.append(_attachment(item, None if key == "files" else key, root, where))
    return Pair(line, tuple(attachments), record["question"].strip(), record["answer"].strip())


def _raise_collected(errors: Sequence[str], what: str, limit: int = 20) -> None:
    if errors:
        more = f"\n(+{len(errors) - limit} more)" if len(errors) > limit else ""
        head = f"{len(errors)} lines of {what} cannot be used:\n" if len(errors) > 1 else ""
        raise DataError(head + "\n".join(errors[:limit]) + more)


def read_pairs(path: str | Path) -> list[Pair]:
    """Every line of a pairs file (blank lines skipped); DataError naming every bad line (file, line number)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pairs file not found: {path}")
    pairs, errors = [], []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        where = f"{path}, line {number}"
        try:
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            pairs.append(parse_pair(record, number, path.parent, where))
        except DataError as exc:
            errors.append(str(exc))
    _raise_collected(errors, str(path))
    if not pairs:
        raise DataError(f"{path}: no examples")
    return pairs


# ----------------------------------------------------------------------------------------------------------
# Inputs, encoded once


def _memo_key(key: tuple[str, str]) -> str:
    return f"{key[0]}:{key[1]}"


def encode_pairs(engine: ChatEngine, pairs: Sequence[Pair], memo: Path, *, source: str = "pairs", show: bool = True
                 ) -> tuple[torch.Tensor, list[bool], int, int]:
    """(N, E) fused features (rows of text-only pairs are zeros), which rows have one, files encoded, files reused.

    Encoder outputs persist in ``memo`` between runs, in the engine's own memo keys (file content, modality)."""
    stored = load_file(str(memo)) if memo.is_file() else {}
    engine.embeddings.capacity = max(engine.embeddings.capacity,
                                     len(stored) + sum(len(p.attachments) for p in pairs))
    for name, value in stored.items():
        digest, _, modality = name.rpartition(":")
        engine.embeddings.put((digest, modality), value)
    before = len(engine.embeddings)
    rows, has, errors = [], [], []
    bar = progress(len(pairs), "encoding inputs", disable=not show, unit="pair")
    for pair in pairs:
        try:
            feature = engine.fused_feature(pair.attachments)
        except MediaError as exc:
            errors.append(f"{source}, line {pair.line}: {exc}")
            feature = None
        has.append(feature is not None)
        rows.append(feature[0].float() if feature is not None else None)
        bar.update()
    bar.close()
    encoded = len(engine.embeddings) - before
    if encoded:  # kept even when some lines failed: after fixing them, a rerun encodes only those
        tmp = memo.with_name(memo.name + ".tmp")
        save_file({_memo_key(k): v.contiguous() for k, v in engine.embeddings.items()}, str(tmp))
        tmp.replace(memo)
    _raise_collected(errors, source)
    dim = engine.cfg.imagebind.out_embed_dim
    table = torch.stack([r if r is not None else torch.zeros(dim) for r in rows])
    files = len({(a.path, a.modality) for p in pairs for a in p.attachments if a.weight > 0})
    return table, has, encoded, max(0, files - encoded)


def make_examples(engine: ChatEngine, pairs: Sequence[Pair], has_feature: Sequence[bool], source: str = "pairs"
                  ) -> list[Example]:
    """Prompt and answer ids as the chat sees them; ``feature`` is the pair's row, -1 for the all-zero image."""
    tok, limit = engine.tokenizer, engine.cfg.llama.max_seq_len
    examples, errors = [], []
    for i, pair in enumerate(pairs):
        prompt = build_chat_prompt(pair.question, (), tok, 1 << 30).ids
        answer = tok.encode(pair.answer, bos=False, eos=True)
        if len(prompt) + len(answer) > limit:
            errors.append(f"{source}, line {pair.line}: question and answer are {len(prompt) + len(answer)} "
                          f"tokens; the model's context is {limit}")
        examples.append(Example(prompt, answer, i if has_feature[i] else -1))
    _raise_collected(errors, source)
    return examples


def split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) indices: a seeded ``fraction`` held out (at least one when fraction > 0 and n > 1)."""
    if not 0 <= fraction < 1:
        raise FinetuneError(f"the validation fraction must be in [0, 1), got {fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = 0 if fraction == 0 or n < 2 else min(n - 1, max(1, round(fraction * n)))
    return sorted(order[n_val:]), sorted(order[:n_val])


def batch_at(step: int, train: Sequence[int], batch: int, seed: int) -> list[int]:
    """The examples of one step: consecutive slices of seeded per-epoch shuffles, a function of the step alone, so
    a resumed run draws exactly the batches the uninterrupted one would have."""
    n, out = len(train), []
    for position in range(step * batch, (step + 1) * batch):
        epoch, k = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(train[int(order[k])])
    return out


# ----------------------------------------------------------------------------------------------------------
# The run


def load_base(base: str, *, llama_dir: str | None = None, imagebind: str | None = None,
              tokenizer: str | None = None, assets: str | None = None, device: str | None = None,
              dtype: str | None = None, max_seq_len: int = 512,
              imagebind_config: ImageBindConfig = IMAGEBIND_HUGE) -> tuple[ChatEngine, bool]:
    """The engine to fine-tune (LoRA not merged) and whether it is the official model.

    ``base``: a toy-format model folder (``assets/toy``), or an adapter file: the official ``7B.pth`` over
    ``llama_dir``, or without ``llama_dir`` an earlier fine-tune's ``adapter.pth`` over the toy model ``assets``.
    ``imagebind_config``: the encoders' sizes under the official files (ImageBind-Huge; tests pass tiny ones)."""
    path = Path(base)
    if path.is_dir():
        return load_default(path, device=device, dtype=dtype, merge_lora=False, max_batch=1, compile=False), False
    if not path.is_file():
        raise FinetuneError(f"--from {base}: neither a model folder (assets/toy) nor an adapter file (7B.pth)")
    if llama_dir:
        return load_official(llama_dir, adapter=path, imagebind=imagebind, tokenizer=tokenizer, device=device,
                             dtype=dtype or "float32", max_seq_len=max_seq_len, merge_lora=False, use_cache=False,
                             max_batch=1, compile=False, imagebind_config=imagebind_config), True
    return load_default(assets or DEFAULT_ASSETS, adapter=path, device=device, dtype=dtype, merge_lora=False,
                        max_batch=1, compile=False), False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k]]


@torch.no_grad()
def validation_loss(net: Any, examples: Sequence[Example], features: torch.Tensor, blank: torch.Tensor,
                    pad_id: int, batch: int, device: torch.device) -> float:
    """Mean next-token loss per answer token over ``examples``."""
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch):
        part = list(examples[start:start + batch])
        n = int((collate(part, pad_id)[1] != IGNORE).sum())
        total += float(_visual_answer_loss(net, part, pad_id, features, blank, device)) * n
        tokens += n
    return total / max(1, tokens)


def finetune(data: str | Path, out: str | Path, *, base: str = str(DEFAULT_ASSETS), epochs: float = 3.0,
             steps: int | None = None, batch: int = 8, lr: float | None = None, weight_decay: float = 0.0,
             val_fraction: float = 0.1, save_every: int = 50, eval_every: int = 50, seed: int = 0,
             stop_after: int | None = None, dist: Dist = SINGLE, show: bool = True,
             **base_options: Any) -> dict[str, Any]:
    """Fine-tune ``base`` on the pairs in ``data``, writing into ``out`` (module docstring); returns the report.

    ``steps`` (default: ``epochs`` passes over the training pairs) spans the schedule; ``stop_after`` ends this
    call after that many steps with a checkpoint, for a rerun to continue. ``base_options``: ``load_base``'s."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    pairs = read_pairs(data)
    engine, official = load_base(base, device=str(dist.device), **base_options)
    engine.close()  # its decode thread is not needed: nothing is generated here
    net = engine.net
    timings["load"] = time.perf_counter() - t0

    train_idx, val_idx = split(len(pairs), val_fraction, seed)
    if batch < dist.world:
        raise FinetuneError(f"batch {batch} is smaller than the {dist.world} processes sharing it")
    total = steps if steps is not None else max(1, math.ceil(epochs * len(train_idx) / batch))
    settings = Settings(base=str(Path(base).resolve()), data_sha256=_sha256(Path(data)), steps=total, batch=batch,
                        lr=lr if lr is not None else (LR_OFFICIAL if official else LR_TOY),
                        weight_decay=weight_decay, val_fraction=val_fraction, seed=seed)
    report = Report(settings=asdict(settings), pairs=len(pairs), train_pairs=len(train_idx), val_pairs=len(val_idx))
    ckpt_path, adapter_path = out / "checkpoint.pt", out / "adapter.pth"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True) if ckpt_path.is_file() else None
    if ckpt is not None:
        changed = _changed(ckpt["settings"], asdict(settings))
        if changed:
            raise FinetuneError(f"{out} holds a run with other data or settings ({'; '.join(changed)}): use another "
                             f"--out, or delete {ckpt_path} to start over")
        if ckpt["step"] >= total and adapter_path.is_file():
            if show and dist.main:
                print(f"already finished: {adapter_path}")
            return read_json(out / "report.json")

    t0 = time.perf_counter()
    memo = out / "embeddings.safetensors"
    if dist.main:  # rank 0 encodes and stores; the others then find every file in the memo
        features, has, report.encoded_files, report.reused_files = encode_pairs(engine, pairs, memo, source=str(data),
                                                                                 show=show)
    dist.barrier()
    if not dist.main:
        features, has, _, _ = encode_pairs(engine, pairs, memo, source=str(data), show=False)
    examples = make_examples(engine, pairs, has, str(data))
    features = features.to(dist.device)
    timings["encode"] = time.perf_counter() - t0

    seed_everything(seed)
    for p in net.parameters():
        p.requires_grad_(False)
    net.llama.clear_cache()
    peft_model = to_peft(net.llama)
    mark_stage2_trainable(peft_model)
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    report.trainable = count(named)
    resume = None
    if ckpt is not None:
        with torch.no_grad():
            params = dict(named)
            if set(params) != set(ckpt["trainable"]):
                raise FinetuneError(f"{ckpt_path} does not hold this model's trainable tensors")
            for name, value in ckpt["trainable"].items():
                params[name].copy_(value)
        resume = Resume(int(ckpt["step"]), ckpt["optimizer"], tuple(ckpt["losses"]))
        report.val_loss = [tuple(v) for v in ckpt["val_loss"]]
        report.resumed_from = resume.step
    net.eval()  # no dropout; only the stage-2 tensors change
    device, pad = dist.device, engine.tokenizer.eos_id
    blank = net.blank_feature()
    val_examples = [examples[i] for i in val_idx]
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                if device.type == "cuda" and engine.dtype == torch.float32 else nullcontext())

    def validate(step: int) -> float | None:
        if not val_examples:
            return None
        with autocast:
            value = validation_loss(net, val_examples, features, blank, pad, batch, device)
        report.val_loss.append((step, value))
        return value

    def save(step: int, opt: torch.optim.Optimizer, losses: Sequence[float]) -> None:
        state = {"settings": asdict(settings), "step": step, "optimizer": opt.state_dict(), "losses": list(losses),
                 "val_loss": [list(v) for v in report.val_loss],
                 "trainable": {n: p.detach().cpu().clone() for n, p in named}}
        tmp = ckpt_path.with_name(ckpt_path.name + ".tmp")
        torch.save(state, tmp)
        tmp.replace(ckpt_path)

    def loss_fn(step: int) -> torch.Tensor:
        everyone = batch_at(step, train_idx, batch, seed)
        mine = [examples[i] for i in dist.shard(torch.tensor(everyone)).tolist()]
        with autocast:
            loss = _visual_answer_loss(net, mine, pad, features, blank, device)
        # The mean over this rank's answer tokens, rescaled so that the ranks' average gradient is the gradient of
        # the mean over the whole batch's tokens: the same update as one process taking the whole batch.
        share = sum(len(e.answer) for e in mine) / sum(len(examples[i].answer) for i in everyone)
        return loss * (share * dist.world)

    stop = None if stop_after is None else (resume.step if resume else 0) + stop_after
    last: dict[str, Any] = {}

    def after_step(step: int, opt: torch.optim.Optimizer, log: Any) -> dict[str, str] | None:
        done = step + 1
        last.update(opt=opt, losses=log.values, step=done)
        if not dist.main:
            return None
        shown = None
        if done % eval_every == 0 and done < total:
            value = validate(done)
            shown = None if value is None else {"val": f"{value:.4f}"}
        if done % save_every == 0 and done < total:
            save(done, opt, log.values)
        return shown

    if dist.main and resume is None:
        validate(0)
    t0 = time.perf_counter()
    log = train_loop("fine-tuning (stage 2, LoRA)", total, named, loss_fn, lr=settings.lr,
                     weight_decay=weight_decay, dist=dist, show=show, resume=resume, stop=stop,
                     after_step=after_step)
    timings["train"] = time.perf_counter() - t0
    report.steps_done = len(log.values)
    report.seconds = timings
    finished = report.steps_done >= total
    if dist.main and last:
        if finished:
            validate(total)
        save(last["step"], last["opt"], last["losses"])
    net.llama = from_peft(peft_model)
    if dist.main and finished:
        adapter = {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous()
                   for k, v in net.adapter_state().items()}
        tmp = adapter_path.with_name(adapter_path.name + ".tmp")
        torch.save({"model": adapter}, tmp)
        tmp.replace(adapter_path)
    result = {**asdict(report), **log.summary(), "finished": finished,
              "adapter": str(adapter_path) if finished else None}
    if dist.main:
        write_json(out / "report.json", result)
    dist.barrier()
    return result
