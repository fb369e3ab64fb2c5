"""Transformer pieces shared by the ImageBind trunks and the Point-Bind encoder.

Attention runs batch-first through ``F.scaled_dot_product_attention`` while keeping the parameter layout of the
modules the official checkpoints were saved from (``nn.MultiheadAttention`` for ImageBind, a fused bias-free
``qkv`` Linear for Point-BERT), so the files load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def drop_path_rates(rate: float, num_blocks: int) -> list[float]:
    """Stochastic depth growing linearly from 0 at the first block to ``rate`` at the last (as the reference)."""
    # Plain Python (not torch.linspace) so that building on the meta device works.
    if num_blocks <= 1:
        return [0.0] * num_blocks
    return [rate * i / (num_blocks - 1) for i in range(num_blocks)]


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training; identity in eval.

    The reference applies timm's DropPath to sequence-first tensors, which drops per token rather than per
    sample; only training is affected (the official weights are frozen), so the per-sample form is used here.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """Linear -> exact GELU -> Linear (``fc1``/``fc2`` as in both reference encoders)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class MultiheadAttention(nn.Module):
    """Self-attention with ``nn.MultiheadAttention``'s state-dict layout, batch-first, via SDPA.

    ``bias_k``/``bias_v`` (``add_bias_kv``) are appended after the input projection as one extra key/value that
    every query can attend to; a given additive mask gets a zero column for it, exactly as in torch's module.
    """

    def __init__(self, dim: int, num_heads: int, add_bias_kv: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, dim))
            self.bias_v = nn.Parameter(torch.empty(1, 1, dim))
        else:
            self.register_parameter("bias_k", None)
            self.register_parameter("bias_v", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # torch's own initialisation of nn.MultiheadAttention.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def quantize_in_proj(self, linear: nn.Module) -> None:
        """Serve the input projection through ``linear`` (``llm.quantize.quantize_around``: its quantised form) in
        place of ``in_proj_weight``/``in_proj_bias``, which are dropped."""
        del self.in_proj_weight, self.in_proj_bias
        self.in_proj = linear

    def _in_projection(self, x: Tensor) -> Tensor:
        in_proj = self._modules.get("in_proj")  # set by quantize_in_proj
        return in_proj(x) if in_proj is not None else F.linear(x, self.in_proj_weight, self.in_proj_bias)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        q, k, v = self._in_projection(x).chunk(3, dim=-1)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(b, 1, d)], dim=1)
            v = torch.cat([v, self.bias_v.expand(b, 1, d)], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
        h = self.num_heads
        q, k, v = (t.unflatten(-1, (h, d // h)).transpose(1, 2) for t in (q, k, v))
        if attn_mask is not None:
            attn_mask = attn_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


def init_linear(module: nn.Module) -> None:
    """Truncated-normal(0.02) linear weights and zero biases, the ViT convention both reference encoders use."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
