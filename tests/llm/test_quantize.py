"""Weight-only int8/int4 LLaMA (``ibllm.llm.quantize``): close to float32, its bytes what the memory plan counts,
and served through the real factory and CLI."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from ibllm.checkpoint import read_state_dict
from ibllm.config import IMAGEBIND_TOY, GenerationConfig, LlamaConfig
from ibllm.factory import load_default, load_official
from ibllm.llm.llama import Transformer, init_weights
from ibllm.llm.quantize import SERVING_DTYPE, QuantizedLinear, check_supported, quantize_transformer, tensor_nbytes
from ibllm.memory import tensor_bytes
from ibllm.synthetic import write_official_layout
from ibllm.weights import MetaLlama
from tests.conftest import REPO

pytest.importorskip("torchao")

SMALL = LlamaConfig(dim=256, n_layers=2, n_heads=4, vocab_size=1024, multiple_of=32, lora_rank=4, w_lora=True,
                    w_bias=True, max_seq_len=64)
TOKENIZER = REPO / "assets" / "toy" / "tokenizer.model"


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def reference() -> Transformer:
    model = Transformer(SMALL)
    init_weights(model, torch.Generator().manual_seed(0), nonzero=0.02)  # LoRA, biases and gates all non-zero
    return model.eval()


def _quantized(reference: Transformer, scheme: str) -> Transformer:
    model = copy.deepcopy(reference)
    quantize_transformer(model, scheme)
    return model.to(SERVING_DTYPE)


@pytest.mark.parametrize("half_gemm", ["half", "float32"])  # the prefill's two routes (ibllm.halfgemm's probe)
@torch.no_grad()
def test_int8_logits_close_to_float32(reference, monkeypatch, half_gemm):
    monkeypatch.setenv("IBLLM_HALF_GEMM", half_gemm)
    model = _quantized(reference, "int8")
    assert all(isinstance(layer.attention.wv, QuantizedLinear) for layer in model.layers)
    tokens = torch.randint(0, SMALL.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    adapters = torch.randn(SMALL.n_layers, 2, 1, SMALL.dim, generator=torch.Generator().manual_seed(2))
    ref_injection = reference.visual_injection(adapters)
    injection = model.visual_injection(adapters.to(SERVING_DTYPE))  # through the quantised base wv
    assert _relative_error(injection, ref_injection) < 0.03
    ref = reference(tokens, injection=ref_injection, use_cache=False)
    out = model(tokens, injection=injection, use_cache=False)
    # Measured: 2.3% (bfloat16 alone: 1.0%; int4: 26%).
    assert _relative_error(out, ref) < 0.04
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.85
    # The decode path (one token per step through a KV cache) gives what the same positions got in one call.
    model.setup_cache(2, 32)
    model(tokens[:, :23], injection=injection)
    last = model(tokens[:, 23:], 23, injection=injection)
    torch.testing.assert_close(last[:, -1], out[:, -1], rtol=0, atol=0.05 * out.abs().max().item())


def _int4_refusal_on_cpu() -> str | None:
    try:
        check_supported("int4", torch.device("cpu"))
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_plan_counts_the_bytes_of_the_quantised_model(tmp_path, scheme):
    refusal = _int4_refusal_on_cpu() if scheme == "int4" else None
    if refusal:  # torchao >= 0.16 has no CPU int4 layout: the factory must refuse before loading, saying why
        with pytest.raises(ValueError, match="--quantize int8"):
            load_default(quantize="int4", device="cpu")
        return
    # Through the factory, from files in the official layout (LoRA in the adapter, merged before quantising).
    llama = LlamaConfig(dim=256, n_layers=2, n_heads=4, vocab_size=1024, multiple_of=32, lora_rank=4)
    files = write_official_layout(tmp_path, llama, IMAGEBIND_TOY, TOKENIZER, bridge_hidden=128)
    engine = load_official(files["llama_dir"], adapter=files["adapter"], imagebind=files["imagebind"], device="cpu",
                           quantize=scheme, use_cache=False, imagebind_config=IMAGEBIND_TOY, max_seq_len=64,
                           max_batch=1)
    assert engine.info.dtype == f"{scheme} + bfloat16" and f"--quantize {scheme}" in engine.info.memory
    adapter = read_state_dict(files["adapter"])
    base = {f"llama.{k}": v for k, v in MetaLlama.find(files["llama_dir"]).state_dict().items()
            if f"llama.{k}" not in adapter}
    planned = tensor_bytes([base, adapter, read_state_dict(files["imagebind"])], SERVING_DTYPE, scheme,
                           merge_lora=True)
    measured = sum(tensor_nbytes(t) for t in [*engine.net.parameters(), *engine.net.buffers()])
    assert planned == measured
    assert engine.answer("Hello", generation=GenerationConfig.greedy(3)) is not None  # and it answers


def test_quantize_through_the_cli():
    result = subprocess.run([sys.executable, "-m", "ibllm", "generate", "--quantize", "int8", "--max-new-tokens", "8",
                             "--point", str(REPO / "examples" / "toy" / "pyramid_point.ply"), "What shape is it?"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "int8 + bfloat16" in result.stderr
    if (REPO / "assets" / "toy" / "model.safetensors").is_file():  # the trained toy model knows its pyramids
        assert "pyramid" in result.stdout.lower()


def _int8_ops_of_torch(x: torch.Tensor) -> set[str]:
    """The ops torch's own int8 product records (that the profiler sees it at all)."""
    w = torch.zeros(32, x.shape[-1], dtype=torch.int8)
    with torch.profiler.profile() as prof:
        torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), w, torch.ones(32, dtype=x.dtype))
    return {e.name for e in prof.events()}


@torch.no_grad()
def test_int8_decode_rows_go_through_ibllm_kernel_and_agree_with_torchs(reference):
    from ibllm.llm import gemv

    if gemv.library() is None:
        pytest.skip(f"ibllm's kernel is not available here: {gemv.status()}")
    layer = _quantized(reference, "int8").layers[0].feed_forward.w1
    x = torch.randn(1, 1, SMALL.dim, generator=torch.Generator().manual_seed(3)).to(SERVING_DTYPE)
    with torch.profiler.profile() as prof:  # through the kernel, not torch's int8 op
        got = layer(x)
    calls = {e.name for e in prof.events()}
    assert "aten::_weight_int8pack_mm" not in calls and "aten::_weight_int8pack_mm" in _int8_ops_of_torch(x)
    w = layer.weight
    want = torch.ops.aten._weight_int8pack_mm(x[0], w.qdata, w.scale.reshape(-1)) + layer.bias  # torch's kernel
    assert got.dtype == SERVING_DTYPE and got.shape == (1, 1, layer.out_features)
    torch.testing.assert_close(got[0].float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item())
