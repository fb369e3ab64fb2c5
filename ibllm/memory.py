"""What the weights will cost in memory, before anything is allocated, and loading whose peak is what is served.

``plan_memory`` adds up the tensors of the (memory-mapped, not yet read) checkpoint files per dtype, adds the KV
cache and a working margin, compares that with what the device has (available RAM on a CPU, free memory on a GPU)
and picks a dtype: the fastest that fits (float16 on a GPU; on a CPU float32 if it fits, else bfloat16 where the
CPU has bfloat16 units, measured, so prefill and encoders compute in it, else float16, the dtype of Meta's files, so
nothing is converted or copied), or refuses, naming the need, what the machine has and the
options (among them ``--quantize int8`` and what it would need). With ``quantize`` the plan counts the quantised
matrices (LLaMA's linear layers; with int8 also the bind network's and the encoder blocks') at their quantised size
(``llm.quantize.quantized_weight_bytes``) and the rest in bfloat16. ``doctor`` prints
the same plan.

``convert_releasing`` turns a memory-mapped state dict into the target dtype tensor by tensor and tells the kernel
that the source pages just read are not needed any more (``madvise(MADV_DONTNEED)`` on the file mapping), so the
resident memory while loading is the converted weights plus one chunk, not the source files plus the copies.
Tensors already in the target dtype are used as they are, still backed by the file (no copy).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import resource
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ibllm.halfgemm import cpu_half_dtype, gemm_time_ratio
from ibllm.llm.quantize import (
    SERVING_DTYPE,
    fits_scheme,
    is_quantized_weight,
    quantized_parts,
    quantized_weight_bytes,
)

GiB = 1024**3
# Beyond the weights and the KV cache: activations of a prefill, the encoders' largest intermediate, the Python,
# torch, faiss and Gradio runtime (~1 GB resident measured after importing them), allocator slack.
WORKING_MARGIN = int(1.5 * GiB)
_CHUNK_ELEMENTS = 8 * 1024 * 1024  # convert (and release) at most this many elements at a time
_MADV_DONTNEED = 4  # Linux
_MADV_WILLNEED = 3
_MADV_POPULATE_READ = 22  # Linux 5.14+
# LoRA pairs that ``Transformer.merge_lora`` folds into their base weights (all but wv's, which the injection needs
# un-adapted): not served once merged.
_FOLDED_LORA = re.compile(r"\.lora_w[qko123]_l[12]\.weight$")


@dataclass(frozen=True)
class MemoryPlan:
    device: str
    available: int  # bytes the device has for this model
    need: dict[str, int]  # dtype name -> bytes (weights + KV cache + margin)
    dtype: torch.dtype | None  # the choice; None when nothing fits
    reason: str

    def lines(self) -> list[str]:
        needs = ", ".join(f"{name} {bytes_ / GiB:.1f} GB" for name, bytes_ in self.need.items())
        return [f"memory: {self.device} has {self.available / GiB:.1f} GB available; the model needs {needs}",
                f"memory: {self.reason}"]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def available_bytes(device: torch.device) -> int:
    """Free memory of a GPU, or the RAM this process may still take on a CPU (MemAvailable, capped by a cgroup
    limit when the process runs in a container)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    available = _meminfo("MemAvailable")
    limit = _cgroup_room()
    return min(available, limit) if limit is not None else available


