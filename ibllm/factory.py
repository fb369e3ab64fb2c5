"""``create_engine``: the embedded default, or the official ImageBind-LLM weights.

- No weights arguments: the toy model in ``assets/toy/`` (trained by ``python -m ibllm.train``). If its weights
  are absent, the same architecture with random weights (the UI says so). ``adapter`` alone: that adapter file
  (e.g. ``python -m ibllm.train finetune``'s ``adapter.pth``) over the toy model's weights.
- ``llama_dir`` (Meta layout) + ``adapter`` (7B.pth) + ``imagebind`` (imagebind_w3D.pth) [+ ``knn_index``]:
  the real model. ``adapter``/``imagebind``/``knn_index`` may be omitted to take them from the Hugging Face
  cache (``ibllm.weights.resolve``). Everything is built on the meta device and filled from memory-mapped files,
  so a 7B model needs about its own size in RAM.

Quantisation: ``quantize="int8"`` (or ``"int4"``) serves LLaMA's linear layers (with int8 also the bind network's
and the encoder blocks') quantised through torchao, LoRA merged first, the rest in bfloat16 (``ibllm.llm.quantize``);
the memory plan counts them at that size.

Serving: ``max_batch`` decode slots (env ``IBLLM_MAX_BATCH``; default 4) and ``compile`` for the batched decode
step (env ``IBLLM_COMPILE`` = 1/0; default on CUDA, off on CPU — see ``default_compile``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from ibllm.bind import is_legacy_bridge
from ibllm.cache import VisualCache
from ibllm.checkpoint import CheckpointError, read_state_dict
from ibllm.config import IMAGEBIND_HUGE, AdapterConfig, ImageBindConfig, LlamaConfig, ModelConfig, from_name
from ibllm.encoders.loading import load_imagebind_weights
from ibllm.engine import ChatEngine
from ibllm.halfgemm import describe
from ibllm.llm.quantize import (
    SERVING_DTYPE,
    check_supported,
    is_quantized_weight,
    quantize_around,
    quantize_transformer,
)
from ibllm.llm.tokenizer import Tokenizer
from ibllm.memory import FilePages, convert_releasing, parse_dtype, plan_memory
from ibllm.model import ImageBindLLM
from ibllm.threads import passing_thread
from ibllm.types import ModelInfo
from ibllm.weights import MetaLlama, WeightsError, resolve

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ASSETS = REPO / "assets" / "toy"

HOW_TO_LOAD_REAL = (
    "python app.py --llama-dir /path/to/LLaMA/7B --adapter 7B.pth --imagebind imagebind_w3D.pth "
    "[--knn-index knn.index] (adapter: huggingface.co/Cxxs/ImageBind-LLM; encoders: huggingface.co/ZiyuG/"
    "ImageBind_w3D; cache: huggingface.co/csuhan/knn; LLaMA-7B from Meta, ideally merged with the "
    "Open-Chinese-LLaMA delta: python -m ibllm merge-chinese). python -m ibllm doctor checks a setup."
)


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DEFAULT_MAX_BATCH = 4


def serving_options(device: torch.device, max_batch: int | None = None,
                    compile: bool | None = None) -> dict[str, int | bool]:
    """``ChatEngine``'s ``max_batch``/``compile``: the arguments, else ``IBLLM_MAX_BATCH``/``IBLLM_COMPILE``, else
    the defaults (4 slots; compile on CUDA only)."""
    if max_batch is None:
        max_batch = int(os.environ.get("IBLLM_MAX_BATCH", DEFAULT_MAX_BATCH))
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    if compile is None:
        env = os.environ.get("IBLLM_COMPILE", "").strip().lower()
        compile = env in ("1", "true", "yes", "on") if env else default_compile(device)
    return {"max_batch": max_batch, "compile": compile}


def default_compile(device: torch.device) -> bool:
    # On a GPU the step is launch-bound without it (CUDA graphs). On a CPU, measured on 2 cores: see README
    # "Serving" — compiling costs more start-up time than a demo saves, so it is opt-in there.
    return device.type == "cuda"


def _finish(net: ImageBindLLM, device: torch.device, dtype: torch.dtype, *, merge_lora: bool,
            fuse: bool = True, quantize: str | None = None, release=None) -> ImageBindLLM:
    # No KV cache here: the engine's scheduler allocates its own, one row per decode slot.
    if quantize:
        # Block by block, before anything else is converted: the peak holds one block in both forms, not the model.
        # ``release`` drops the file pages of each weight once it is quantised.
        quantize_transformer(net.llama, quantize, device=device, merge_lora=merge_lora, release=release)
        quantize_around(net, quantize, device=device, release=release)  # int8: the bind network and the encoders
    net = net.to(device=device, dtype=dtype).eval()  # quantised weights stay as they are (QuantizedLinear._apply)
    for p in net.parameters():
        p.requires_grad_(False)
    if merge_lora and net.cfg.llama.w_lora:
        net.llama.merge_lora()
    # Fusing would concatenate quantised weights (and wv must stay a Linear of its own for the injection).
    if fuse and not quantize and (merge_lora or not net.cfg.llama.w_lora):
        net.llama.fuse_projections()
    return net


def _read_in_file_weights(net: torch.nn.Module, files: list[Path]) -> None:
    """Read in now the pages of the weights served straight from their files (in the files' own dtype, no copy:
    Meta's float16 LLaMA), so that loading takes that time and the first question does not (``FilePages.read_in``)."""
    t0 = time.perf_counter()
    pages = [FilePages(f) for f in files]
    tensors = [*net.parameters(), *net.buffers()]
    read = sum(t.numel() * t.element_size() for t in tensors if any(p.read_in(t) for p in pages))  # one file holds it
    if read:
        log.info("read in %.1f GB of weights used straight from the files (%.1f s)", read / 1e9,
                 time.perf_counter() - t0)


def _served_dtype(dtype: torch.dtype, quantize: str | None) -> str:
    return f"{quantize} + bfloat16" if quantize else str(dtype).removeprefix("torch.")


@passing_thread  # the torch work of loading and warming up leaves no OpenMP pool behind (ibllm/threads.py)
def load_default(assets: str | os.PathLike = DEFAULT_ASSETS, *, adapter: str | os.PathLike | None = None,
                 device: str | None = None, dtype: str | None = None, quantize: str | None = None,
                 merge_lora: bool = True, seed: int = 0, max_batch: int | None = None, compile: bool | None = None,
                 unclip: str | None = None) -> ChatEngine:
    """The embedded toy model (random weights of the same architecture when it has not been trained yet);
    ``adapter``: an adapter file in the official layout replacing the model's own adapter tensors."""
    assets = Path(assets)
    dev = pick_device(device)
    if quantize:
        check_supported(quantize, dev)
    # The toy model is small: float32 everywhere, unless quantised (then bfloat16 around the quantised layers).
    dt = SERVING_DTYPE if quantize else parse_dtype(dtype) if dtype else torch.float32
    cfg = ModelConfig.load(assets / "config.json") if (assets / "config.json").is_file() else from_name("toy")
    tokenizer_path = assets / "tokenizer.model"
    if not tokenizer_path.is_file():
        raise WeightsError(f"{tokenizer_path} is missing: run `python -m ibllm.train.tokenizer --out {tokenizer_path}`")
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.vocab_size > cfg.llama.vocab_size:
        raise WeightsError(f"tokenizer has {tokenizer.vocab_size} pieces, the model only {cfg.llama.vocab_size}")
    weights = assets / "model.safetensors"
    torch.manual_seed(seed)
    net = ImageBindLLM(cfg)
    trained = weights.is_file()
    if trained:
        net.load_official(read_state_dict(weights), what=str(weights))
        description = f"embedded toy model trained by ibllm ({weights.relative_to(assets.parent.parent)})" \
            if assets.is_relative_to(REPO) else f"toy model from {weights}"
    else:
        description = "random weights of the toy architecture (no trained weights in assets/toy yet)"
    if adapter is not None:
        net.load_adapter(read_state_dict(adapter), what=str(adapter))
        description += f" with the adapter {adapter}"
    cache_dir = assets / "cache"
    cache = VisualCache.load(cache_dir) if cache_dir.exists() else None
    net = _finish(net, dev, dt, merge_lora=merge_lora, quantize=quantize)
    info = ModelInfo(name=f"toy ({cfg.name})", weights=description, device=str(dev), dtype=_served_dtype(dt, quantize),
                     is_default=True, trained=trained, cache_entries=cache.index.ntotal if cache else 0,
                     how_to_load_real=HOW_TO_LOAD_REAL, compute=describe(dt, dev))
    return ChatEngine(net, tokenizer, visual_cache=cache, info=info, unclip=unclip,
                      **serving_options(dev, max_batch, compile))


def config_from_adapter(adapter_state: dict[str, torch.Tensor], llama: LlamaConfig,
                        imagebind: ImageBindConfig = IMAGEBIND_HUGE) -> ModelConfig:
    """The model an adapter file was trained for: LoRA rank, biases, bind-network width and layout, and how many
    layers get the visual injection are read off its tensors rather than assumed."""
    lora = adapter_state.get("llama.layers.0.attention.lora_wq_l1.weight")
    llama = replace(llama, w_lora=lora is not None, lora_rank=int(lora.shape[0]) if lora is not None else 0,
                    w_bias="llama.layers.0.attention.wq.bias" in adapter_state)
    try:
        hidden = int(adapter_state["image_bind_f1_1.weight"].shape[0])
        query_layer = int(adapter_state["prefix_query.weight"].shape[0])
    except KeyError as exc:
        raise CheckpointError(f"not an ImageBind-LLM adapter: {exc.args[0]} is missing") from None
    blocks = sum(1 for k in adapter_state if k.startswith("image_bind_norm_") and k.endswith(".weight"))
    legacy = is_legacy_bridge(adapter_state)
    return ModelConfig(
        name="ImageBind-LLM" + (" (beta bridge)" if legacy else ""), imagebind=imagebind, llama=llama,
        adapter=AdapterConfig(query_layer=query_layer, legacy_bridge=legacy, bridge_hidden=hidden,
                              bridge_blocks=blocks),
    )


@passing_thread  # the torch work of loading and warming up leaves no OpenMP pool behind (ibllm/threads.py)
def load_official(llama_dir: str | os.PathLike, *, adapter: str | os.PathLike | None = None,
                  imagebind: str | os.PathLike | None = None, knn_index: str | os.PathLike | None = None,
                  tokenizer: str | os.PathLike | None = None, device: str | None = None, dtype: str | None = None,
                  quantize: str | None = None, max_seq_len: int = 512, merge_lora: bool = True, use_cache: bool = True,
                  imagebind_config: ImageBindConfig = IMAGEBIND_HUGE, max_batch: int | None = None,
                  compile: bool | None = None, unclip: str | None = None) -> ChatEngine:
    """The released ImageBind-LLM: Meta LLaMA + ``7B.pth`` + ``imagebind_w3D.pth`` (+ ``knn.index``).

    ``imagebind_config`` is ImageBind-Huge for the released files; tests pass the tiny sizes of their fixtures.
    """
    dev = pick_device(device)
    if quantize:
        check_supported(quantize, dev)
    meta = MetaLlama.find(llama_dir, tokenizer)
    if meta.tokenizer is None:
        raise WeightsError(f"tokenizer.model not found in {meta.root} or its parent: pass --tokenizer")
    tok = Tokenizer(meta.tokenizer)
    adapter_path = resolve("adapter", adapter)
    imagebind_path = resolve("imagebind", imagebind)
    # Memory-mapped: nothing is read until a tensor is converted or used.
    adapter_state = read_state_dict(adapter_path)
    imagebind_state = read_state_dict(imagebind_path)
    cfg = config_from_adapter(adapter_state, replace(meta.config(vocab_size=tok.vocab_size), max_seq_len=max_seq_len,
                                                     max_batch_size=1), imagebind_config)
    # The adapter overrides the frozen base where both have a tensor (fine-tuned norms); the encoders come from
    # their own file (if an adapter carries encoder tensors too, the encoder file wins).
    base = {f"llama.{k}": v for k, v in meta.state_dict().items() if f"llama.{k}" not in adapter_state}
    serving = serving_options(dev, max_batch, compile)
    plan = plan_memory([base, adapter_state, imagebind_state], dev, requested=dtype, quantize=quantize,
                       merge_lora=merge_lora,
                       kv_cache=(cfg.llama.n_layers, cfg.llama.dim, cfg.llama.max_seq_len, serving["max_batch"]))
    for line in plan.lines():
        log.info(line)
    if plan.dtype is None:
        raise WeightsError(plan.reason)
    dt = plan.dtype
    compute = describe(dt, dev)  # the start-up probe: half or float32 GEMMs for prefill and encoders
    if compute:
        log.info(f"compute: {compute}")
    with torch.device("meta"):
        net = ImageBindLLM(cfg)
    # One file at a time into the serving dtype, releasing each file's pages as they are converted: the peak is
    # what is served, not the files plus their copies. Weights to be quantised stay in the file until then.
    shard = meta.shards[0] if len(meta.shards) == 1 else None
    keep = (lambda key: is_quantized_weight(key, quantize)) if quantize else None
    releasers = [FilePages(f) for f in (shard, adapter_path, imagebind_path) if f is not None] if quantize else []

    def release(t: torch.Tensor) -> None:  # a quantised weight's file pages, dropped once it is converted
        for releaser in releasers:
            releaser.release(t)
    state = convert_releasing(base, dt, shard, keep=keep)
    state.update(convert_releasing(adapter_state, dt, adapter_path, keep=keep))
    net.load_official(state, what=f"{meta.root} + {adapter_path.name}", allow_missing=("image_bind.",), assign=True)
    del state, base, adapter_state
    load_imagebind_weights(net.image_bind, convert_releasing(imagebind_state, dt, imagebind_path, keep=keep))
    del imagebind_state
    cache = None
    if use_cache:
        try:
            cache = VisualCache.load(resolve("knn", knn_index))
        except WeightsError:
            if knn_index is not None:
                raise
    # Fusing q|k|v and w1|w3 concatenates weights: on a CPU that is a second copy of them while loading (and the
    # file-backed originals stay mapped), against ~9% faster decode; the memory rule wins there.
    net = _finish(net, dev, dt, merge_lora=merge_lora, fuse=dev.type == "cuda", quantize=quantize, release=release)
    if dev.type == "cpu" and not quantize:
        _read_in_file_weights(net, [p for p in (shard, adapter_path, imagebind_path) if p is not None])
    info = ModelInfo(
        name=cfg.name, weights=f"LLaMA {meta.root}{' (7B_chinese)' if meta.is_chinese_merge else ''}; adapter "
        f"{adapter_path}; encoders {imagebind_path}", device=str(dev), dtype=_served_dtype(dt, quantize),
        is_default=False, trained=True, cache_entries=cache.index.ntotal if cache else 0, memory=plan.reason,
        compute=compute)
    return ChatEngine(net, tok, visual_cache=cache, info=info, unclip=unclip, **serving)


def create_engine(*, llama_dir: str | None = None, adapter: str | None = None, imagebind: str | None = None,
               knn_index: str | None = None, tokenizer: str | None = None, assets: str | None = None,
               device: str | None = None, dtype: str | None = None, quantize: str | None = None,
               max_seq_len: int = 512, merge_lora: bool = True, max_batch: int | None = None,
               compile: bool | None = None, unclip: str | None = None) -> ChatEngine:
    """The model the app and CLI serve: official weights when ``llama_dir`` is given, else the embedded default
    (with ``adapter`` over it when given: a fine-tune of the toy model).

    ``quantize``: "int8"/"int4" weight-only LLaMA; ``max_batch``: answers decoded at the same time; ``compile``:
    compile the decode step (module docstring); ``unclip``: the Stable unCLIP pipeline for picture answers (a
    folder or hub repo id; loaded on first use)."""
    if llama_dir:
        return load_official(llama_dir, adapter=adapter, imagebind=imagebind, knn_index=knn_index,
                             tokenizer=tokenizer, device=device, dtype=dtype, quantize=quantize,
                             max_seq_len=max_seq_len, merge_lora=merge_lora, max_batch=max_batch, compile=compile,
                             unclip=unclip)
    if imagebind or knn_index:
        raise WeightsError("the official encoders/cache need the base LLaMA too: pass --llama-dir (Meta's 7B "
                           "folder with params.json and consolidated.00.pth)")
    return load_default(assets or DEFAULT_ASSETS, adapter=adapter, device=device, dtype=dtype, quantize=quantize,
                        merge_lora=merge_lora, max_batch=max_batch, compile=compile, unclip=unclip)


__all__ = ["create_engine", "load_default", "load_official", "CheckpointError", "WeightsError", "HOW_TO_LOAD_REAL"]
