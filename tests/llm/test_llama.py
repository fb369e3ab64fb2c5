import copy

import pytest
import torch

from ibllm.config import LlamaConfig
from ibllm.llm.llama import OFFICIAL_KEYS, Transformer
from tests.tiny_llama import TINY, injection_for, tiny, tokens


def expected_keys(cfg: LlamaConfig) -> set[str]:
    keys = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        keys |= {p + "attention_norm.weight", p + "ffn_norm.weight", p + "attention.gate"}
        keys |= {f"{p}attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")}
        keys |= {f"{p}feed_forward.{w}.weight" for w in ("w1", "w2", "w3")}
        if cfg.w_bias:
            keys |= {p + "attention.wq.bias", p + "attention.wo.bias"}
            keys |= {f"{p}feed_forward.{w}.bias" for w in ("w1", "w2", "w3")}
        if cfg.w_lora:
            keys |= {f"{p}attention.lora_{w}_{part}.weight" for w in ("wq", "wk", "wv", "wo") for part in ("l1", "l2")}
            keys |= {f"{p}feed_forward.lora_{w}_{part}.weight" for w in ("w1", "w2", "w3") for part in ("l1", "l2")}
    return keys


@pytest.mark.parametrize("w_bias,w_lora", [(True, True), (False, False), (True, False), (False, True)])
def test_state_dict_is_the_official_layout(w_bias, w_lora):
    cfg = LlamaConfig(**{**TINY.__dict__, "w_bias": w_bias, "w_lora": w_lora})
    model = Transformer(cfg)
    model.setup_cache()
    state = {OFFICIAL_KEYS.to_official(k): v for k, v in model.state_dict().items()}
    assert set(state) == expected_keys(cfg)  # no KV cache, no rotary table; only the gate is renamed
    assert sum(k != OFFICIAL_KEYS.to_official(k) for k in model.state_dict()) == cfg.n_layers
    assert state["layers.0.attention.gate"].shape == (1, cfg.n_heads, 1, 1)
    if w_lora:
        assert state["layers.1.feed_forward.lora_w2_l1.weight"].shape == (cfg.lora_rank, cfg.ffn_hidden_dim)
        assert state["layers.1.feed_forward.lora_w2_l2.weight"].shape == (cfg.dim, cfg.lora_rank)


@pytest.mark.parametrize("w_bias,w_lora", [(True, True), (False, False)])
def test_kv_cache_steps_equal_full_prefill(w_bias, w_lora):
    cfg = LlamaConfig(**{**TINY.__dict__, "w_bias": w_bias, "w_lora": w_lora})
    model = tiny(cfg)
    x = tokens(2, 12, cfg.vocab_size)
    inj = injection_for(model, 2)
    full = model(x, 0, inj, use_cache=False)  # (B, T, V), no cache at all
    model.setup_cache()
    prefill = model(x[:, :5], 0, inj)
    torch.testing.assert_close(prefill, full[:, :5], atol=1e-5, rtol=0)
    for p in range(5, 12):
        step = model(x[:, p:p + 1], p, inj, last_only=True)
        torch.testing.assert_close(step, full[:, p], atol=1e-5, rtol=0)


def test_chunk_after_cached_prefix_uses_shifted_causal_mask():
    model = tiny()
    x = tokens(1, 10)
    full = model(x, 0, None, use_cache=False)
    model.setup_cache()
    model(x[:, :4], 0)
    chunk = model(x[:, 4:10], 4)  # 6 new tokens after 4 cached ones
    torch.testing.assert_close(chunk, full[:, 4:], atol=1e-5, rtol=0)


def test_batch_rows_are_independent():
    model = tiny()
    x = tokens(2, 9)
    inj = injection_for(model, 2)
    both = model(x, 0, inj, use_cache=False)
    for b in range(2):
        alone = model(x[b:b + 1], 0, inj[:, b:b + 1], use_cache=False)
        torch.testing.assert_close(alone[0], both[b], atol=1e-5, rtol=0)


