"""Products of a few rows with float32, float16, bfloat16 or int8 weights on a CPU (the decode step), through a small
C kernel.

A decode step reads every weight once per token, so it should run at the machine's memory read rate, and a step of
B slots (B rows) should cost about what one row does. torch's CPU kernels fall short of both:
- half precision: its matrix-vector kernel read 7B-sized matrices at 10-11 GB/s in float16 on this project's 2-core
  Xeon (6 GB/s on one core: limited by its arithmetic, not by memory), against ~23 GB/s for float32;
- float32, through MKL: on a 2-core AMD EPYC (Zen 4) one row read 7B-sized matrices at 23-27 GB/s where the machine
  reads ~45 GB/s, and 8 rows ran at 8-14 GB/s (11-12 GB/s through MKL's packed layout: ``llm.packed``).
``gemv.c`` widens 16 (AVX-512) or 8 (AVX2) values of a weight row at a time to float32 in registers and
multiply-adds them there, four weight rows at a time against up to four rows of x, and the rows of the output are
shared out between the threads of torch's own OpenMP runtime. Measured on that EPYC (``bench/serve.py`` has the
whole-step figures): float32 37-50 GB/s for one row and 31-37 GB/s for 8 rows of 7B-sized matrices, float16 27-34 GB/s;
on the Xeon, float16 20-25 GB/s (splitting the rows between Python threads instead cost ~0.1 ms a call in hand-offs
and reached 16-19 GB/s). The result is the float32-accumulated product rounded once to the activations' dtype, as
torch's, and each output is summed in one order whatever the number of rows, so a batched decode step gives every
slot exactly the values it would get alone. int8 weights (``--quantize int8``: one float scale per output row) go
through the same loop, widened from one byte, the scale applied to each sum (``llm.quantize`` uses it). On CPUs
with AVX512-BF16 a second build (``AVX512_BF16``) multiplies bfloat16 weights by bfloat16 rows with that extension's
dot products instead (a bfloat16 decode step 32.4 -> 34.8 GB/s on the EPYC).

The kernel is compiled on first use with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``) for the ISA
torch reports (``torch.backends.cpu.get_cpu_capability()``), into ``$IBLLM_KERNEL_CACHE`` (default
``~/.cache/ibllm/kernels``), keyed by a hash of the source, flags and compiler, so later starts only load it (~1 s
to build; the compiler needs OpenMP, as gcc's libgomp). Where there is no compiler, no AVX2, or the build fails,
nothing changes: products go through torch, and ``status()`` says why. ``IBLLM_HALF_GEMV=0`` switches it off
(benchmarks compare both).

Only small products use it (``max_rows``): more rows of half or int8 weights become arithmetic-bound in this kernel
(4 rows ran at half the rate of 2 on the Xeon), and a prefill of many rows is a GEMM, torch's job. Training (weights
that need a gradient) never does.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gemv.c")
OP_SOURCE = Path(__file__).with_name("gemv_op.cpp")  # the same kernel as a torch op, for compiled graphs
MAX_ROWS = 2  # of half or int8 weights: products of more rows go through torch (module docstring)
# Of float32 weights: at 16 rows the kernel still took 0.35-0.6x MKL's time on the EPYC (256- to 4096-wide
# matrices), so up to 16 slots a batched step stays on it.
MAX_ROWS_FLOAT32 = 16


def max_rows(dtype: torch.dtype) -> int:
    """The most rows of x that go through the kernel for weights of ``dtype``."""
    return MAX_ROWS_FLOAT32 if dtype == torch.float32 else MAX_ROWS


_FLAGS = {"AVX512_BF16": ["-DIBLLM_AVX512", "-DIBLLM_BF16DP", "-mavx512f", "-mavx512bf16", "-mf16c", "-mfma"],
          "AVX512": ["-DIBLLM_AVX512", "-mavx512f", "-mf16c", "-mfma"],
          "AVX2": ["-DIBLLM_AVX2", "-mavx2", "-mf16c", "-mfma"]}
# OpenMP: the kernel shares rows out between the threads of torch's own OpenMP runtime. torch's wheel ships
# libgomp.so.1 and has loaded it before this library is, so the loader binds this library to that same copy.
_COMMON = ["-O3", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off"]
_why_not = ""  # the reason the kernel is not used, once asked
_native = False  # whether native_op() loaded the C++ op


def _compiler(*names: str | None) -> str | None:
    for name in names or (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cache_dir() -> Path:
    root = os.environ.get("IBLLM_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "ibllm" / "kernels"


def _version(compiler: str) -> str:
    return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout


def _cached(name: str, key: list[str], steps: Callable[[Path, Path], list[list[str]]]) -> Path:
    """``name``-<hash of key>.so in the cache, made by running ``steps(tmp, target)`` (compiler command lines) once,
    atomically: parallel starts do not clash."""
    digest = hashlib.sha256("\0".join(key).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{name}-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        for command in steps(Path(tmp), built):
            done = subprocess.run(command, capture_output=True, text=True, timeout=180)
            if done.returncode != 0:
                raise RuntimeError(f"{Path(command[0]).name} failed: {done.stderr.strip()[-500:]}")
        os.replace(built, target)
    return target


def _build(cc: str, isa: str) -> Path:
    """The shared library for ``isa``, compiled once into the cache."""
    flags = [*_COMMON, *_FLAGS[isa]]
    return _cached(f"gemv-{isa.lower()}", [SOURCE.read_text(), *flags, _version(cc)],
                   lambda tmp, out: [[cc, *flags, "-o", str(out), str(SOURCE)]])


def _build_op(cc: str, cxx: str, isa: str) -> Path:
    """gemv.c linked with gemv_op.cpp: a library of torch's that registers ``ibllm_kernel::gemv``, compiled once into
    the cache against this torch's headers (keyed by its version)."""
    torch_dir = Path(torch.__file__).parent
    c_flags = [*(f for f in _COMMON if f != "-shared"), *_FLAGS[isa]]
    cxx_flags = ["-O2", "-shared", "-fPIC", "-fopenmp", "-std=c++17", f"-I{torch_dir / 'include'}",
                 f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"]
    libs = [f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}"]
    key = [SOURCE.read_text(), OP_SOURCE.read_text(), *c_flags, *cxx_flags, torch.__version__, _version(cc),
           _version(cxx)]

    def steps(tmp: Path, out: Path) -> list[list[str]]:
        obj = str(tmp / "gemv.o")
        return [[cc, *c_flags, "-c", "-o", obj, str(SOURCE)],
                [cxx, *cxx_flags, "-o", str(out), str(OP_SOURCE), obj, *libs]]

    return _cached(f"gemv-op-{isa.lower()}", key, steps)


def load(isa: str, cc: str) -> ctypes.CDLL:
    """The kernel built for ``isa`` ("AVX512_BF16", "AVX512" or "AVX2") with the compiler ``cc`` and loaded; raises
    RuntimeError or OSError where that fails. ``library()`` is the one the decode step uses."""
    lib = ctypes.CDLL(str(_build(cc, isa)))
    lib.gemv.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, *[ctypes.c_int64] * 3]
    lib.gemv.restype = ctypes.c_int
    lib.isa = isa
    return lib


