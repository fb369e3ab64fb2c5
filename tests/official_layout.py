"""Writing a parity fixture's tiny weights in the official file layouts (Meta LLaMA folder, 7B.pth,
imagebind_w3D.pth, knn.index), for the tests of the real loading code and the commands that use it."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import faiss
import torch

from ibllm.llm.tokenizer import Tokenizer
from ibllm.parity import Fixture
from ibllm.synthetic import TUNED
from ibllm.train.tokenizer import train_tokenizer
from tests.conftest import REPO

TOY_TOKENIZER = REPO / "assets" / "toy" / "tokenizer.model"
_TOKENIZERS: dict[int, bytes] = {}


def tokenizer_bytes(vocab_size: int) -> bytes:
    """A toy-world SentencePiece model with at most ``vocab_size`` pieces (the fixture's LLaMA has fewer rows than
    the shipped tokenizer has pieces, and an id past its embedding table would index out of range)."""
    if Tokenizer(TOY_TOKENIZER).vocab_size <= vocab_size:
        return TOY_TOKENIZER.read_bytes()
    if vocab_size not in _TOKENIZERS:
        with tempfile.TemporaryDirectory() as tmp:
            path = train_tokenizer(Path(tmp) / "tokenizer.model", vocab_size=vocab_size, n_scenes=400)
            _TOKENIZERS[vocab_size] = path.read_bytes()
    return _TOKENIZERS[vocab_size]


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
    (root / "tokenizer.model").write_bytes(tokenizer_bytes(cfg.vocab_size))
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
