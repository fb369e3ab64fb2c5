"""From ImageBind embeddings to LLaMA adapters (REFERENCE.md section 4): fuse -> bind network -> prefix query.

- ``fuse``: several inputs' embeddings into one feature (each L2-normalised, weights normalised to sum 1).
- ``BindNetwork``: ``image_bind_proj`` (E -> D, with bias), then residual SwiGLU blocks
  ``x + f2(silu(f1(norm(x))) * f3(norm(x)))``. "Stable" weights: RMSNorm(eps 1e-6), bias-free f1/f2/f3.
  "Beta" weights (``legacy_bridge``): ``nn.LayerNorm`` at torch's default eps 1e-5 (the reference constructs it
  without an eps) and biased f1/f2/f3.
- ``PrefixQuery``: ``prefix_query``, one learned D-vector per injected layer, added to the visual query to give
  each layer its adapter.

The official checkpoint stores the bind network as flat top-level names (``image_bind_f2_3.weight``); this module
nests them (``blocks.2.f2.weight``). ``bind_key_table`` is the one mapping between the two.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ibllm.config import AdapterConfig
from ibllm.llm.llama import RMSNorm


def is_mix_weight(value: object) -> bool:
    """Whether ``value`` can weigh an input in ``fuse``: a finite number >= 0 (not a bool; NaN passes "< 0" and
    would poison the sum). Every caller that takes weights from a user (API, batch files, fine-tuning data) asks
    this before it gets here."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def fuse(embeddings: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Weighted sum of L2-normalised embeddings (B, E) with weights w_i / (sum(w) + 1e-6); weight 0 drops an input.

    The result is not re-normalised (the reference feeds it to the cache or the bind network as it is).
    """
    if len(embeddings) != len(weights):
        raise ValueError(f"{len(embeddings)} embeddings but {len(weights)} weights")
    if not all(is_mix_weight(float(w)) for w in weights):
        raise ValueError(f"mixing weights must be finite and >= 0, got {list(weights)}")
    kept = [(e, float(w)) for e, w in zip(embeddings, weights, strict=True) if w > 0]
    if not kept:
        raise ValueError("nothing to fuse: every input has weight 0")
    total = sum(w for _, w in kept) + 1e-6
    fused = None
    for e, w in kept:  # same order of operations as the reference's sum([...]) for bitwise-equal float32 results
        term = F.normalize(e, dim=-1) * (w / total)
        fused = term if fused is None else fused + term
    return fused


class BindBlock(nn.Module):
    """One residual SwiGLU block of the bind network: x + f2(silu(f1(n)) * f3(n)), n = norm(x)."""

    def __init__(self, dim: int, hidden: int, *, legacy: bool = False, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if legacy else RMSNorm(dim, eps)
        self.f1 = nn.Linear(dim, hidden, bias=legacy)
        self.f2 = nn.Linear(hidden, dim, bias=legacy)
        self.f3 = nn.Linear(dim, hidden, bias=legacy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm(x)
        return x + self.f2(F.silu(self.f1(n)) * self.f3(n))


class BindNetwork(nn.Module):
    """ImageBind feature (B, E) -> visual query (B, 1, D)."""

    def __init__(self, in_dim: int, dim: int, hidden: int, *, blocks: int = 3, legacy: bool = False,
                 eps: float = 1e-6):
        super().__init__()
        self.legacy = legacy
        self.proj = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList(BindBlock(dim, hidden, legacy=legacy, eps=eps) for _ in range(blocks))

    @classmethod
    def from_config(cls, adapter: AdapterConfig, in_dim: int, dim: int) -> BindNetwork:
        return cls(in_dim, dim, adapter.bridge_hidden, blocks=adapter.bridge_blocks, legacy=adapter.legacy_bridge,
                   eps=adapter.bridge_norm_eps)

    def stages(self, feature: torch.Tensor) -> list[torch.Tensor]:
        """Every state: [proj output, after block 1, ..., after the last block (= the visual query)]."""
        x = self.proj(feature.unsqueeze(1) if feature.ndim == 2 else feature)
        out = [x]
        for block in self.blocks:
            x = block(x)
            out.append(x)
        return out

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.stages(feature)[-1]


class PrefixQuery(nn.Module):
    """``prefix_query``: one learned vector per injected layer (the official Embedding(query_layer, D) weight).

    Name the attribute ``prefix_query`` and its state-dict key is the official ``prefix_query.weight``.
    """

    def __init__(self, query_layer: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(query_layer, dim))  # nn.Embedding's N(0, 1), as the reference

    def forward(self, visual_query: torch.Tensor) -> torch.Tensor:
        """Adapters ``prefix_query[l] + visual_query``: (B, 1, D) -> (query_layer, B, 1, D)."""
        return self.weight[:, None, None, :].to(visual_query.dtype) + visual_query[None]


def bind_key_table(blocks: int = 3, legacy: bool = False) -> dict[str, str]:
    """Official flat key -> ``BindNetwork`` key. Biases of the norms and f1/f2/f3 exist only for ``legacy``."""
    table = {"image_bind_proj.weight": "proj.weight", "image_bind_proj.bias": "proj.bias"}
    params = ("weight", "bias") if legacy else ("weight",)
    for k in range(1, blocks + 1):
        for p in params:
            table[f"image_bind_norm_{k}.{p}"] = f"blocks.{k - 1}.norm.{p}"
            for j in (1, 2, 3):
                table[f"image_bind_f{j}_{k}.{p}"] = f"blocks.{k - 1}.f{j}.{p}"
    return table


def is_legacy_bridge(state: Mapping[str, torch.Tensor]) -> bool:
    """True for the "beta" layout (biased bind linears), told apart by the presence of ``image_bind_f1_1.bias``."""
    return "image_bind_f1_1.bias" in state