def _meminfo(field: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _cgroup_room() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(int(limit) - used, 0)


def tensor_bytes(states: Iterable[Mapping[str, torch.Tensor]], dtype: torch.dtype, quantize: str | None = None, *,
                 merge_lora: bool = False) -> int:
    """Bytes of every tensor once floating tensors are in ``dtype`` (others keep theirs), with ``quantize`` LLaMA's
    linear weights quantised, with ``merge_lora`` without the LoRA pairs folded into their base weights. Reads no
    data."""
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for state in states:
        for key, t in state.items():
            if merge_lora and _FOLDED_LORA.search(key):
                continue
            if quantize and t.ndim == 2 and is_quantized_weight(key) and fits_scheme(t.shape, quantize):
                total += quantized_weight_bytes(t.shape, quantize)
            else:
                total += t.numel() * (size if t.is_floating_point() else t.element_size())
    return total


def kv_cache_bytes(n_layers: int, dim: int, max_seq_len: int, max_batch: int, dtype: torch.dtype) -> int:
    return 2 * n_layers * max_batch * max_seq_len * dim * torch.empty((), dtype=dtype).element_size()


def plan_memory(states: Iterable[Mapping[str, torch.Tensor]], device: torch.device, *, requested: str | None = None,
                quantize: str | None = None, kv_cache: tuple[int, int, int, int] = (0, 0, 0, 0),
                merge_lora: bool = False, available: int | None = None) -> MemoryPlan:
    """Choose the dtype to serve in (or refuse). ``kv_cache``: (n_layers, dim, max_seq_len, max_batch).
    ``quantize`` ("int8"/"int4"): the matrices ``is_quantized_weight`` names quantised, everything else in bfloat16
    (``--dtype`` is not used then: the quantised kernels want bfloat16 activations). ``merge_lora``: the LoRA pairs
    that merging folds away are not counted."""
    states = list(states)
    have = available_bytes(device) if available is None else available
    where = "GPU" if device.type == "cuda" else "CPU"

    def needs(dtype: torch.dtype, scheme: str | None = None) -> int:
        weights = tensor_bytes(states, dtype, scheme, merge_lora=merge_lora)
        return weights + kv_cache_bytes(*kv_cache, dtype) + WORKING_MARGIN

    if quantize:
        need = {quantize: needs(SERVING_DTYPE, quantize)}
        if need[quantize] <= have:
            return MemoryPlan(str(device), have, need, SERVING_DTYPE,
                              f"serving {quantized_parts(quantize)} in {quantize}, the rest in bfloat16, on the "
                              f"{where}: as asked (--quantize {quantize})")
        smaller = [s for s in ("int8", "int4") if s != quantize and needs(SERVING_DTYPE, s) < need[quantize]]
        options = [f"--quantize {s} ({needs(SERVING_DTYPE, s) / GiB:.1f} GB)" for s in smaller]
        return MemoryPlan(str(device), have, need, None, _refusal(need[quantize], quantize, where, have, options))
    if requested:
        candidates: list[torch.dtype | None] = [parse_dtype(requested)]
    elif device.type == "cuda":
        candidates = [torch.float16]
    else:  # None: the CPU's half-precision dtype, measured (halfgemm.cpu_half_dtype) only once float32 does not fit
        candidates = [torch.float32, None]
    need = {dtype_name(d): needs(d) for d in dict.fromkeys([*filter(None, candidates), torch.float32, torch.float16])}
    for d in candidates:
        if d is None:
            d = cpu_half_dtype()
            need.setdefault(dtype_name(d), needs(d))
        if need[dtype_name(d)] <= have:
            if requested:
                why = "as asked (--dtype)"
            elif d == candidates[0]:
                why = "the fastest that fits"
            elif d == torch.float16:
                why = f"float32 ({need['float32'] / GiB:.1f} GB) does not fit: half precision, the weights' own dtype"
            else:
                why = (f"float32 ({need['float32'] / GiB:.1f} GB) does not fit: bfloat16, whose GEMM takes "
                       f"x{gemm_time_ratio(d):.2f} the time of float32 on this CPU (--dtype float16 keeps the "
                       f"files' own dtype)")
            return MemoryPlan(str(device), have, need, d, f"serving in {dtype_name(d)} on the {where}: {why}")
    options = [] if candidates[-1] in (None, torch.float16) else ["a smaller dtype (--dtype float16)"]
    if any(is_quantized_weight(key) for state in states for key in state):
        options.append(f"--quantize int8 ({needs(SERVING_DTYPE, 'int8') / GiB:.1f} GB)")
    tried = ", ".join(dtype_name(d) if d else "half precision" for d in candidates)
    return MemoryPlan(str(device), have, need, None, _refusal(min(need.values()), tried, where, have, options))


def _refusal(need: int, tried: str, where: str, have: int, options: list[str]) -> str:
    options = ["free memory (close other programs)", *options,
               "another device (--device cuda on a GPU with more memory)"]
    return (f"nothing fits: the model needs at least {need / GiB:.1f} GB ({tried}) and the {where} has "
            f"{have / GiB:.1f} GB available. Options: {', '.join(options)}")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: use float32, float16 or bfloat16") from None


# ----------------------------------------------------------------------------------------------------------
# Converting a memory-mapped state dict without holding the file and the copy at once


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of ``path`` (from /proc/self/maps)."""
    target = str(path.resolve())
    ranges = []
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5] == target:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((lo, hi))
    except OSError:
        pass
    return ranges


class FilePages:
    """The pages of one file's mapping under tensors that live in it: ``release`` drops those of tensors already
    read (never memory that is not the file's); ``read_in`` reads those of tensors served straight from the file."""

    def __init__(self, path: str | Path):
        self.ranges = _mapped_ranges(Path(path)) if sys.platform == "linux" else []
        self.page = mmap.PAGESIZE
        self._madvise = ctypes.CDLL(None, use_errno=True).madvise if self.ranges else None

    def _span(self, t: torch.Tensor, whole_pages: bool) -> tuple[int, int] | None:
        if self._madvise is None or t.numel() == 0:
            return None
        start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        if not any(lo <= start and end <= hi for lo, hi in self.ranges):
            return None
        if whole_pages:  # whole pages inside the tensor only: neighbours stay intact
            first, last = -(-start // self.page) * self.page, end // self.page * self.page
        else:
            first, last = start // self.page * self.page, -(-end // self.page) * self.page
        return (first, last) if last > first else None

    def release(self, t: torch.Tensor) -> None:
        span = self._span(t, whole_pages=True)
        if span is not None:
            self._madvise(ctypes.c_void_p(span[0]), ctypes.c_size_t(span[1] - span[0]), _MADV_DONTNEED)

    def read_in(self, t: torch.Tensor) -> bool:
        """Fault ``t``'s pages in now (from the page cache or the disk), so that its first product does not: the
        first request would otherwise pay for reading every weight used straight from the file (measured: a 7B
        float16 question's bind step took 0.9-1.2 s on its first call, 0.17 s after). Whether it was in the file."""
        span = self._span(t, whole_pages=False)
        if span is None:
            return False
        first, size = ctypes.c_void_p(span[0]), ctypes.c_size_t(span[1] - span[0])
        if self._madvise(first, size, _MADV_POPULATE_READ) != 0:  # Linux < 5.14: read-ahead, asynchronous
            self._madvise(first, size, _MADV_WILLNEED)
        return True


def convert_releasing(state: dict[str, torch.Tensor], dtype: torch.dtype, source: str | Path | None = None, *,
                      keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """``state`` with floating tensors in ``dtype``, converted chunk by chunk; the source pages of the file
    ``source`` are released as they are read. Tensors already in ``dtype``, and those whose key ``keep`` accepts
    (quantised later, straight from the file), are returned as they are (still the file's pages). The source
    tensors must not be used afterwards."""
    releaser = FilePages(source) if source is not None else None
    out: dict[str, torch.Tensor] = {}
    for key in list(state):
        t = state.pop(key)
        if not t.is_floating_point() or t.dtype == dtype or (keep is not None and keep(key)):
            out[key] = t
            continue
        new = torch.empty(t.shape, dtype=dtype)
        if t.is_contiguous():
            src, dst = t.view(-1), new.view(-1)
            for i in range(0, src.numel(), _CHUNK_ELEMENTS):
                dst[i:i + _CHUNK_ELEMENTS].copy_(src[i:i + _CHUNK_ELEMENTS])
                if releaser is not None:
                    releaser.release(src[i:i + _CHUNK_ELEMENTS])
        else:
            new.copy_(t)
        out[key] = new
        del t
    return out


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


__all__ = ["MemoryPlan", "plan_memory", "available_bytes", "tensor_bytes", "kv_cache_bytes", "convert_releasing",
           "FilePages", "parse_dtype", "dtype_name", "peak_rss_bytes", "GiB", "WORKING_MARGIN"]
