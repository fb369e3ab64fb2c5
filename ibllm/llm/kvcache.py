"""The static KV cache: keys and values of every layer for ``batch`` rows x ``seq_len`` positions, allocated once.

One class serves both users: ``Transformer.setup_cache`` keeps one for single-request calls (parity, evaluation,
``generate_tokens``), and the serving scheduler (``ibllm.llm.batching``) owns its own, one row per slot, so that
nothing else that runs the model can overwrite a conversation in flight. ``rows(i, j)`` is a view: prefilling a
newcomer into ``cache.rows(slot, slot + 1)`` writes straight into the shared tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCache:
    k: torch.Tensor  # (n_layers, batch, n_heads, seq_len, head_dim)
    v: torch.Tensor

    @classmethod
    def empty(cls, n_layers: int, batch: int, n_heads: int, seq_len: int, head_dim: int, *,
              device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> KVCache:
        # Zeros, not torch.empty: attention masks unused positions out, and 0 * (masked weight 0) stays 0, whereas
        # uninitialised memory may hold NaN/inf, which a masked softmax would still multiply into the output.
        shape = (n_layers, batch, n_heads, seq_len, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def seq_len(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's keys and values, (batch, n_heads, seq_len, head_dim) views."""
        return self.k[i], self.v[i]

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows start..stop-1 as a view of the same storage."""
        return KVCache(self.k[:, start:stop], self.v[:, start:stop])