def has_avx512_bf16() -> bool:
    """Whether this CPU has AVX512-BF16 (Linux's /proc/cpuinfo flags; False where that cannot be read)."""
    try:
        with open("/proc/cpuinfo") as info:
            return any(line.startswith("flags") and "avx512_bf16" in line.split() for line in info)
    except OSError:
        return False


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernel for this CPU, or None where it cannot be used here (``status()`` says why)."""
    global _why_not
    isa = torch.backends.cpu.get_cpu_capability()
    cc = _compiler()
    if os.environ.get("IBLLM_HALF_GEMV", "").strip().lower() in ("0", "false", "no", "off"):
        _why_not = "switched off by IBLLM_HALF_GEMV"
    elif platform.machine().lower() not in ("x86_64", "amd64") or isa not in _FLAGS:
        _why_not = f"no AVX2 on this CPU ({platform.machine()}, torch reports {isa})"
    elif cc is None:
        _why_not = "no C compiler found (set CC, or install gcc)"
    else:
        # AVX512-BF16 (torch reports it as AVX512): the build with its dot products first, the plain one if the
        # compiler cannot make it.
        for build in (["AVX512_BF16"] if isa == "AVX512" and has_avx512_bf16() else []) + [isa]:
            try:
                return load(build, cc)
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                _why_not = f"the kernel did not build: {err}"
    log.info("small decode products go through torch's kernels: %s", _why_not)
    return None


@functools.cache
def native_op() -> bool:
    """Load ``torch.ops.ibllm_kernel.gemv`` (gemv_op.cpp), the op compiled graphs call, building it on first use with
    the C++ compiler (``$CXX``, else ``c++``/``g++``/``clang++``) against this torch's headers; whether it is loaded.
    Where that fails, graphs call the Python ops below (the same kernel, ~20 us more a call) and the log says why.
    Call it before compiling (``DecodeBatch.compile`` does): a build cannot be traced, so a graph traced earlier
    calls the Python ops."""
    global _native
    lib = library()
    cxx = _compiler(os.environ.get("CXX"), "c++", "g++", "clang++")
    if lib is None or cxx is None:
        return False
    try:
        torch.ops.load_library(str(_build_op(_compiler(), cxx, lib.isa)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        log.info("compiled graphs call the kernel through Python: its torch op did not build (%s)", err)
        return False
    torch.library.register_fake("ibllm_kernel::gemv")(_fake)
    _native = True
    return True


def _fake(x: torch.Tensor, weight: torch.Tensor, *_: torch.Tensor | None) -> torch.Tensor:
    """The result's shape and dtype, for tracing (all three ops)."""
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def status() -> str:
    """One line for the log and the Model tab: what one-row products of half or int8 weights run on here."""
    lib = library()
    return f"ibllm's {lib.isa} kernel (llm/gemv.c)" if lib is not None else f"torch's kernels ({_why_not})"


