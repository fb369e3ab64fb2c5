"""Weight-only quantisation of the linear layers (``--quantize int8`` / ``int4``), through torchao.

What is quantised: LLaMA's every block's ``wq wk wv wo w1 w2 w3`` and the output head; with int8 also the bind
network's Linears and, in every block of the encoders (ImageBind-Huge's trunks, Point-Bind's), the attention's
projections and the MLP (``quantize_around``). ``is_quantized_weight`` names them all by their official keys, so the
memory plan counts the same tensors. Embeddings, norms, biases, the LoRA of ``wv``, the encoders' stems and heads
and the rest of the model stay in the serving dtype, bfloat16: the quantised matrix products of torch and torchao are
written for bfloat16 activations (measured on this project's CPU: the int8 kernel takes 1.4 ms for a 4096x4096
matrix-vector product with bfloat16 activations, 32 ms with float32 and 42 ms with float16).

Order: LoRA is folded into each base weight first (``merge_lora``, block by block), then the weight is quantised, so
the quantised matrix is the adapted one. ``wv`` keeps its LoRA as a separate rank-r add (the visual injection needs
the un-adapted ``wv``): the injection's ``F.linear(adapter, wv.weight)`` goes through torchao's own linear for the
quantised tensor, i.e. the injection sees the same quantised base ``wv`` as every token.

Kernels:
- int8 (per output row, symmetric; torchao ``Int8Tensor``): on a CPU, one or two rows (decode) through ibllm's own
  kernel (``llm.gemv``) where it builds, else ``torch.ops.aten._weight_int8pack_mm`` (torchao's eager linear
  dequantises the whole matrix on every call, measured 5x slower than float32 here); 16+ rows (a prefill) a GEMM of
  the integers converted into the one reused buffer of ``ibllm.halfgemm``; elsewhere torchao's linear (fused by
  ``torch.compile`` on a GPU).
- int4 (groups of 128 input columns, asymmetric; ``fits_scheme`` says which shapes): on a CPU torchao's
  ``Int4CPULayout`` (``_weight_int4pack_mm_for_cpu``); on an NVIDIA GPU of compute capability 8.0 or newer the
  tinygemm layout (``tile_packed_to_4d``). ``check_supported`` says where it is not available.
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ibllm.halfgemm import half_gemm_is_slow, widened
from ibllm.llm import gemv

SCHEMES = ("int8", "int4")
SERVING_DTYPE = torch.bfloat16  # of everything not quantised, and of the activations (module docstring)

# Official LLaMA keys (with or without the "llama." prefix of the adapter files) of the quantised matrices.
_QUANTIZED = re.compile(r"(^|\.)(layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])|output)\.weight$")
# With int8, also the matrices around LLaMA (official keys): the bind network of 7B.pth (0.6 B parameters) and every
# transformer block of the encoders in imagebind_w3D.pth (ImageBind-Huge's trunks and Point-Bind's, 1.2 B): 1.8 GB
# less than bfloat16, which is what a 16 GB machine lacked. ``quantize_around`` takes exactly these.
_AROUND = re.compile(r"^(image_bind_(proj|f[123]_\d+)\.weight"
                     r"|(image_bind\.)?modality_trunks\.\w+\.blocks\.\d+\.(attn\.(in_proj_weight|out_proj\.weight)"
                     r"|mlp\.fc[12]\.weight)"
                     r"|(image_bind\.)?point_trunk\.point_encoder\.blocks\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])"
                     r"\.weight)$")
AROUND_SCHEMES = ("int8",)  # int4's kernels are for few rows; the encoders multiply hundreds at a time
_INT4_GROUP = 128  # input columns sharing a scale and zero point
_INT8_KERNEL_MULTIPLE = 16  # _weight_int8pack_mm gives NaN/Inf or crashes for other widths (measured: 8, 24, 100)
# From this many rows on, an int8 product on a CPU converts the matrix to bfloat16 (one reused buffer) and multiplies
# that instead: measured for 11008x4096, the kernel takes 8 ms for one row (the bfloat16 route 49 ms) but 136 ms for
# 29 rows (the bfloat16 route 72 ms).
_INT8_WIDEN_ROWS = 16


def quantized_parts(scheme: str) -> str:
    """What ``--quantize scheme`` quantises, in words (the memory plan's line)."""
    if scheme in AROUND_SCHEMES:
        return "the linear layers of LLaMA, the bind network and the encoders"
    return "LLaMA's linear layers"


def is_quantized_weight(key: str, scheme: str = "int8") -> bool:
    """Whether ``--quantize scheme`` quantises the tensor of this official key (LLaMA's; with int8 also the bind
    network's and the encoder blocks')."""
    return _QUANTIZED.search(key) is not None or (scheme in AROUND_SCHEMES and _AROUND.match(key) is not None)


def fits_scheme(shape: tuple[int, ...] | torch.Size, scheme: str) -> bool:
    """Whether an (out, in) weight can be quantised so; one that cannot stays in bfloat16 (int4's packed layouts want
    16 | out and whole groups of inputs; 7B's 4096 / 11008 / 32000 all fit)."""
    n, k = shape
    return scheme == "int8" or (n % 16 == 0 and k % _INT4_GROUP == 0)


def quantized_weight_bytes(shape: tuple[int, ...] | torch.Size, scheme: str) -> int:
    """Bytes of one quantised (out, in) weight as stored: integer data plus bfloat16 scales (and zero points)."""
    n, k = shape
    if scheme == "int8":
        return n * k + 2 * n  # int8 data, one bfloat16 scale per row
    if scheme == "int4":
        return n * k // 2 + (k // _INT4_GROUP) * n * 2 * 2  # two values a byte; (scale, zero) per group
    raise ValueError(f"unknown quantisation {scheme!r}: use {' or '.join(SCHEMES)}")


def _has_int4_cpu_layout() -> bool:
    """torchao's CPU int4 layout lives in its first config version (torchao <= 0.15; gone in 0.16)."""
    from torchao.quantization import Int4WeightOnlyConfig  # here: torchao is optional until quantisation is asked

    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and \
        "layout" in inspect.signature(Int4WeightOnlyConfig).parameters


def check_supported(scheme: str, device: torch.device) -> None:
    """Raise a ValueError naming what is missing when ``scheme`` cannot run on ``device``."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantisation {scheme!r}: use {' or '.join(SCHEMES)}")
    try:
        import torchao  # noqa: F401  (optional until quantisation is asked for: the app runs without it)
    except ImportError:
        raise ValueError("--quantize needs torchao: pip install torchao (see requirements.txt)") from None
    if scheme == "int4":
        if device.type == "cpu" and not _has_int4_cpu_layout():
            raise ValueError("int4 on a CPU needs torchao's Int4CPULayout, which torchao 0.16 (the first release "
                             "peft accepts) no longer offers: use --quantize int8 on a CPU (int4 runs on a GPU)")
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
            raise ValueError("int4 on a GPU needs compute capability 8.0 or newer (tinygemm): use --quantize int8")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"int4 runs on a CPU or an NVIDIA GPU, not {device.type}: use --quantize int8")


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: for a quantised tensor (a torchao wrapper subclass), those of the tensors inside it."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_nbytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def _quantize_weight(weight: torch.Tensor, scheme: str) -> torch.Tensor:
    # Imported here: torchao is needed only when quantisation is asked for, and takes seconds to import.
    from torchao.quantization import Int4WeightOnlyConfig, quant_api, quant_primitives
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor  # (the same reason)

    if scheme == "int8":
        # Int8Tensor.from_hp clamps scales at the eps of the weight's dtype, 2^-7 for bfloat16: every row whose largest
        # value is under 1 (most of LLaMA's) would lose most of its 8 bits (measured: 10% logits error on a small
        # model). The same per-row symmetric quantisation with float32's eps, as torchao's first version did.
        block = (1, weight.shape[1])
        scale, zero = quant_primitives.choose_qparams_affine(
            weight, quant_primitives.MappingType.SYMMETRIC, block, torch.int8, -128, 127,
            eps=torch.finfo(torch.float32).eps, scale_dtype=weight.dtype, zero_point_dtype=torch.int8, keepdim=True)
        data = quant_primitives.quantize_affine(weight, block, scale, zero, torch.int8, -128, 127)
        return Int8Tensor(data, scale, list(block), weight.dtype)
    group = _INT4_GROUP
    if weight.device.type == "cpu":
        from torchao.dtypes import Int4CPULayout  # the CPU layout exists only in torchao's first config version

        config = Int4WeightOnlyConfig(group_size=group, layout=Int4CPULayout(), version=1)
    else:
        config = Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d")
    with warnings.catch_warnings():  # version 1's deprecation notice, once per matrix otherwise
        warnings.simplefilter("ignore")
        return quant_api._int4_weight_only_quantize_tensor(weight, config)


class QuantizedLinear(nn.Module):
    """A Linear whose weight is a torchao quantised tensor (``weight`` keeps the name: ``F.linear(x, wv.weight)``
    in the injection still works). Activations are computed in ``SERVING_DTYPE`` and returned in their own dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scheme: str):
        super().__init__()
        self.scheme = scheme
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.to(weight.device, SERVING_DTYPE), requires_grad=False)
        self.cpu_int8 = scheme == "int8" and weight.device.type == "cpu"
        if self.cpu_int8:  # scale and bias as ibllm's kernel takes them, once
            self.scale32, self.bias32 = gemv.float32_copy(weight.scale), gemv.float32_copy(self.bias)
        self._int8_kernel = self.cpu_int8 and self.in_features % _INT8_KERNEL_MULTIPLE == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._product(x, self.bias)

    def weight_product(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weight^T`` without the bias (the visual injection's use of the base ``wv``)."""
        return self._product(x, None)

    def _product(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.cpu_int8 and x.numel() <= gemv.MAX_ROWS * self.in_features and gemv.library() is not None:
            # One or two rows (decode): ibllm's kernel reads the integers once, in the activations' own dtype.
            return gemv.int8_linear(x, self.weight.qdata, self.scale32, None if bias is None else self.bias32)
        dtype = x.dtype
        x = x.to(SERVING_DTYPE)
        if self._int8_kernel:
            w, rows = self.weight, x.reshape(-1, self.in_features).contiguous()
            if rows.shape[0] >= _INT8_WIDEN_ROWS:  # a prefill: a GEMM of the integers, then the row scales
                # In bfloat16, or float32 where the start-up probe found half-precision GEMM the slower one.
                wide = torch.float32 if half_gemm_is_slow(SERVING_DTYPE) else SERVING_DTYPE
                with widened(w.qdata, wide) as integers:
                    y = (F.linear(rows.to(wide), integers) * w.scale.reshape(-1)).to(SERVING_DTYPE)
            else:
                y = torch.ops.aten._weight_int8pack_mm(rows, w.qdata, w.scale.reshape(-1))
            y = y.view(*x.shape[:-1], self.out_features)
            if bias is not None:
                y = y + bias
        else:
            y = F.linear(x, self.weight, bias)
        return y.to(dtype)

    def _apply(self, fn, recurse=True):
        # ``model.to(dtype)`` converts the rest of the model after quantisation; the quantised weight is already on
        # its device and must not be "converted" (a torchao tensor's ``.to`` would copy or dequantise it).
        weight = self._parameters.pop("weight")
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["weight"] = weight
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme}"


@torch.no_grad()
def quantize_linear(owner: nn.Module, name: str, scheme: str, device: torch.device,
                    release: Callable[[torch.Tensor], None] | None = None) -> None:
    """Replace ``owner.<name>`` (an nn.Linear) by its ``QuantizedLinear`` on ``device``; ``release`` is given the old
    weight afterwards (the loader drops its file pages). A weight of a shape the scheme cannot take is left as it is."""
    linear = getattr(owner, name)
    if not fits_scheme(linear.weight.shape, scheme):
        return
    old = linear.weight
    quantized = _quantize_weight(old.detach().to(device=device, dtype=SERVING_DTYPE), scheme)
    setattr(owner, name, QuantizedLinear(quantized, linear.bias, scheme))
    if release is not None:
        release(old)


@torch.no_grad()
def quantize_transformer(model: nn.Module, scheme: str, *, device: torch.device | str = "cpu", merge_lora: bool = True,
                         release: Callable[[torch.Tensor], None] | None = None) -> None:
    """Quantise a ``llm.llama.Transformer``'s linear layers in place, block by block (LoRA merged into each block just
    before its weights are quantised), so at most one block is ever held in both forms. The model must not be fused
    (``fuse_projections``) and not wrapped by peft. Everything else is left for the caller's ``model.to(dtype)``."""
    device = torch.device(device)
    check_supported(scheme, device)
    if model.layers[0].attention.wqkv is not None:
        raise ValueError("quantise before fuse_projections (wv must stay a Linear of its own)")
    for layer in model.layers:
        if merge_lora:
            layer.attention.merge_lora()
            layer.feed_forward.merge_lora()
        for owner, names in ((layer.attention, ("wq", "wk", "wv", "wo")), (layer.feed_forward, ("w1", "w2", "w3"))):
            for name in names:
                quantize_linear(owner, name, scheme, device, release)
    quantize_linear(model, "output", scheme, device, release)
    if merge_lora:
        model.lora_merged = model.cfg.w_lora


@torch.no_grad()
def quantize_around(net: nn.Module, scheme: str, *, device: torch.device | str = "cpu",
                    release: Callable[[torch.Tensor], None] | None = None) -> int:
    """With int8 (``AROUND_SCHEMES``), quantise the matrices around LLaMA in an ``ImageBindLLM``: every Linear of the
    bind network (``net.bind``), and in each block of the encoders (``net.image_bind``, whose module names are the
    official keys) the attention's projections and the MLP: the keys ``is_quantized_weight`` names, so the memory
    plan counts the same. One matrix at a time, ``release`` given each old weight. Embeddings, norms, the patch
    stems and the heads stay in bfloat16. How many matrices were quantised."""
    if scheme not in AROUND_SCHEMES:
        return 0
    device = torch.device(device)
    done = 0
    for owner in list(net.bind.modules()):
        for name, child in list(owner.named_children()):
            if type(child) is nn.Linear:
                quantize_linear(owner, name, scheme, device, release)
                done += 1
    for owner_name, owner in list(net.image_bind.named_modules()):
        where = f"image_bind.{owner_name}"
        for name, child in list(owner.named_children()):
            if type(child) is nn.Linear and _AROUND.match(f"{where}.{name}.weight"):
                quantize_linear(owner, name, scheme, device, release)
                done += 1
        if hasattr(owner, "quantize_in_proj") and _AROUND.match(f"{where}.in_proj_weight"):
            old = owner.in_proj_weight
            weight = _quantize_weight(old.detach().to(device=device, dtype=SERVING_DTYPE), scheme)
            owner.quantize_in_proj(QuantizedLinear(weight, owner.in_proj_bias, scheme))
            if release is not None:
                release(old)
            done += 1
    return done


__all__ = ["SCHEMES", "SERVING_DTYPE", "QuantizedLinear", "quantize_transformer", "quantize_linear", "quantize_around",
           "quantized_weight_bytes", "quantized_parts", "is_quantized_weight", "check_supported", "tensor_nbytes",
           "fits_scheme"]
