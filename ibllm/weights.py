"""Finding, downloading, checking and converting the official ImageBind-LLM weights.

The official files are used as they are (REFERENCE.md section 5):

| part | file | where |
|---|---|---|
| adapter (bind network, gates, biases, LoRA, norms, prefix) | ``7B.pth`` (``7B-beta.pth``) | ``Cxxs/ImageBind-LLM`` |
| encoders (ImageBind-Huge + Point-Bind) | ``imagebind_w3D.pth`` | HF ``ZiyuG/ImageBind_w3D`` |
| visual cache (CC3M image embeddings) | ``knn.index`` | HF ``csuhan/knn`` |
| frozen base LLaMA | ``params.json``, ``consolidated.*.pth``, ``tokenizer.model`` | Meta (licence), or 7B_chinese |

The stable ``7B.pth`` was trained on ``7B_chinese = fp16(llama + delta)`` (delta: HF ``Cxxs/Open-Chinese-LLaMA``);
``merge_chinese_delta`` builds it and leaves a marker file so ``doctor`` can tell which base is in use.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download

from ibllm.checkpoint import CheckpointError, read_state_dict
from ibllm.config import LlamaConfig

MERGED_MARKER = "ibllm_7B_chinese.json"


@dataclass(frozen=True)
class HubFile:
    repo: str
    filename: str

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo}/blob/main/{self.filename}"


HUB_FILES: dict[str, HubFile] = {
    "adapter": HubFile("Cxxs/ImageBind-LLM", "7B.pth"),
    "adapter-beta": HubFile("Cxxs/ImageBind-LLM", "7B-beta.pth"),
    "adapter-pretrained": HubFile("Cxxs/ImageBind-LLM", "7B-pretrained.pth"),
    "imagebind": HubFile("ZiyuG/ImageBind_w3D", "imagebind_w3D.pth"),
    "knn": HubFile("csuhan/knn", "knn.index"),
}


class WeightsError(CheckpointError):
    """A weights file is missing or wrong; the message says which and where to get it."""


def resolve(part: str, local: str | os.PathLike | None, *, offline: bool | None = None) -> Path:
    """Path to a weights file: the local one if given, else the Hugging Face hub cache (downloading if allowed).

    Downloads are cached and resumable (huggingface_hub). Offline (``HF_HUB_OFFLINE=1`` or ``offline=True``) only
    the cache is consulted, and a missing file is an error that names it and says where to get it.
    """
    hub = HUB_FILES[part]
    if local is not None:
        path = Path(local).expanduser()
        if not path.is_file():
            raise WeightsError(f"{part}: {path} does not exist. Download {hub.filename} from {hub.url}.")
        return path
    if offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    try:
        return Path(hf_hub_download(hub.repo, hub.filename, local_files_only=offline))
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one readable message
        how = "is not in the local cache (offline)" if offline else f"could not be downloaded ({type(exc).__name__})"
        raise WeightsError(
            f"{part}: {hub.filename} {how}. Download it from {hub.url} and pass its path, "
            f"or run with network access to fetch it into the Hugging Face cache."
        ) from exc


# ----------------------------------------------------------------------------------------------------------
# Meta's LLaMA layout


@dataclass
class MetaLlama:
    """A Meta-format LLaMA directory: ``params.json``, ``consolidated.NN.pth`` shards, ``tokenizer.model``."""

    root: Path
    params: dict = field(default_factory=dict)
    shards: list[Path] = field(default_factory=list)
    tokenizer: Path | None = None

    @classmethod
    def find(cls, root: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> MetaLlama:
        root = Path(root).expanduser()
        if not (root / "params.json").is_file():
            raise WeightsError(f"{root}: no params.json; expected Meta's LLaMA layout (params.json, "
                               "consolidated.00.pth) — e.g. the 7B/ folder of the LLaMA download")
        shards = sorted(root.glob("consolidated.*.pth"))
        if not shards:
            raise WeightsError(f"{root}: no consolidated.*.pth shards")
        tok = Path(tokenizer) if tokenizer else next(
            (p for p in (root / "tokenizer.model", root.parent / "tokenizer.model") if p.is_file()), None)
        return cls(root=root, params=json.loads((root / "params.json").read_text()), shards=shards, tokenizer=tok)

    def config(self, base: LlamaConfig | None = None, vocab_size: int | None = None) -> LlamaConfig:
        """LlamaConfig from params.json (Meta writes vocab_size -1: it comes from the tokenizer)."""
        base = base or LlamaConfig()
        p = self.params
        vocab = p.get("vocab_size", -1)
        if vocab is None or vocab <= 0:
            vocab = vocab_size or base.vocab_size

        return replace(base, dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"], vocab_size=vocab,
                       multiple_of=p.get("multiple_of", base.multiple_of), norm_eps=p.get("norm_eps", base.norm_eps),
                       rope_theta=p.get("rope_theta", base.rope_theta))

    @property
    def is_chinese_merge(self) -> bool:
        return (self.root / MERGED_MARKER).is_file()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The base weights with Meta's key names (``layers.0.attention.wq.weight`` ...), shards merged."""
        states = [read_state_dict(p) for p in self.shards]
        state = states[0] if len(states) == 1 else merge_shards(states)
        return {k: v for k, v in state.items() if not k.startswith("rope.")}


# Model-parallel shards split column-parallel weights on dim 0 and row-parallel ones on dim 1.
_SHARD_DIM1 = ("tok_embeddings.weight", "attention.wo.weight", "feed_forward.w2.weight")


def merge_shards(states: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    for key, first in states[0].items():
        parts = [s[key] for s in states]
        if first.dim() < 2:
            merged[key] = first  # norms and rope tables are replicated
        else:
            merged[key] = torch.cat(parts, dim=1 if key.endswith(_SHARD_DIM1) else 0)
    return merged


def merge_chinese_delta(llama_dir: str | os.PathLike, delta_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write 7B_chinese = fp16(llama + delta) per tensor (rope keys skipped), Meta layout, with a marker file."""
    base = MetaLlama.find(llama_dir)
    delta = MetaLlama.find(delta_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    a, b = base.state_dict(), delta.state_dict()
    if set(a) != set(b):
        raise WeightsError(f"delta does not match LLaMA: keys only in LLaMA {sorted(set(a) - set(b))[:5]}, "
                           f"only in delta {sorted(set(b) - set(a))[:5]}")
    merged = {k: (a[k].float() + b[k].float()).half() for k in a}
    torch.save(merged, out / "consolidated.00.pth")
    (out / "params.json").write_text(json.dumps(base.params))
    if base.tokenizer:
        (out / "tokenizer.model").write_bytes(base.tokenizer.read_bytes())
    (out / MERGED_MARKER).write_text(json.dumps({"llama": str(base.root), "delta": str(delta.root)}))
    return out