def test_merge_lora_same_logits_fewer_modules():
    model = tiny()
    merged = copy.deepcopy(model)
    merged.merge_lora()
    assert merged.lora_merged and not model.lora_merged
    keys = set(merged.state_dict())
    assert not any(".lora_" in k and "lora_wv_" not in k for k in keys)  # wv keeps its LoRA for the injection
    assert sum(p.numel() for p in merged.parameters()) < sum(p.numel() for p in model.parameters())
    assert_same_outputs(merged, model)


def assert_same_outputs(rewritten: Transformer, model: Transformer) -> None:
    """Same logits and the same visual injection as the model it was rewritten from (merged or fused)."""
    x = tokens(2, 11)
    inj = injection_for(model, 2)
    torch.testing.assert_close(rewritten(x, 0, inj, use_cache=False), model(x, 0, inj, use_cache=False),
                               atol=1e-5, rtol=0)
    adapters = torch.randn(2, 2, 1, 48)
    torch.testing.assert_close(rewritten.visual_injection(adapters), model.visual_injection(adapters))


def test_fused_projections_same_logits_and_injection():
    model = tiny()
    fused = copy.deepcopy(model)
    fused.merge_lora()
    fused.fuse_projections()
    attn = fused.layers[1].attention
    assert attn.wq is None and fused.layers[1].feed_forward.w1 is None
    assert attn.wv.weight.data_ptr() == attn.wqkv.weight[2 * 48:].data_ptr()  # wv is a view: no extra memory
    assert_same_outputs(fused, model)
    with pytest.raises(ValueError, match="merge the LoRA"):
        tiny().fuse_projections()


def test_injection_is_gated_base_wv_per_head():
    model = tiny()
    adapters = torch.randn(2, 1, 1, 48)
    inj = model.visual_injection(adapters)
    assert inj.shape == (2, 1, 3, 1, 16)
    attn = model.layers[1].attention  # query_layer 2 of 3 layers: adapters[0] goes to layer 1
    base_v = adapters[0, 0, 0] @ attn.wv.weight.T  # base wv: no LoRA, no bias, no norm, no RoPE
    want = torch.tanh(attn.gate.scale.view(3, 1)) * base_v.view(3, 16)
    torch.testing.assert_close(inj[0, 0, :, 0], want)


def test_injection_reaches_only_the_last_query_layers():
    model = tiny()
    x = tokens(1, 6)
    inj = injection_for(model, 1)
    with_inj = model(x, 0, inj, use_cache=False)
    with torch.no_grad():
        model.layers[0].attention.gate.scale.fill_(5.0)  # layer 0 is not a query layer: its gate must not matter
    torch.testing.assert_close(model(x, 0, inj, use_cache=False), with_inj)
    assert (model(x, 0, None, use_cache=False) - with_inj).abs().max() > 1e-3  # ...but the injection does
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.gate.scale.zero_()
    zero_gate = model.visual_injection(torch.randn(2, 1, 1, 48))
    torch.testing.assert_close(model(x, 0, zero_gate, use_cache=False), model(x, 0, None, use_cache=False))


def test_build_on_meta_then_load_with_assign():
    ref = tiny()
    with torch.device("meta"):
        model = Transformer(TINY, 2)
    model.load_state_dict(ref.state_dict(), assign=True)
    x = tokens(2, 7)
    model.setup_cache()
    torch.testing.assert_close(model(x, 0, last_only=True), ref(x, 0, use_cache=False)[:, -1])


def test_cache_bounds_are_checked():
    model = tiny()
    model.setup_cache(1, 8)
    with pytest.raises(ValueError, match="exceed the KV cache"):
        model(tokens(1, 9), 0)
    with pytest.raises(ValueError, match="exceed the KV cache"):
        model(tokens(2, 2), 0)


def test_dtype_casts_keep_a_float32_rotary_table():
    model = tiny()
    x = tokens(1, 6)
    want = model(x, 0, use_cache=False)
    model.to(torch.float64)  # a cast of the whole module must not touch the rotary table
    got = model(x.clone(), 0, use_cache=False)
    assert model.rope.dtype == torch.float32 and "rope" not in model.state_dict()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
