import copy

import pytest
import torch

from ibllm.llm.lora import (
    KEY_TABLE,
    from_peft,
    mark_stage2_trainable,
    official_state_dict,
    official_to_peft_key,
    peft_to_official_key,
    to_peft,
)
from tests.tiny_llama import injection_for, tiny, tokens

pytest.importorskip("peft")


def test_key_table_both_directions():
    pairs = {
        "layers.3.attention.lora_wq_l1.weight": "layers.3.attention.wq.lora_A.default.weight",
        "layers.3.attention.lora_wo_l2.weight": "layers.3.attention.wo.lora_B.default.weight",
        "layers.0.feed_forward.lora_w2_l1.weight": "layers.0.feed_forward.w2.lora_A.default.weight",
        "layers.0.feed_forward.w3.bias": "layers.0.feed_forward.w3.base_layer.bias",
        "layers.1.attention.wk.weight": "layers.1.attention.wk.base_layer.weight",
        "layers.1.attention.gate": "layers.1.attention.gate",
        "layers.1.ffn_norm.weight": "layers.1.ffn_norm.weight",
        "tok_embeddings.weight": "tok_embeddings.weight",
    }
    for official, peft in pairs.items():
        assert official_to_peft_key(official) == peft
        assert peft_to_official_key(peft) == official
        assert peft_to_official_key("base_model.model." + peft) == official
    assert official_to_peft_key("layers.0.attention.lora_w1_l1.weight") == "layers.0.attention.lora_w1_l1.weight"
    assert len(KEY_TABLE) == 4


def test_official_peft_official_round_trip_is_exact():
    model = tiny()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = to_peft(model)
    back = official_state_dict(peft_model)
    assert set(back) == set(original)
    for k, v in original.items():
        assert torch.equal(back[k], v), k
    native = from_peft(peft_model)
    restored = native.state_dict()
    assert set(restored) == set(original)
    for k, v in original.items():
        assert torch.equal(restored[k], v), k


def test_peft_forward_equals_native_forward():
    model = tiny()
    native = copy.deepcopy(model)
    peft_model = to_peft(model)
    x = tokens(2, 9)
    inj = injection_for(native, 2)
    want = native(x, 0, inj, use_cache=False)
    got = peft_model(x, 0, inj, use_cache=False)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # the injection goes through the base wv, not peft's LoRA-wrapped one
    adapters = torch.randn(2, 2, 1, 48)
    torch.testing.assert_close(peft_model.visual_injection(adapters), native.visual_injection(adapters))


def test_trained_peft_weights_come_back_under_official_names():
    peft_model = to_peft(tiny())
    mark_stage2_trainable(peft_model)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any(n.endswith("norm.weight") for n in trainable)
    assert not any("gate" in n or "tok_embeddings" in n or n.endswith("wk.base_layer.weight") for n in trainable)
    x = tokens(2, 6)
    loss = peft_model(x, 0, None, use_cache=False).logsumexp(-1).mean()
    loss.backward()
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(p.grad, alpha=-0.1)
    lora_b = peft_model.get_base_model().layers[1].attention.wo.lora_B["default"].weight.detach().clone()
    native = from_peft(peft_model)
    assert torch.equal(native.state_dict()["layers.1.attention.lora_wo_l2.weight"], lora_b)


def test_merged_or_lora_free_models_are_refused():
    from ibllm.config import LlamaConfig
    from tests.tiny_llama import TINY

    merged = tiny()
    merged.merge_lora()
    with pytest.raises(ValueError, match="merged"):
        to_peft(merged)
    with pytest.raises(ValueError, match="no LoRA"):
        to_peft(tiny(LlamaConfig(**{**TINY.__dict__, "w_lora": False})))
    with pytest.raises(ValueError, match="from_peft"):
        to_peft(tiny()).merge_lora()
