"""Multi-row matrix products of half-precision weights in float32, on CPUs where half-precision GEMM is the slow one.

Half-precision weights halve the memory and the bytes a one-token decode step reads, but a CPU without bfloat16/
float16 units computes a many-row product (a prefill, an encoder) several times slower in half precision than in
float32 (measured ~10x on a CPU without them). CPUs with them (AMX) are the other way round: on this project's
Xeon, bfloat16 GEMM beats float32. So the choice is measured, not assumed: ``half_gemm_is_slow`` times one small GEMM
in the half dtype and in float32, once per dtype per process (``IBLLM_HALF_GEMM=float32`` / ``half`` overrides it).

``float32_gemm(dtype, device)`` is the context a multi-token call runs in: where half is the slow one, every
``F.linear`` on more than one row whose weight is a plain half-precision CPU tensor is computed in float32, with the
weight copied into one float32 buffer reused by every layer (memory grows by the largest weight matrix in float32,
less than one layer), and the result cast back to the activations' dtype. One-row products (decode) and quantised
weights are never touched. The buffer is shared, so products through it take a lock (the context itself, a torch
function mode, is per thread). ``widened`` lends that buffer to other conversions of one matrix at a time (the int8
weights of ``llm.quantize`` for a prefill).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

HALF = (torch.float16, torch.bfloat16)
_PROBE_SHAPE = (32, 4096, 4096)  # rows x inner x outer: a short prompt through a 7B-sized matrix, ~10 ms here


def _best_time(fn, repeats: int = 5) -> float:
    fn()  # first call: kernel selection, allocation
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def gemm_time_ratio(dtype: torch.dtype) -> float:
    """Time of a CPU GEMM in ``dtype`` over the alternative, the same GEMM in float32 after widening its weight into
    a float32 buffer (what ``Float32Gemm`` does on every call), measured once, cached. The widening is part of the
    price: where the two GEMMs take about as long, computing in float32 only adds a copy of every weight per call
    (measured: a 7B prefill went from 2.5 s to 7.6 s when a bare GEMM comparison tipped at x1.06)."""
    m, k, n = _PROBE_SHAPE
    a32, b32 = torch.randn(m, k), torch.randn(n, k)
    a, b = a32.to(dtype), b32.to(dtype)
    wide = torch.empty(n, k)
    with torch.no_grad():
        return _best_time(lambda: F.linear(a, b)) / _best_time(lambda: F.linear(a32, wide.copy_(b)))


def half_gemm_is_slow(dtype: torch.dtype) -> bool:
    """Whether many-row products of ``dtype`` weights should run in float32 on this CPU."""
    if dtype not in HALF:
        return False
    forced = os.environ.get("IBLLM_HALF_GEMM", "").strip().lower()
    if forced in ("float32", "fp32", "half"):
        return forced != "half"
    return gemm_time_ratio(dtype) > 1.0


# bfloat16 GEMM at most this fraction of float32's time: a CPU with bfloat16 units (AVX512-BF16, AMX). Measured
# x0.15-0.17 on a 2-core EPYC with AVX512-BF16; CPUs without them are the other way round (~x10).
FAST_BF16 = 0.5


def cpu_half_dtype() -> torch.dtype:
    """The half-precision dtype to serve in on this CPU when float32 does not fit: bfloat16 where its GEMM is fast
    (``FAST_BF16``), so that prefill and the encoders run in it (7B's 29-token prefill 7.8 -> 1.2 s, its image
    encode 3.4 -> 0.8 s against float16 widened to float32, same decode speed, on that EPYC); else float16, the dtype
    of Meta's files, used from the file without a copy. Measured once per process (``gemm_time_ratio``)."""
    return torch.bfloat16 if gemm_time_ratio(torch.bfloat16) <= FAST_BF16 else torch.float16


def describe(dtype: torch.dtype, device: torch.device) -> str:
    """One line for the log and the Model tab: how multi-token steps compute with these weights."""
    if device.type != "cpu" or dtype not in HALF:
        return ""
    name = str(dtype).removeprefix("torch.")
    forced = os.environ.get("IBLLM_HALF_GEMM", "").strip().lower() in ("float32", "fp32", "half")
    measured = ("set by IBLLM_HALF_GEMM" if forced
                else f"{name} GEMM takes x{gemm_time_ratio(dtype):.2f} the time of float32 here")
    if half_gemm_is_slow(dtype):
        return f"prefill and encoders compute in float32 from the {name} weights, a matrix at a time ({measured})"
    return f"prefill and encoders compute in {name} ({measured})"


_lock = threading.Lock()
_buffer: torch.Tensor | None = None  # the float32 copy of the weight being multiplied; grows to the largest one


@contextlib.contextmanager
def widened(weight: torch.Tensor, dtype: torch.dtype = torch.float32):
    """``weight`` converted to ``dtype`` in the one reused CPU buffer, held (locked) for the duration of the block."""
    global _buffer
    nbytes = weight.numel() * torch.empty((), dtype=dtype).element_size()
    with _lock:
        if _buffer is None or _buffer.numel() * 4 < nbytes:
            _buffer = None  # free the smaller one first
            _buffer = torch.empty(-(-nbytes // 4), dtype=torch.float32)
        out = _buffer.view(torch.uint8)[:nbytes].view(dtype).view(weight.shape)
        out.copy_(weight)
        yield out


class Float32Gemm(TorchFunctionMode):
    """Within it, ``F.linear`` of a half-precision CPU weight on more than one row runs in float32 (see above)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            # Not for weights being trained: their gradient must reach the weight, not the buffer's copy of it.
            if (type(weight) in (torch.Tensor, torch.nn.Parameter) and weight.dtype in HALF
                    and weight.device.type == "cpu" and x.numel() > x.shape[-1]
                    and not (weight.requires_grad and torch.is_grad_enabled())):
                with widened(weight) as weight32:
                    y = F.linear(x.float(), weight32, None if bias is None else bias.float())
                return y.to(x.dtype)
        return func(*args, **kwargs)


def float32_gemm(dtype: torch.dtype, device: torch.device) -> contextlib.AbstractContextManager:
    """The context for a multi-token call of a model with ``dtype`` weights on ``device`` (module docstring)."""
    if device.type == "cpu" and half_gemm_is_slow(dtype):
        return Float32Gemm()
    return contextlib.nullcontext()


def buffer_bytes() -> int:
    """Bytes held by the reused float32 buffer (0 until a product went through it)."""
    return 0 if _buffer is None else _buffer.numel() * 4


__all__ = ["Float32Gemm", "float32_gemm", "widened", "half_gemm_is_slow", "gemm_time_ratio", "describe", "buffer_bytes",
           "HALF"]
