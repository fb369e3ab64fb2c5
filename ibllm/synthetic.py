"""Random weights written in the exact official file layouts, for the memory test and ``bench/fullsize.py``.

The files are what a user downloads, with random values: Meta's LLaMA folder (``params.json``,
``consolidated.00.pth`` in float16, ``tokenizer.model`` copied from a given file), the ImageBind-LLM adapter
(``7B.pth``: ``{"model": {...}}`` with the bind network, prefix queries, gates, LoRA, biases and norms) and the
encoders (``imagebind_w3D.pth``), both in float32. Values are scaled so that random activations stay finite in
half precision (norms 1, biases and gates 0, matrices N(0, 1/fan_in)).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from ibllm.config import AdapterConfig, ImageBindConfig, LlamaConfig, ModelConfig
from ibllm.model import ImageBindLLM

# What the released adapter carries of LLaMA besides the new parts: everything fine-tuned.
TUNED = ("bias", "lora_", "attention.gate", "_norm.weight")


def _random_like(key: str, shape: torch.Size, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.int64)
    if len(shape) <= 1 and key.endswith((".weight", "running_var")) or key.endswith("log_logit_scale"):
        return torch.ones(shape, dtype=dtype)
    if key.endswith(("bias", "running_mean", ".gate")) or "_l2." in key:
        return torch.zeros(shape, dtype=dtype)
    out = torch.empty(shape, dtype=dtype)
    flat, std = out.view(-1), 1.0 / math.sqrt(shape[-1] if len(shape) > 1 else 1)
    for i in range(0, flat.numel(), 1 << 24):  # in chunks: a 131M-element embedding never needs a float32 copy
        part = flat[i:i + (1 << 24)]
        part.copy_(torch.randn(part.numel(), generator=gen) * std)
    return out


def _is_encoder(key: str) -> bool:
    return key.startswith("image_bind.")


def _is_base(key: str) -> bool:
    return key.startswith("llama.") and not any(t in key for t in TUNED)


def _is_adapter(key: str) -> bool:
    return not _is_encoder(key) and not _is_base(key)


def write_official_layout(root: str | Path, llama: LlamaConfig, imagebind: ImageBindConfig, tokenizer: str | Path,
                          *, bridge_hidden: int | None = None, seed: int = 0,
                          dtype: torch.dtype = torch.float16) -> dict[str, Path]:
    """Write the three official files for a model of these sizes; returns the paths ``load_official`` takes."""
    root = Path(root)
    cfg = ModelConfig(name="synthetic", imagebind=imagebind, llama=llama,
                      adapter=AdapterConfig(query_layer=llama.n_layers, bridge_hidden=bridge_hidden or 4 * llama.dim))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ImageBindLLM(cfg).to_official().items()}
    gen = torch.Generator().manual_seed(seed)

    def group(keep) -> dict[str, torch.Tensor]:
        return {k: _random_like(k, shape, dtype if keep is _is_base else torch.float32, gen)
                for k, shape in shapes.items() if keep(k)}

    llama_dir = root / "LLaMA" / "7B"
    llama_dir.mkdir(parents=True, exist_ok=True)
    (llama_dir / "params.json").write_text(json.dumps({
        "dim": llama.dim, "n_layers": llama.n_layers, "n_heads": llama.n_heads, "multiple_of": llama.multiple_of,
        "norm_eps": llama.norm_eps, "vocab_size": llama.vocab_size}))
    shutil.copyfile(tokenizer, root / "LLaMA" / "tokenizer.model")
    # One file at a time, so writing 7B needs the memory of its largest file only. As released: Meta's LLaMA in
    # float16, the adapter and the encoders in float32.
    base = {k.removeprefix("llama."): v for k, v in group(_is_base).items()}
    base["rope.freqs"] = torch.zeros(llama.head_dim // 2, dtype=dtype)  # Meta's files carry it
    torch.save(base, llama_dir / "consolidated.00.pth")
    del base
    torch.save({"model": group(_is_adapter)}, root / "7B.pth")
    torch.save(group(_is_encoder), root / "imagebind_w3D.pth")
    return {"llama_dir": llama_dir, "adapter": root / "7B.pth", "imagebind": root / "imagebind_w3D.pth"}


__all__ = ["write_official_layout", "TUNED"]