_KINDS = {torch.float16: 0, torch.bfloat16: 1, torch.int8: 2, torch.float32: 3}  # gemv.c's F16, BF16, I8, F32


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def product(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
            bias: torch.Tensor | None = None, *, out_dtype: torch.dtype | None = None,
            lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x (..., k) @ weight (n, k)^T through the kernel (``lib``, default ``library()``), times ``scale`` (n,) and plus
    ``bias`` (n,) per output where given (both float32), in ``out_dtype`` (default x's; x and the result float32,
    float16 or bfloat16). One call: the kernel widens x, adds, rounds and shares the rows between torch's threads
    itself, so a product costs no torch op around it (each ~5-15 us at decode sizes); ctypes lets go of the GIL."""
    lib = lib or library()
    n, k = weight.shape
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        x = x.float()
    rows = x.reshape(-1, k)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    if not weight.is_contiguous():
        weight = weight.contiguous()
    y = torch.empty(*x.shape[:-1], n, dtype=out_dtype or x.dtype)
    failed = lib.gemv(weight.data_ptr(), _pointer(scale), _KINDS[weight.dtype], rows.data_ptr(), _KINDS[rows.dtype],
                      _pointer(bias), y.data_ptr(), _KINDS[y.dtype], rows.shape[0], k, n)
    if failed:
        raise MemoryError("gemv: no memory to widen the input rows")
    return y


def float32_copy(t: torch.Tensor | None) -> torch.Tensor | None:
    """A bias or scale as the kernel takes it: float32, flat, contiguous (taken once per layer, not per call)."""
    return None if t is None else t.detach().reshape(-1).float().contiguous()


def linear(x: torch.Tensor, weight: torch.Tensor, bias32: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a float32 or half-precision CPU ``weight`` and at most ``max_rows`` rows of
    ``x``, the bias in float32 (``float32_copy``). Eager calls skip the custom op's dispatch (measured ~60 us a call
    on the Xeon, ~1.5% of a 7B step); a graph being compiled calls an op (``_graph_op``)."""
    if torch.compiler.is_compiling():
        return _graph_op(x, weight, None, bias32)
    return product(x, weight, None, bias32)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale32: torch.Tensor, bias32: torch.Tensor | None
                ) -> torch.Tensor:
    """``F.linear(x, weight * scale[:, None], bias)`` for int8 CPU ``weight`` with one scale per output row, scale
    and bias in float32 (at most ``MAX_ROWS`` rows of ``x``; eager calls skip the op's dispatch, as ``linear``)."""
    if torch.compiler.is_compiling():
        return _graph_op(x, weight, scale32, bias32)
    return product(x, weight, scale32, bias32)


def _graph_op(x: torch.Tensor, weight: torch.Tensor, scale32: torch.Tensor | None, bias32: torch.Tensor | None
              ) -> torch.Tensor:
    """The op a graph being compiled calls: the C++ one where ``native_op()`` loaded it, else the Python ones."""
    if _native:
        return torch.ops.ibllm_kernel.gemv(x, weight, scale32, bias32)
    if scale32 is None:
        return float_gemv(x, weight, bias32)
    return int8_gemv(x, weight, scale32, bias32)


# Python ops of their own, so that a compiled decode step calls the kernel instead of breaking its graph on ctypes:
# what graphs call where the C++ op (native_op) does not build.
@torch.library.custom_op("ibllm::float_gemv", mutates_args=())
def float_gemv(x: torch.Tensor, weight: torch.Tensor, bias32: torch.Tensor | None) -> torch.Tensor:
    """The op of ``linear``."""
    return product(x, weight, None, bias32)


float_gemv.register_fake(_fake)


@torch.library.custom_op("ibllm::int8_gemv", mutates_args=())
def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scale32: torch.Tensor, bias32: torch.Tensor | None
              ) -> torch.Tensor:
    """The op of ``int8_linear``."""
    return product(x, weight, scale32, bias32)


int8_gemv.register_fake(_fake)


class GemvLinear(nn.Linear):
    """An ``nn.Linear`` (same Parameters and state-dict keys) whose products of a few rows (``max_rows``) use the
    kernel."""

    @classmethod
    def of(cls, linear: nn.Linear) -> GemvLinear:
        swapped = cls.__new__(cls)
        nn.Module.__init__(swapped)
        swapped.in_features, swapped.out_features = linear.in_features, linear.out_features
        swapped.weight, swapped.bias = linear.weight, linear.bias
        swapped._bias32 = (-1, None)  # (the bias's version it was taken at, its float32 copy)
        return swapped

    @property
    def bias32(self) -> torch.Tensor | None:
        """The bias as the kernel takes it: copied once, and again only after the bias changed in place (a training
        step; torch counts in-place changes in ``_version``)."""
        if self.bias is None:
            return None
        if torch.compiler.is_compiling():  # in a graph the conversion is one fused op, and always current
            return self.bias.float()
        version, copy = self._bias32
        if version != self.bias._version:
            copy = float32_copy(self.bias)
            self._bias32 = (self.bias._version, copy)
        return copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._product(x, with_bias=True)

    def weight_product(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weight^T`` without the bias (the visual injection's use of the base ``wv``)."""
        return self._product(x, with_bias=False)

    def _product(self, x: torch.Tensor, with_bias: bool) -> torch.Tensor:
        # In a compiled graph too, even the toy model's small float32 weights: its compiled step through the op ran
        # at x2.76-4.13 the reference loop against x2.00-2.90 through inductor's own product (four runs each,
        # alternating, bench/serve.py on the EPYC).
        small = x.numel() <= max_rows(self.weight.dtype) * self.in_features
        if small and not (torch.is_grad_enabled() and self.weight.requires_grad):
            return linear(x, self.weight, self.bias32 if with_bias else None)
        return F.linear(x, self.weight, self.bias if with_bias else None)


def _swappable(module: nn.Module) -> bool:
    return (type(module) in (nn.Linear, GemvLinear) and module.weight.device.type == "cpu"
            and module.weight.dtype in (torch.float32, torch.float16, torch.bfloat16))


def use_gemv(model: nn.Module) -> int:
    """Route the small products (``max_rows``) of every float32 or half-precision CPU Linear in ``model`` (but
    LoRA's rank-r pairs, too small to gain) through the kernel: LLaMA's decode step, the bind network's one row per
    input, the injection's base ``wv``. Larger products still go through torch. How many Linears now do (0 where
    the kernel is not available: ``status()``)."""
    linears = [(owner, name) for owner in model.modules() for name, child in owner.named_children()
               if _swappable(child) and not name.startswith("lora_")]
    if not linears or library() is None:
        return 0
    for owner, name in linears:
        if type(getattr(owner, name)) is nn.Linear:
            setattr(owner, name, GemvLinear.of(getattr(owner, name)))
    return len(linears)


__all__ = ["linear", "int8_linear", "float32_copy", "float_gemv", "int8_gemv", "GemvLinear", "use_gemv",
           "library", "load", "native_op", "has_avx512_bf16", "product", "status", "max_rows", "MAX_ROWS",
           "MAX_ROWS_FLOAT32", "SOURCE", "OP_SOURCE"]
