import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ibllm.bind import (
    BindNetwork,
    PrefixQuery,
    bind_key_table,
    fuse,
    is_legacy_bridge,
)
from ibllm.checkpoint import CheckpointError, KeyTable, load_strict


def test_fuse_matches_numpy():
    rng = np.random.default_rng(0)
    embs = [rng.normal(size=(2, 8)).astype(np.float32) * s for s in (1.0, 3.0, 0.2)]
    weights = [1.0, 0.5, 0.25]
    want = sum(e / np.linalg.norm(e, axis=1, keepdims=True) * (w / (sum(weights) + 1e-6))
               for e, w in zip(embs, weights, strict=True))
    got = fuse([torch.from_numpy(e) for e in embs], weights)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
    assert not torch.allclose(got.norm(dim=-1), torch.ones(2))  # not re-normalised


def test_fuse_weight_zero_drops_an_input():
    a, b = torch.randn(2, 8), torch.randn(2, 8)
    torch.testing.assert_close(fuse([a, b], [0.7, 0.0]), fuse([a], [0.7]))
    with pytest.raises(ValueError, match="weight 0"):
        fuse([a, b], [0.0, 0.0])
    with pytest.raises(ValueError, match=">= 0"):
        fuse([a, b], [1.0, -1.0])
    with pytest.raises(ValueError, match="finite"):
        fuse([a, b], [1.0, float("nan")])


@pytest.mark.parametrize("legacy", [False, True])
def test_bind_network_math(legacy):
    torch.manual_seed(0)
    net = BindNetwork(8, 12, 20, legacy=legacy)
    for p in net.parameters():
        p.data.normal_(0, 0.3)
    v = torch.randn(3, 8)
    stages = net.stages(v)
    assert len(stages) == 4 and stages[-1].shape == (3, 1, 12)
    x = v.unsqueeze(1) @ net.proj.weight.T + net.proj.bias
    for block in net.blocks:
        if legacy:
            n = F.layer_norm(x, (12,), block.norm.weight, block.norm.bias, eps=1e-5)
        else:
            n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * block.norm.weight
        x = x + block.f2(F.silu(block.f1(n)) * block.f3(n))
    torch.testing.assert_close(stages[-1], x)
    torch.testing.assert_close(net(v), x)


@pytest.mark.parametrize("legacy", [False, True])
def test_official_key_table_round_trip(legacy):
    net = BindNetwork(8, 12, 20, legacy=legacy)
    table = bind_key_table(legacy=legacy)
    assert set(table.values()) == set(net.state_dict())  # every module tensor has exactly one official name
    assert "image_bind_f2_3.weight" in table and "image_bind_norm_1.weight" in table
    assert ("image_bind_f1_1.bias" in table) is legacy
    keys = KeyTable(table.items())
    official = {keys.to_official(k): v for k, v in net.state_dict().items()}
    assert is_legacy_bridge(official) is legacy
    fresh = BindNetwork(8, 12, 20, legacy=legacy)
    load_strict(fresh, official, "bind", table=keys)
    for k, v in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_missing_official_key_is_an_error():
    keys = KeyTable(bind_key_table().items())
    official = {keys.to_official(k): v for k, v in BindNetwork(8, 12, 20).state_dict().items()}
    del official["image_bind_f3_2.weight"]
    with pytest.raises(CheckpointError, match="missing keys: \\['image_bind_f3_2.weight'\\]"):
        load_strict(BindNetwork(8, 12, 20), official, "bind", table=keys)


def test_prefix_query_gives_one_adapter_per_layer():
    prefix = PrefixQuery(4, 6)
    vq = torch.randn(2, 1, 6)
    adapters = prefix(vq)
    assert adapters.shape == (4, 2, 1, 6)
    torch.testing.assert_close(adapters[3, 1, 0], prefix.weight[3] + vq[1, 0])
    assert list(prefix.state_dict()) == ["weight"]  # attribute "prefix_query" -> official "prefix_query.weight"
