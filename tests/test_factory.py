"""The real loading path (Meta LLaMA folder + adapter .pth + encoder .pth + knn.index) on parity-a's tiny weights
written in the official file layouts, checked against the reference's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import pytest
import torch

from ibllm.checkpoint import CheckpointError
from ibllm.config import GenerationConfig
from ibllm.factory import load_official
from ibllm.llm.generate import generate_tokens
from ibllm.parity import Fixture
from tests.conftest import REPO

TOY_TOKENIZER = REPO / "assets" / "toy" / "tokenizer.model"
# What the released adapter (7B.pth) carries besides the bind network and prefix queries: everything tuned.
TUNED = ("bias", "lora_", "attention.gate", "_norm.weight")


def write_official_files(fx: Fixture, root: Path, *, adapter_extra: dict | None = None,
                         drop_from_adapter: str | None = None) -> dict[str, Path]:
    state = fx.state_dict
    cfg = fx.config.llama
    llama_dir = root / "7B"
    llama_dir.mkdir(parents=True)
    (llama_dir / "params.json").write_text(json.dumps({
        "dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "multiple_of": cfg.multiple_of,
        "norm_eps": cfg.norm_eps, "vocab_size": cfg.vocab_size}))
    base = {k[len("llama."):]: v for k, v in state.items()
            if k.startswith("llama.") and not any(t in k for t in TUNED)}
    base["rope.freqs"] = torch.zeros(cfg.head_dim // 2)  # Meta's files carry it; it must be ignored
    torch.save(base, llama_dir / "consolidated.00.pth")
    (root / "tokenizer.model").write_bytes(TOY_TOKENIZER.read_bytes())
    adapter = {k: v for k, v in state.items() if not k.startswith("image_bind.")
               and not (k.startswith("llama.") and not any(t in k for t in TUNED))}
    if drop_from_adapter:
        adapter.pop(drop_from_adapter)
    adapter.update(adapter_extra or {})
    torch.save({"model": adapter}, root / "7B.pth")
    torch.save({k: v for k, v in state.items() if k.startswith("image_bind.")}, root / "imagebind_w3D.pth")
    index = faiss.IndexFlatIP(fx.knn_vectors.shape[1])
    index.add(fx.knn_vectors.numpy())
    faiss.write_index(index, str(root / "knn.index"))
    return {"llama_dir": llama_dir, "adapter": root / "7B.pth", "imagebind": root / "imagebind_w3D.pth",
            "knn_index": root / "knn.index"}


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
