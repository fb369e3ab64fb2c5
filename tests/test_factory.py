"""The real loading path (Meta LLaMA folder + adapter .pth + encoder .pth + knn.index) on parity-a's tiny weights
written in the official file layouts, checked against the reference's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ibllm.checkpoint import CheckpointError
from ibllm.config import GenerationConfig
from ibllm.factory import load_official
from ibllm.llm.generate import generate_tokens
from ibllm.parity import Fixture
from ibllm.ui.blocks import model_markdown
from tests.official_layout import write_official_files


def _load(fx: Fixture, files: dict[str, Path], **kwargs):
    return load_official(files["llama_dir"], adapter=files["adapter"], imagebind=files["imagebind"],
                         knn_index=files["knn_index"], imagebind_config=fx.config.imagebind,
                         max_seq_len=fx.config.llama.max_seq_len, device="cpu", dtype="float32", **kwargs)


@pytest.fixture(scope="module")
def fixture(parity_dir) -> Fixture:
    return Fixture(parity_dir)


@pytest.mark.parametrize("merge_lora", [False, True])
def test_official_layout_reproduces_reference(fixture, tmp_path, merge_lora):
    files = write_official_files(fixture, tmp_path)
    model = _load(fixture, files, merge_lora=merge_lora)
    exp = fixture.expected
    with torch.no_grad():
        emb = model.net.image_bind("vision", fixture.inputs["vision"])
        torch.testing.assert_close(emb, exp["emb.vision"], atol=1e-4, rtol=0)
        # The cache mix on the reference's fused feature (sample 0), then greedy generation as generate() did.
        mixed, neighbours = model._retrieve(exp["mix1.knn.fused_before_knn"][:1], fixture.config.visual_cache)
        torch.testing.assert_close(mixed, exp["mix1.knn.fused_after_knn"][:1], atol=1e-5, rtol=0)
        assert [n.index for n in neighbours] == exp["mix1.knn.idx"][0].tolist()
        prompt = fixture.raw_config["generation"]["single_knn"]["prompts"][0]
        tokens = list(generate_tokens(model.net.llama, prompt, model.net.injection(mixed), GenerationConfig.greedy(10),
                                      eos_id=2))
    expected_ids = json.loads((fixture.root / "run_info.json").read_text())["generation_decoded_token_ids"]
    assert tokens == expected_ids["single_knn"][0]
    assert model.info.cache_entries == fixture.knn_vectors.shape[0]
    assert model.info.memory == "serving in float32 on the CPU: as asked (--dtype)"
    assert model.info.memory in model_markdown(model.info)  # the Model tab says which dtype and why


def test_unexpected_adapter_key_is_named(fixture, tmp_path):
    files = write_official_files(fixture, tmp_path, adapter_extra={"llama.layers.0.attention.wz.weight":
                                                                   torch.zeros(1)})
    with pytest.raises(CheckpointError, match="llama.layers.0.attention.wz.weight"):
        _load(fixture, files)


def test_missing_adapter_key_is_named(fixture, tmp_path):
    files = write_official_files(fixture, tmp_path, drop_from_adapter="image_bind_f2_3.weight")
    with pytest.raises(CheckpointError, match="image_bind_f2_3.weight"):
        _load(fixture, files)


def test_missing_file_says_where_to_get_it(fixture, tmp_path):
    files = write_official_files(fixture, tmp_path)
    (tmp_path / "7B.pth").unlink()
    with pytest.raises(CheckpointError, match="huggingface.co/Cxxs/ImageBind-LLM"):
        _load(fixture, files)
