"""The KV cache costs resident memory for the positions written, not for every slot x max_seq_len (measured RSS)."""

from __future__ import annotations

import torch

from ibllm.llm.kvcache import KVCache

MB = 1024**2


def _rss() -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS:"))


def test_cache_memory_is_committed_as_positions_are_written():
    before = _rss()
    cache = KVCache.empty(2, 4, 8, 4096, 128, dtype=torch.float32)  # 2 layers x 2 x 4 rows: 256 MiB in all
    assert cache.nbytes == 256 * MB
    assert _rss() - before < 16 * MB  # allocated, not resident
    assert all(t.is_contiguous() and t.max() == 0 and t.min() == 0 for t in cache.tensors())  # reads see zeros
    assert _rss() - before < 16 * MB  # and commit nothing
    for i in range(2):  # a 40-token conversation in row 0 of every layer
        cache.layer(i).write(0, torch.ones(1, 8, 40, 128), torch.ones(1, 8, 40, 128))
    grown = _rss() - before
    assert grown < 16 * MB, f"{grown / MB:.1f} MB resident after 40 positions of one row"
    assert cache.k[1][0, :, :40].eq(1).all() and cache.k[1][0, :, 40:].eq(0).all() and cache.v[0][1:].eq(0).all()
    for t in cache.tensors():  # every position of every row written: now it is all resident
        t.fill_(2.0)
    assert _rss() - before > 240 * MB
    del cache, t
    assert _rss() - before < 32 * MB  # and freed with the tensors
