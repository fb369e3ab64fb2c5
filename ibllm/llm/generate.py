"""The token engine: prompt ids in, token ids out. It knows nothing about text (see stream.py for that).

The model is anything callable as ``model(tokens (B, T), start_pos, injection, last_only=True) -> logits (B, V)``
with a ``max_seq_len`` attribute — ``ibllm.llm.llama.Transformer``, or a mock in tests. A model with a
``setup_cache`` method gets its static KV cache allocated here if it has none yet.

Sampling follows the reference (REFERENCE.md section 4): ``softmax(logits / temperature)``, then top-p (sort
descending, drop tokens whose cumulative mass *before* them exceeds p, renormalise, sample); argmax at temperature
0. A seeded ``torch.Generator`` makes sampled runs repeatable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ibllm.config import GenerationConfig


def sample_top_p(probs: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) probabilities -> (B,) token ids from the smallest top set whose mass reaches p."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before > p, 0.0)
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    choice = torch.multinomial(sorted_probs, num_samples=1, generator=generator)
    return torch.gather(order, -1, choice).squeeze(-1)


def sample(logits: torch.Tensor, temperature: float, top_p: float,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) next tokens; greedy when temperature <= 0."""
    if temperature <= 0:
        return torch.argmax(logits, dim=-1)
    return sample_top_p(torch.softmax(logits.float() / temperature, dim=-1), top_p, generator)


def _generator(device: torch.device, seed: int | None) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def _device(model: Callable) -> torch.device:
    try:
        return next(model.parameters()).device  # type: ignore[attr-defined]
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _ensure_cache(model: Callable, batch: int) -> None:
    if not hasattr(model, "setup_cache"):
        return
    if getattr(model, "cache_len", 0) == 0 or getattr(model, "cache_batch", 0) < batch:
        model.setup_cache(max(batch, model.cfg.max_batch_size))


@torch.no_grad()
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
    """
    if not prompt_ids:
        raise ValueError("empty prompt (encode it with bos)")
    temperature, top_p = options.temperature, options.top_p
    budget = min(options.max_new_tokens, model.max_seq_len - len(prompt_ids))
    if budget <= 0:
        if len(prompt_ids) > model.max_seq_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens exceeds max_seq_len {model.max_seq_len}")
        return
    _ensure_cache(model, 1)
    device = _device(model)
    gen = _generator(device, options.seed)
    tokens = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    pos = 0
    for _ in range(budget):
        if should_stop is not None and should_stop():
            return
        logits = model(tokens, pos, injection, last_only=True)
        pos += tokens.shape[1]
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits[..., vocab_limit:] = float("-inf")
        next_token = sample(logits, temperature, top_p, gen)
        token = int(next_token[0])
        if token == eos_id:
            return
        yield token
        tokens = next_token.view(1, 1)


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
    device = _device(model)
    gen = _generator(device, seed)
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
