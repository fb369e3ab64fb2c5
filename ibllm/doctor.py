"""``python -m ibllm doctor``: check an official-weights setup without loading it into memory.

Each check prints ``ok``, ``warn`` or ``FAIL`` with what to do; the exit status is non-zero when one fails.
Shapes are read from memory-mapped files and compared with a model built on the meta device (no RAM).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ibllm.cache import VisualCache
from ibllm.checkpoint import CheckpointError, read_state_dict
from ibllm.config import IMAGEBIND_HUGE, ImageBindConfig
from ibllm.encoders import ImageBind
from ibllm.encoders.loading import official_key
from ibllm.factory import config_from_adapter, pick_device
from ibllm.llm.tokenizer import Tokenizer
from ibllm.memory import plan_memory
from ibllm.model import ImageBindLLM
from ibllm.weights import HUB_FILES, MetaLlama, WeightsError, resolve


@dataclass
class Check:
    level: str  # "ok", "warn", "FAIL"
    what: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.level:<4} {self.what}" + (f": {self.detail}" if self.detail else "")


def _shape_problems(expected: dict[str, torch.Size], found: dict[str, torch.Tensor], limit: int = 5) -> list[str]:
    problems = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k])}" for k, v in found.items()
                if k in expected and tuple(v.shape) != tuple(expected[k])]
    return problems[:limit]


def run_checks(llama_dir: str | None, adapter: str | None, imagebind: str | None, knn_index: str | None,
               tokenizer: str | None = None, imagebind_config: ImageBindConfig = IMAGEBIND_HUGE, *,
               device: str | None = None, dtype: str | None = None, quantize: str | None = None,
               max_seq_len: int = 512) -> Iterator[Check]:
    meta = None
    if not llama_dir:
        yield Check("FAIL", "base LLaMA", "pass --llama-dir (Meta's 7B folder: params.json, consolidated.00.pth)")
    else:
        try:
            meta = MetaLlama.find(llama_dir, tokenizer)
            yield Check("ok", "base LLaMA", f"{meta.root} ({len(meta.shards)} shard(s))")
        except WeightsError as exc:
            yield Check("FAIL", "base LLaMA", str(exc))
    tok = None
    if meta is not None:
        if meta.tokenizer is None:
            yield Check("FAIL", "tokenizer", f"no tokenizer.model in {meta.root} or its parent: pass --tokenizer")
        else:
            tok = Tokenizer(meta.tokenizer)
            yield Check("ok", "tokenizer", f"{meta.tokenizer} ({tok.vocab_size} pieces)")

    adapter_state = imagebind_state = None
    try:
        path = resolve("adapter", adapter, offline=True)
        adapter_state = read_state_dict(path)
        yield Check("ok", "adapter", f"{path} ({len(adapter_state)} tensors)")
    except (WeightsError, CheckpointError) as exc:
        yield Check("FAIL", "adapter", str(exc))

    if meta is not None and adapter_state is not None:
        base = meta.config(vocab_size=tok.vocab_size if tok else None)
        try:
            cfg = config_from_adapter(adapter_state, base, imagebind_config)
            with torch.device("meta"):
                net = ImageBindLLM(cfg)
            expected = {k: v.shape for k, v in net.to_official().items()}
            base_state = {f"llama.{k}": v for k, v in meta.state_dict().items()}
            unexpected = sorted(k for k in adapter_state if k not in expected)
            missing = sorted(k for k in expected if not k.startswith("image_bind.")
                             and k not in adapter_state and k not in base_state)
            shapes = _shape_problems(expected, {**base_state, **adapter_state})
            if unexpected or missing or shapes:
                yield Check("FAIL", "adapter + LLaMA fit the model",
                            f"unexpected {unexpected[:5]} missing {missing[:5]} shapes {shapes}")
            else:
                yield Check("ok", "adapter + LLaMA fit the model",
                            f"dim {cfg.llama.dim}, {cfg.llama.n_layers} layers, LoRA rank {cfg.llama.lora_rank}, "
                            f"{'beta (LayerNorm) ' if cfg.adapter.legacy_bridge else ''}bind network")
            if not meta.is_chinese_merge and not cfg.adapter.legacy_bridge:
                yield Check("warn", "base LLaMA version",
                            "the stable 7B.pth was trained on 7B_chinese = LLaMA-7B + the Open-Chinese-LLaMA delta "
                            "(huggingface.co/Cxxs/Open-Chinese-LLaMA); plain LLaMA-7B under it gives poor answers. "
                            "Build it with: python -m ibllm merge-chinese --llama-dir D --delta-dir D2 --out D3")
        except CheckpointError as exc:
            yield Check("FAIL", "adapter + LLaMA fit the model", str(exc))

    try:
        path = resolve("imagebind", imagebind, offline=True)
        imagebind_state = read_state_dict(path)
        state = {official_key(k): v for k, v in imagebind_state.items()}
        with torch.device("meta"):
            encoders = ImageBind(imagebind_config)
        expected = {k: v.shape for k, v in encoders.state_dict().items()}
        unexpected = sorted(set(state) - set(expected))
        missing = sorted(set(expected) - set(state))
        shapes = _shape_problems(expected, state)
        if unexpected or missing or shapes:
            hint = " (imagebind_huge.pth has no 3D branch: use imagebind_w3D.pth)" if all(
                k.startswith(("point_trunk.", "modality_heads.point", "modality_postprocessors.point"))
                for k in missing) and missing else ""
            yield Check("FAIL", "encoders", f"{path}: unexpected {unexpected[:5]} missing {missing[:5]}{hint} "
                        f"shapes {shapes}")
        else:
            yield Check("ok", "encoders", f"{path} ({len(state)} tensors, all modalities incl. 3D)")
    except (WeightsError, CheckpointError) as exc:
        yield Check("FAIL", "encoders", str(exc))

    if meta is not None and adapter_state is not None and imagebind_state is not None:
        base_state = {k: v for k, v in meta.state_dict().items() if f"llama.{k}" not in adapter_state}
        params = meta.config()
        plan = plan_memory([base_state, adapter_state, imagebind_state], pick_device(device), requested=dtype,
                           quantize=quantize, merge_lora=True,
                           kv_cache=(params.n_layers, params.dim, max_seq_len, 1))
        yield Check("ok" if plan.dtype is not None else "FAIL", "memory plan", "; ".join(
            line.removeprefix("memory: ") for line in plan.lines()))

    try:
        cache = VisualCache.load(resolve("knn", knn_index, offline=True))
        level = "ok" if cache.dim == imagebind_config.out_embed_dim else "FAIL"
        yield Check(level, "visual cache", f"{len(cache)} vectors of {cache.dim}-d ({cache.kind}); "
                    + ("exact search costs ~0.3 s per million vectors per request: convert once with "
                       "python -m ibllm build-cache --from-index knn.index --out knn_hnsw" if cache.kind == "flat"
                       and len(cache) > 200_000 else "search is fast"))
    except (WeightsError, FileNotFoundError, RuntimeError) as exc:
        yield Check("warn", "visual cache", f"{exc} (optional: answers for non-image inputs are better with it; "
                    f"{HUB_FILES['knn'].url})")


def doctor(**kwargs) -> int:
    failed = False
    for check in run_checks(**kwargs):
        print(check, flush=True)
        failed |= check.level == "FAIL"
    print("setup is usable" if not failed else "setup has problems (see FAIL lines)")
    return 1 if failed else 0


__all__ = ["Check", "run_checks", "doctor"]
