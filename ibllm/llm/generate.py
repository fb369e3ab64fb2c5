"""Single-request generation and the reference's batch ``generate()``. Nothing here knows about text (stream.py).

``generate_tokens`` serves one prompt through ``batching.DecodeBatch`` (a batch of one, inline): the same prefill,
decode step and sampling as the serving scheduler, so parity and tests exercise the code that serves chats.
``generate_batch`` is the reference's own batched loop, kept step for step as the parity harness only.

The model is anything callable as ``model(tokens (B, T), start_pos, injection, last_only=True, cache=...) -> logits
(B, V)`` with a ``max_seq_len`` attribute — ``ibllm.llm.llama.Transformer``, or a mock in tests. A model with a
``setup_cache`` method gets its own static KV cache allocated here if it has none yet. Sampling: sampling.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ibllm.config import GenerationConfig
from ibllm.llm.batching import DecodeBatch, Request, model_device
from ibllm.llm.sampling import make_generator, sample, sample_top_p

__all__ = ["generate_tokens", "generate_batch", "BatchGeneration", "sample", "sample_top_p"]


def _ensure_cache(model: Callable, batch: int) -> None:
    if not hasattr(model, "setup_cache"):
        return
    if getattr(model, "cache_len", 0) == 0 or getattr(model, "cache_batch", 0) < batch:
        model.setup_cache(max(batch, model.cfg.max_batch_size))


def generate_tokens(model: Callable, prompt_ids: Sequence[int], injection: torch.Tensor | None,
                    options: GenerationConfig, *, eos_id: int, vocab_limit: int | None = None,
                    should_stop: Callable[[], bool] | None = None) -> Iterator[int]:
    """Yield new token ids for one prompt: one prefill, then one cached decode step per token.

    ``options``: max new tokens, temperature (0 = greedy), top-p and seed, all from the caller (the engine passes
    its model's ``cfg.generation`` unless a request says otherwise): no defaults live here.

    ``injection``: the per-layer visual term from ``Transformer.visual_injection`` (batch 1), or None for text only.
    Stops at ``eos_id`` (not yielded), after ``max_new_tokens``, at the model's ``max_seq_len``, or as soon as
    ``should_stop()`` is true: it is checked before every model call, so cancelling costs at most the token in
    flight. Closing the iterator stops it as well. ``vocab_limit``: ids at or past it are never produced (a model
    whose vocabulary is padded past its tokenizer's pieces could otherwise emit ids that decode to nothing).
    Runs in row 0 of the model's own KV cache (``setup_cache``), never in a serving scheduler's.
    """
    request = Request(prompt_ids, injection, options, eos_id=eos_id, should_stop=should_stop)
    _ensure_cache(model, 1)
    own = getattr(model, "kv_cache", None)
    batch = DecodeBatch(model, 1, cache=own.rows(0, 1) if own is not None else None, max_seq_len=model.max_seq_len,
                        vocab_limit=vocab_limit)
    batch.check(request)  # a prompt that cannot fit fails here, not at the first next()
    return batch.stream(request)


@dataclass
class BatchGeneration:
    """Everything the reference ``generate()`` produces, plus its per-call trace (for parity)."""

    tokens: torch.Tensor  # (B, total_len) final buffer: prompts + generated / forced ids, pad where never written
    generated: list[list[int]]  # per prompt: buffer[len(prompt) : len(prompt) + max_gen_len], cut at the first eos
    step_logits: list[torch.Tensor] = field(default_factory=list)  # logits of every model call (keep_logits=True)
    call_start_pos: list[int] = field(default_factory=list)
    call_num_tokens: list[int] = field(default_factory=list)


@torch.no_grad()
def generate_batch(model: Callable, prompts: Sequence[Sequence[int]], injection: torch.Tensor | None = None, *,
                   max_gen_len: int = 128, temperature: float = 0.1, top_p: float = 0.75, seed: int | None = None,
                   eos_id: int = 2, pad_id: int = -1, keep_logits: bool = False) -> BatchGeneration:
    """The reference's batch ``generate()``, step for step.

    Ragged prompts: prefill the first ``min_len`` positions of every row, then feed one position per step; where a
    row still has prompt tokens the prompt token is forced in place of the sample. Total length is
    ``min(max_seq_len, max_gen_len + max_len)``; with batch size 1 it stops early at eos.
    """
    bsz = len(prompts)
    _ensure_cache(model, bsz)
    device = model_device(model)
    gen = make_generator(device, seed)
    min_len, max_len = min(len(p) for p in prompts), max(len(p) for p in prompts)
    total = min(model.max_seq_len, max_gen_len + max_len)
    tokens = torch.full((bsz, total), pad_id, dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        tokens[row, :len(p)] = torch.tensor(list(p), dtype=torch.long)
    is_prompt = tokens != pad_id
    out = BatchGeneration(tokens, [])
    prev = 0
    for cur in range(min_len, total):
        logits = model(tokens[:, prev:cur], prev, injection, last_only=True)
        out.call_start_pos.append(prev)
        out.call_num_tokens.append(cur - prev)
        if keep_logits:
            out.step_logits.append(logits)
        next_token = sample(logits, temperature, top_p, gen)
        tokens[:, cur] = torch.where(is_prompt[:, cur], tokens[:, cur], next_token)
        if bsz == 1 and int(tokens[0, cur]) == eos_id:
            break
        prev = cur
    for row, p in enumerate(prompts):
        ids = tokens[row, len(p):len(p) + max_gen_len].tolist()
        out.generated.append(ids[:ids.index(eos_id)] if eos_id in ids else ids)
    return out
