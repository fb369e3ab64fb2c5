"""The zero-initialised gate of ImageBind-LLM's visual injection (REFERENCE.md section 4).

Each injected attention layer scales the visual term per head by ``tanh(gate)``: at initialisation (gate 0) the
model is exactly the pre-trained LLaMA, and training opens the gate as far as the visual signal helps. The
official checkpoints store it as ``layers.N.attention.gate`` of shape (1, n_heads, 1, 1); here it is the
``scale`` of a ``TanhGate`` (``llama.OFFICIAL_KEYS`` renames it).
"""

from __future__ import annotations

import torch
from torch import nn


class TanhGate(nn.Module):
    """``x * tanh(scale)`` with one zero-initialised scale per head; x: (B, H, ...)."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(1, n_heads, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale.tanh().to(x.dtype) * x
