"""The Linears a decode step multiplies by, for the modules that give them a faster product (``llm.packed`` for
float32 batches, ``llm.gemv`` for half-precision rows)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def decode_linears(model: nn.Module, accept: Callable[[nn.Module], bool]) -> list[tuple[nn.Module, str]]:
    """(owner, attribute) of every Linear of ``model`` (a ``llm.llama.Transformer``) that a decode step calls and
    ``accept`` takes: each block's projections and the output head. Not LoRA's rank-r pairs (tiny), nor ``wv`` once
    fused into ``wqkv`` (then only the visual injection reads its weight, many rows at a time)."""
    found = []
    for owner in (*(m for block in model.layers for m in (block.attention, block.feed_forward)), model):
        for name, child in owner.named_children():
            fused_away = name == "wv" and getattr(owner, "wqkv", None) is not None
            if accept(child) and not name.startswith("lora_") and not fused_away:
                found.append((owner, name))
    return found
