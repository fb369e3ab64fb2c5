"""The static KV cache: keys and values of every layer for ``batch`` rows x ``seq_len`` positions, allocated once.

One class serves both users: ``Transformer.setup_cache`` keeps one for single-request calls (parity, evaluation,
``generate_tokens``), and the serving scheduler (``ibllm.llm.batching``) owns its own, one row per slot, so that
nothing else that runs the model can overwrite a conversation in flight. ``rows(i, j)`` is a view: prefilling a
newcomer into ``cache.rows(slot, slot + 1)`` writes straight into the shared tensors. ``select(slots)`` addresses
rows that need not be adjacent (newcomers prefilled together into whichever slots are free): a view when they are,
else the same tensors with an index, and the model writes through ``LayerCache``, which knows both.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch


class LayerCache(NamedTuple):
    """One layer's keys and values as one model call sees them: the call's row r is row ``index[r]`` of ``k``/``v``
    (``index`` None: row r itself). (rows, n_heads, seq_len, head_dim) each."""

    k: torch.Tensor
    v: torch.Tensor
    index: torch.Tensor | None = None
    rows: torch.Tensor | None = None  # the rows write_at writes: index, or 0..B-1 made once per call, not per layer

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keys/values (B, H, T, hd) of positions start..start+T-1 of every row."""
        end = start + k.shape[2]
        if self.index is None:
            self.k[:k.shape[0], :, start:end] = k
            self.v[:k.shape[0], :, start:end] = v
        else:
            self.k[self.index, :, start:end] = k
            self.v[self.index, :, start:end] = v

    def write_at(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """One key/value (B, H, hd) per row, row r at its own position ``positions[r]`` (the decode step)."""
        rows = self.rows
        if rows is None:
            rows = self.index if self.index is not None else torch.arange(k.shape[0], device=k.device)
        self.k[rows, :, positions] = k
        self.v[rows, :, positions] = v

    def read(self, batch: int, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions 0..end-1 (all of them when None) of the call's ``batch`` rows."""
        stop = self.k.shape[2] if end is None else end
        if self.index is None:
            return self.k[:batch, :, :stop], self.v[:batch, :, :stop]
        return self.k[self.index, :, :stop], self.v[self.index, :, :stop]


def _zeros(shape: tuple[int, ...], device: torch.device | str | None, dtype: torch.dtype) -> torch.Tensor:
    """Zeros, not torch.empty: attention masks unused positions out, and 0 * (masked weight 0) stays 0, whereas
    uninitialised memory may hold NaN/inf, which a masked softmax would still multiply into the output.

    On a CPU the zeros are a private anonymous memory map rather than ``torch.zeros``: reading it maps the kernel's
    one zero page, and a page is committed only when it is first written, so the cache costs RAM for the positions
    conversations have reached, not for all B x max_seq_len of them (7B's 4 slots x 512 positions are 1.07 GB in half
    precision, most of it never touched). The memory plan still reserves the whole cache, so a long conversation
    cannot run out."""
    count = math.prod(shape)
    if torch.device(device or "cpu").type != "cpu" or count == 0:
        return torch.zeros(shape, device=device, dtype=dtype)
    # Private: a shared anonymous map is shared memory, whose pages are committed when read, not only when written.
    # The tensor keeps the map alive (frombuffer holds a reference to it); the map is freed with the tensor.
    pages = mmap.mmap(-1, count * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(pages, dtype=dtype, count=count).view(shape)


@dataclass(frozen=True)
class KVCache:
    # One tensor per layer, (batch, n_heads, seq_len, head_dim) each, rather than one 5-D tensor: the compiled decode
    # step writes each in place, whereas writes into views of one big input are functionalised into a copy of the
    # whole cache per layer and step (measured: the compiled step ran slower than eager).
    k: tuple[torch.Tensor, ...]
    v: tuple[torch.Tensor, ...]
    index: torch.Tensor | None = None  # rows of k/v this cache addresses, in order (``select``); None: all

    @classmethod
    def empty(cls, n_layers: int, batch: int, n_heads: int, seq_len: int, head_dim: int, *,
              device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> KVCache:
        shape = (batch, n_heads, seq_len, head_dim)
        return cls(tuple(_zeros(shape, device, dtype) for _ in range(n_layers)),
                   tuple(_zeros(shape, device, dtype) for _ in range(n_layers)))

    @property
    def batch(self) -> int:
        return self.k[0].shape[0] if self.index is None else len(self.index)

    @property
    def seq_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (*self.k, *self.v)

    def layer(self, i: int, rows: torch.Tensor | None = None) -> LayerCache:
        """Layer i's keys and values (``rows``: see ``LayerCache.rows``)."""
        return LayerCache(self.k[i], self.v[i], self.index, rows if rows is not None else self.index)

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows start..stop-1 as views of the same storage."""
        if self.index is not None:
            raise ValueError("rows() of a selection")
        return KVCache(tuple(t[start:stop] for t in self.k), tuple(t[start:stop] for t in self.v))

    def select(self, rows: Sequence[int]) -> KVCache:
        """The given rows, in that order: ``rows(i, j)`` when they are adjacent and ascending, else an indexed
        selection of the same tensors (writes go through to them)."""
        rows = list(rows)
        if rows and rows == list(range(rows[0], rows[0] + len(rows))):
            return self.rows(rows[0], rows[0] + len(rows))
        return KVCache(self.k, self.v, torch.tensor(rows, dtype=torch.long, device=self.k[0].device))
