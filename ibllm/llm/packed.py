"""Float32 products of exactly B rows (the batched decode step of B slots) through MKL's packed GEMM, on a CPU.

A decode step multiplies every weight by one row per live slot. Reading the weights is the whole cost of one row,
so B rows should cost about the same; but MKL's ordinary GEMM handles a few rows poorly here: 8 rows through the
matrices of a 1024-wide, 8-layer model took 2.9x one row. MKL also keeps a weight in its own "packed" layout for a
fixed number of rows, and through that 8 rows took 2.1x one row (1.5x for the FFN's 1024 x 5632, 3x for the output
head; this project's 2-core Xeon; ``bench/serve.py`` has the whole-step figures). So ``pack_linears`` gives each
float32 Linear of the decode path a packed copy of its weight for B rows, and the step of a batch with more than one
live slot runs all B rows (``DecodeBatch``).

The packed copy is memory on top of the weight (MKL's layout is ~1.08x its size), used only by products of exactly B
rows; every other product (one row, a prefill) uses the weight as before, so outputs stay those of ``F.linear`` up to
the summation order. The copy is taken once, for inference: a weight changed in place afterwards (training, a LoRA
merge) is not seen by it, so pack last, after ``merge_lora``/``fuse_projections`` (the engine does, when it is
built). Half-precision, quantised and GPU weights are left alone (MKL packs float32 only). Where torch
was built without MKL nothing is packed.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn


def packing_available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


# The packed weights, by key: MKL's packed tensor is opaque (no storage), which a custom op may not take as an
# argument, so the op takes the key of one.
_PACKED: dict[int, torch.Tensor] = {}


# An opaque op for torch.compile: inductor's own lowering of mkl::_mkl_linear expects weights it froze itself.
@torch.library.custom_op("ibllm::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, key: int,
                  rows: int) -> torch.Tensor:
    return torch.ops.mkl._mkl_linear(x, _PACKED[key], weight, bias, rows)


@packed_linear.register_fake
def _(x, weight, bias, key, rows):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` (same weight and bias Parameters, same state-dict keys) that also holds its weight packed
    for products of ``rows`` rows and uses it for exactly those."""

    rows: int
    key: int  # of its packed weight in _PACKED

    @classmethod
    @torch.no_grad()
    def of(cls, linear: nn.Linear, rows: int) -> PackedLinear:
        packed = cls.__new__(cls)
        nn.Module.__init__(packed)
        packed.in_features, packed.out_features = linear.in_features, linear.out_features
        packed.weight, packed.bias = linear.weight, linear.bias
        packed.rows = rows
        packed.key = id(packed)
        _PACKED[packed.key] = torch.ops.mkl._mkl_reorder_linear_weight(linear.weight.detach(), rows)
        weakref.finalize(packed, _PACKED.pop, packed.key, None)  # the packed copy goes with the module
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == self.rows * self.in_features and not (torch.is_grad_enabled() and self.weight.requires_grad):
            if torch.compiler.is_compiling():  # a graph needs the opaque op
                return packed_linear(x, self.weight, self.bias, self.key, self.rows)
            # Eager: MKL's op itself. Through the custom op every call went through torch.library's Python
            # dispatch, and the first one imported torch._dynamo (1.4 s of the first batched step in the app,
            # measured with py-spy).
            return torch.ops.mkl._mkl_linear(x, _PACKED[self.key], self.weight, self.bias, self.rows)
        return F.linear(x, self.weight, self.bias)


def _packable(module: nn.Module) -> bool:
    return (type(module) in (nn.Linear, PackedLinear) and module.weight.dtype == torch.float32
            and module.weight.device.type == "cpu")


def _decode_linears(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(owner, attribute) of every packable Linear of ``model`` (a ``llm.llama.Transformer``) that a decode step
    calls: each block's projections and the output head. Not LoRA's rank-r pairs (tiny), nor ``wv`` once fused into
    ``wqkv`` (then only the visual injection reads its weight)."""
    found = []
    for owner in (*(m for block in model.layers for m in (block.attention, block.feed_forward)), model):
        for name, child in owner.named_children():
            fused_away = name == "wv" and getattr(owner, "wqkv", None) is not None
            if _packable(child) and not name.startswith("lora_") and not fused_away:
                found.append((owner, name))
    return found


def packed_bytes(model: nn.Module) -> int:
    """Memory ``pack_linears`` would add (the packed layout measured ~1.08x the weight; counted as 1.1x)."""
    if not packing_available():
        return 0
    total = sum(getattr(owner, name).weight.numel() * 4 for owner, name in _decode_linears(model))
    return int(total * 1.1)


def pack_linears(model: nn.Module, rows: int) -> int:
    """Give every float32 CPU Linear of the decode path a packed copy for ``rows`` rows; how many were packed."""
    if not packing_available() or rows < 2:
        return 0
    linears = _decode_linears(model)
    for owner, name in linears:
        linear = getattr(owner, name)
        if not (isinstance(linear, PackedLinear) and linear.rows == rows):  # packed already: once is enough
            setattr(owner, name, PackedLinear.of(linear, rows))
    return len(linears)


def packed_nbytes(model: nn.Module) -> int:
    """Memory the packed copies of ``model``'s weights hold now (0 when nothing is packed)."""
    return sum(_PACKED[m.key].numel() * _PACKED[m.key].element_size() for m in model.modules()
               if isinstance(m, PackedLinear))
