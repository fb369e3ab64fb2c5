"""Choosing the next token, as the reference does (REFERENCE.md section 4).

``softmax(logits / temperature)``, then top-p (sort descending, drop tokens whose cumulative mass *before* them
exceeds p, renormalise, sample); argmax at temperature 0. A seeded ``torch.Generator`` per request makes sampled
runs repeatable, alone or in a batch.
"""

from __future__ import annotations

import torch


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


def make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A generator on ``device``: seeded, or from a fresh random seed when ``seed`` is None."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen
