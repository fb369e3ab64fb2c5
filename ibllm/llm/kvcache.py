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
    # One tensor per layer, (batch, n_heads, seq_len, head_dim) each, rather than one 5-D tensor: the compiled decode
    # step writes each in place, whereas writes into views of one big input are functionalised into a copy of the
    # whole cache per layer and step (measured: the compiled step ran slower than eager).
    k: tuple[torch.Tensor, ...]
    v: tuple[torch.Tensor, ...]

    @classmethod
    def empty(cls, n_layers: int, batch: int, n_heads: int, seq_len: int, head_dim: int, *,
              device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> KVCache:
        # Zeros, not torch.empty: attention masks unused positions out, and 0 * (masked weight 0) stays 0, whereas
        # uninitialised memory may hold NaN/inf, which a masked softmax would still multiply into the output.
        shape = (batch, n_heads, seq_len, head_dim)
        return cls(tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)),
                   tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)))

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def seq_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (*self.k, *self.v)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's keys and values, (batch, n_heads, seq_len, head_dim)."""
        return self.k[i], self.v[i]

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows start..stop-1 as views of the same storage."""
        return KVCache(tuple(t[start:stop] for t in self.k), tuple(t[start:stop] for t in self.v))
