"""Many-row products of half-precision weights in float32 (``ibllm.halfgemm``): the same outputs as float32 of the
half weights, one-row decode untouched, the choice following the probe, and at most one matrix of extra memory
(real resident memory of a child process)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ibllm import halfgemm
from ibllm.config import IMAGEBIND_TOY, LlamaConfig
from ibllm.encoders import ImageBind
from ibllm.encoders.imagebind import input_shape
from ibllm.llm.llama import Transformer, init_weights
from tests.conftest import REPO

SMALL = LlamaConfig(dim=256, n_layers=2, n_heads=4, vocab_size=1024, multiple_of=32, max_seq_len=64)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.fixture
def forced(monkeypatch):
    """Force the float32 path (this project's CPU has AMX, where the probe keeps half precision), fresh buffer."""
    monkeypatch.setenv("IBLLM_HALF_GEMM", "float32")
    monkeypatch.setattr(halfgemm, "_buffer", None)


@pytest.mark.parametrize("dtype, bound", [(torch.bfloat16, 0.02), (torch.float16, 0.003)])
@torch.no_grad()
def test_prefill_equals_float32_of_the_half_weights(forced, dtype, bound):
    model = Transformer(SMALL)
    init_weights(model, torch.Generator().manual_seed(0))
    half = model.to(dtype).eval()
    ref = copy.deepcopy(half).float()  # float32 of the very same (rounded) weights
    tokens = torch.randint(0, SMALL.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    out = half(tokens, use_cache=False)
    assert halfgemm.buffer_bytes() > 0  # the multi-token call went through the float32 path
    assert _relative_error(out, ref(tokens, use_cache=False)) < bound  # measured: 0.8% (bf16), 0.1% (fp16)


@torch.no_grad()
def test_encoder_equals_float32_of_the_half_weights(forced):
    torch.manual_seed(0)
    encoders = ImageBind(IMAGEBIND_TOY).eval().to(torch.bfloat16)
    ref = copy.deepcopy(encoders).float()
    x = torch.randn(2, *input_shape(IMAGEBIND_TOY, "vision"))
    out = encoders("vision", x)
    assert halfgemm.buffer_bytes() > 0
    assert _relative_error(out, ref("vision", x)) < 0.02


def test_one_row_products_and_the_probes_choice_are_respected(monkeypatch):
    weight = torch.randn(64, 32).bfloat16()
    row = torch.randn(1, 32).bfloat16()
    with halfgemm.Float32Gemm():
        decode = F.linear(row, weight)
    assert torch.equal(decode, F.linear(row, weight))  # one row: the half-precision product itself
    monkeypatch.setattr(halfgemm, "_buffer", None)
    monkeypatch.setenv("IBLLM_HALF_GEMM", "half")
    model = Transformer(SMALL).to(torch.bfloat16).eval()
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long), use_cache=False)
    assert halfgemm.buffer_bytes() == 0  # half precision kept where it is (said to be) the faster
    monkeypatch.delenv("IBLLM_HALF_GEMM")
    first = halfgemm.gemm_time_ratio(torch.bfloat16)
    hits = halfgemm.gemm_time_ratio.cache_info().hits
    assert halfgemm.gemm_time_ratio(torch.bfloat16) == first and halfgemm.gemm_time_ratio.cache_info().hits == hits + 1
    assert halfgemm.half_gemm_is_slow(torch.bfloat16) == (first > 1.0)


MEASURE = """
import json, os, torch
from ibllm.config import LlamaConfig
from ibllm.llm.llama import Transformer
def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))
def peak_growth(fn):
    open("/proc/self/clear_refs", "w").write("5")  # resets this process's peak RSS (VmHWM) to its current RSS
    before = status("VmRSS")
    fn()
    return status("VmHWM") - before
cfg = LlamaConfig(dim=1024, n_layers=4, n_heads=8, vocab_size=1024, multiple_of=256, max_seq_len=128)
model = Transformer(cfg).to(torch.bfloat16).eval()
tokens = torch.randint(0, cfg.vocab_size, (1, 64))
with torch.no_grad():
    model(tokens, use_cache=False)  # warm-up: BLAS and allocator set-up, in half precision
    half = peak_growth(lambda: model(tokens, use_cache=False))
    os.environ["IBLLM_HALF_GEMM"] = "float32"
    upcast = peak_growth(lambda: model(tokens, use_cache=False))
layer = sum(p.numel() for p in model.layers[0].parameters()) * 4
print(json.dumps({"half": half, "upcast": upcast, "layer_fp32": layer,
                  "model_fp32": sum(p.numel() for p in model.parameters()) * 4}))
"""


def test_extra_memory_is_at_most_one_layer_in_float32():
    result = subprocess.run([sys.executable, "-c", MEASURE], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    m = json.loads(result.stdout.strip().splitlines()[-1])
    extra = m["upcast"] - m["half"]
    # One layer is 50 MB in float32 here, the whole model 210 MB; the buffer holds the largest matrix (11.5 MB).
    assert extra <= m["layer_fp32"], f"{extra / 2**20:.1f} MiB more than the half-precision prefill"
