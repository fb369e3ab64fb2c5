"""Sizes of every component as dataclasses, with named presets.

One source of truth: encoders, the language model, the bind network and the visual cache are all built from
these. The "huge"/"7B" numbers come from ../shared/REFERENCE.md (ImageBind-Huge, LLaMA-7B, ImageBind-LLM);
"toy" is the small architecture of the embedded default model. ``from_reference_json`` reads the
``config.json`` of a parity fixture (the reference constructor's keyword arguments).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TrunkConfig:
    """One ImageBind transformer trunk: width, depth, heads and stochastic-depth rate."""

    embed_dim: int
    num_blocks: int
    num_heads: int
    drop_path: float = 0.0


@dataclass(frozen=True)
class PointConfig:
    """Point-Bind (PointBERT-style) encoder. Numbers: REFERENCE.md section 3."""

    trans_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    drop_path: float = 0.1
    group_size: int = 32
    num_group: int = 512
    encoder_dims: int = 256
    proj_dim: int = 512  # width of pc_projection's output and of the point head's LayerNorm
    num_points: int = 8192  # points fed to the encoder (loaders resample to this)


@dataclass(frozen=True)
class ImageBindConfig:
    """All ImageBind towers plus the point encoder. Defaults are ImageBind-Huge (REFERENCE.md section 1)."""

    out_embed_dim: int = 1024
    vision: TrunkConfig = TrunkConfig(1280, 32, 16, 0.0)
    text: TrunkConfig = TrunkConfig(1024, 24, 16, 0.0)
    audio: TrunkConfig = TrunkConfig(768, 12, 12, 0.1)
    depth: TrunkConfig = TrunkConfig(384, 12, 8, 0.0)
    thermal: TrunkConfig = TrunkConfig(768, 12, 12, 0.0)
    imu: TrunkConfig = TrunkConfig(512, 6, 8, 0.7)
    point: PointConfig = PointConfig()
    # Stems (fixed in the reference; kept here so every shape has one home).
    image_size: int = 224
    video_frames: int = 2
    vision_kernel: tuple[int, int, int] = (2, 14, 14)
    audio_kernel: int = 16
    audio_stride: int = 10
    audio_mel_bins: int = 128
    audio_target_len: int = 204
    depth_kernel: int = 16
    thermal_kernel: int = 16
    imu_channels: int = 6
    imu_length: int = 2000
    imu_window: int = 8
    text_vocab_size: int = 49408
    text_context: int = 77

    def trunk(self, modality: str) -> TrunkConfig:
        return getattr(self, modality)


@dataclass(frozen=True)
class LlamaConfig:
    """LLaMA with the ImageBind-LLM fine-tuning extras. Defaults are LLaMA-7B (REFERENCE.md section 4)."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    vocab_size: int = 32000
    multiple_of: int = 256
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 512
    max_batch_size: int = 1
    lora_rank: int = 16
    w_bias: bool = True
    w_lora: bool = True

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        # LLaMA's rule: two thirds of 4*dim, rounded up to a multiple of `multiple_of` (11008 for 7B).
        hidden = int(2 * 4 * self.dim / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


@dataclass(frozen=True)
class AdapterConfig:
    """The ImageBind-LLM additions between the encoders and LLaMA."""

    query_layer: int = 32  # how many of the last LLaMA layers receive the visual injection (all, for 7B)
    legacy_bridge: bool = False  # True: the "beta" bind network (LayerNorm + biased linears)
    bridge_hidden: int = 16384  # hidden width of the bind network's SwiGLU blocks (4 * llama dim)
    bridge_blocks: int = 3
    bridge_norm_eps: float = 1e-6


@dataclass(frozen=True)
class VisualCacheConfig:
    """How the visual cache (Tip-Adapter-style retrieval, REFERENCE.md section 5) mixes neighbours into a feature.

    The defaults are the reference demo's; a model's config (``ModelConfig.visual_cache``) holds its own, which the
    engine, the CLI, the UI's sliders and the API all start from. A request may pass another instance.
    """

    enabled: bool = True
    top_k: int = 10  # neighbours retrieved
    temperature: float = 20.0  # softmax temperature multiplier on their similarities
    weight: float = 0.5  # mix weight of the retrieved feature (0: the input's own feature only)


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling settings of one answer. Defaults: the reference demo's (REFERENCE.md section 4); a model's config
    (``ModelConfig.generation``) holds its own, which every front end serves unless a request says otherwise."""

    max_new_tokens: int = 128
    temperature: float = 0.1  # 0 = greedy
    top_p: float = 0.75
    seed: int | None = None  # None: a fresh random seed per answer

    @classmethod
    def greedy(cls, max_new_tokens: int) -> GenerationConfig:
        """Argmax decoding of at most ``max_new_tokens`` (evaluation, parity, tests)."""
        return cls(max_new_tokens=max_new_tokens, temperature=0.0)


def with_settings(base: Any, values: Mapping[str, Any] | None, what: str) -> Any:
    """``base`` (a ``GenerationConfig``, ``VisualCacheConfig`` or ``PictureConfig``) with the fields in ``values``
    replaced: request settings given as JSON (the OpenAI-compatible API, batch files). Each value is checked against
    its field (type, not negative, ``top_p`` at most 1); ValueError names the setting and what it accepts (ranges
    beyond that are the config's own ``check``)."""
    if not values:
        return base
    if not isinstance(values, Mapping):
        raise ValueError(f"{what} must be an object of settings, got {type(values).__name__}")
    known = {f.name: str(f.type) for f in fields(base)}
    changes = {}
    for name, value in values.items():
        kind = known.get(name)
        if kind is None:
            raise ValueError(f"unknown {what} setting {name!r}; known: {', '.join(known)}")
        if value is None and "None" in kind:
            changes[name] = None
            continue
        if kind.startswith("bool"):
            ok = isinstance(value, bool)
        elif kind.startswith("int"):
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:  # NaN passes every comparison below and JSON carries it (Python's json reads NaN and Infinity)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (not isinstance(value, bool) and value < 0) or (name == "top_p" and not 0 < value <= 1):
            wanted = {"bool": "true or false", "int": "a whole number >= 0"}.get(kind.split(" ")[0],
                                                                                "a finite number >= 0")
            raise ValueError(f"{what} setting {name!r} must be {'in (0, 1]' if name == 'top_p' else wanted}, "
                             f"got {value!r}")
        changes[name] = float(value) if kind.startswith("float") else value
    return replace(base, **changes)


@dataclass(frozen=True)
class PictureConfig:
    """How a picture answer is drawn by Stable unCLIP (``ibllm.imagine``). Defaults: diffusers' own for
    ``StableUnCLIPImg2ImgPipeline`` (20 steps, guidance 10, embedding noise level 0)."""

    steps: int = 20  # denoising steps; the time of a picture grows linearly with them
    guidance: float = 10.0  # classifier-free guidance scale; <= 1 turns guidance off (half the UNet work)
    seed: int | None = None  # None: a fresh random seed per picture (the one drawn is reported)
    noise_level: int = 0  # noise added to the embedding before conditioning (0-999): more = looser variations

    def check(self, max_noise_level: int = 999) -> None:
        """ValueError naming the setting when one is out of range."""
        if not isinstance(self.steps, int) or not 1 <= self.steps <= 500:
            raise ValueError(f"picture steps must be a whole number from 1 to 500, got {self.steps!r}")
        if not 0.0 <= float(self.guidance) <= 50.0:
            raise ValueError(f"picture guidance must be from 0 to 50, got {self.guidance!r}")
        if self.seed is not None and not 0 <= int(self.seed) < 2**63:
            raise ValueError(f"picture seed must be a non-negative integer (or None: a random one), got {self.seed!r}")
        if not isinstance(self.noise_level, int) or not 0 <= self.noise_level <= max_noise_level:
            raise ValueError(f"picture noise level must be a whole number from 0 to {max_noise_level}, "
                             f"got {self.noise_level!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build an ImageBindLLM."""

    name: str = "7B"
    imagebind: ImageBindConfig = field(default_factory=ImageBindConfig)
    llama: LlamaConfig = field(default_factory=LlamaConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    visual_cache: VisualCacheConfig = field(default_factory=VisualCacheConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return _dataclass_from_dict(cls, data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _dataclass_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild nested frozen dataclasses from ``asdict`` output; unknown keys are an error."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
    kwargs: dict[str, Any] = {}
    try:
        defaults = cls()
    except TypeError:  # a dataclass without defaults (TrunkConfig): its fields are plain values
        defaults = None
    for name, value in data.items():
        current = getattr(defaults, name, None)
        if hasattr(current, "__dataclass_fields__") and isinstance(value, dict):
            kwargs[name] = _dataclass_from_dict(type(current), value)
        elif isinstance(current, tuple) and isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------------------
# Presets

IMAGEBIND_HUGE = ImageBindConfig()

# The embedded default's encoders: the same towers at a size that trains on 2 CPU cores. Inputs are coarser than
# ImageBind-Huge's so that every trunk sees at most ~100 tokens (the whole pipeline must train in well under 90
# minutes on 2 shared cores, ibllm/train/): 112 px images (8x8 patches of 14; depth/thermal 7x7 patches of 16),
# audio patches with stride 16 instead of 10 (8x12 instead of 12x19), IMU windows of 20 samples (100 instead of
# 250), a 32-token text context (the toy captions are under 20 CLIP tokens), 1024 points in 32 groups.
IMAGEBIND_TOY = ImageBindConfig(
    out_embed_dim=128,
    vision=TrunkConfig(128, 4, 4, 0.0),
    text=TrunkConfig(128, 3, 4, 0.0),
    audio=TrunkConfig(96, 3, 4, 0.1),
    depth=TrunkConfig(64, 2, 4, 0.0),
    thermal=TrunkConfig(64, 2, 4, 0.0),
    imu=TrunkConfig(64, 2, 4, 0.1),
    point=PointConfig(
        trans_dim=96, depth=3, num_heads=4, drop_path=0.0, group_size=32, num_group=32,
        encoder_dims=96, proj_dim=128, num_points=1024,
    ),
    image_size=112,
    audio_stride=16,
    imu_window=20,
    text_context=32,
)

LLAMA_7B = LlamaConfig()  # params.json of Meta's 7B: dim 4096, 32 layers, 32 heads, norm_eps 1e-6, vocab 32000

LLAMA_TOY = LlamaConfig(
    dim=256, n_layers=4, n_heads=4, vocab_size=1024, multiple_of=32, max_seq_len=256, max_batch_size=1,
    lora_rank=8,
)

PRESETS: dict[str, ModelConfig] = {
    "7B": ModelConfig(name="7B"),
    "toy": ModelConfig(
        name="toy",
        imagebind=IMAGEBIND_TOY,
        llama=LLAMA_TOY,
        adapter=AdapterConfig(query_layer=LLAMA_TOY.n_layers, bridge_hidden=4 * LLAMA_TOY.dim),
        # Greedy, 48 tokens: what the evaluation measured the shipped toy model with (its answers are short).
        generation=GenerationConfig(temperature=0.0, max_new_tokens=48),
    ),
}


def from_name(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None


def from_reference_json(path: str | Path) -> ModelConfig:
    """Build a ModelConfig from a parity fixture's ``config.json`` (the reference constructor's kwargs)."""
    raw = json.loads(Path(path).read_text())
    kw = raw["imagebind_constructor_kwargs"]
    pm = kw["point_model_config"]

    def trunk(m: str) -> TrunkConfig:
        return TrunkConfig(kw[f"{m}_embed_dim"], kw[f"{m}_num_blocks"], kw[f"{m}_num_heads"],
                           float(kw.get(f"{m}_drop_path", 0.0)))

    imagebind = ImageBindConfig(
        out_embed_dim=kw["out_embed_dim"],
        vision=trunk("vision"), text=trunk("text"), audio=trunk("audio"), depth=trunk("depth"),
        thermal=trunk("thermal"), imu=trunk("imu"),
        point=PointConfig(
            trans_dim=pm["trans_dim"], depth=pm["depth"], num_heads=pm["num_heads"],
            drop_path=float(pm.get("drop_path_rate", 0.1)), group_size=pm["group_size"],
            num_group=pm["num_group"], encoder_dims=pm["encoder_dims"], proj_dim=kw["point_proj_dim"],
            num_points=int(raw.get("inputs", {}).get("num_points", 8192)),
        ),
        video_frames=kw.get("video_frames", 2),
        vision_kernel=tuple(kw.get("kernel_size", (2, 14, 14))),
        audio_kernel=kw.get("audio_kernel_size", 16),
        audio_stride=kw.get("audio_stride", 10),
        audio_mel_bins=kw.get("audio_num_mel_bins", 128),
        audio_target_len=kw.get("audio_target_len", 204),
        depth_kernel=kw.get("depth_kernel_size", 16),
        thermal_kernel=kw.get("thermal_kernel_size", 16),
        text_vocab_size=raw.get("text_vocab_size", 49408),
        text_context=raw.get("text_context_length", 77),
    )
    ll = raw["llama"]
    llama = LlamaConfig(
        dim=ll["dim"], n_layers=ll["n_layers"], n_heads=ll["n_heads"], vocab_size=ll["vocab_size"],
        multiple_of=ll["multiple_of"], norm_eps=ll["norm_eps"], rope_theta=ll.get("rope_theta", 10000.0),
        max_seq_len=ll["max_seq_len"], max_batch_size=ll["max_batch_size"], lora_rank=ll["lora_rank"],
        w_bias=ll.get("w_bias", True), w_lora=ll.get("w_lora", True),
    )
    if "ffn_hidden_dim" in ll and ll["ffn_hidden_dim"] != llama.ffn_hidden_dim:
        raise ValueError(f"ffn_hidden_dim {ll['ffn_hidden_dim']} does not follow LLaMA's rounding rule")
    ad = raw.get("adapter", {})
    adapter = AdapterConfig(
        query_layer=ad.get("query_layer", llama.n_layers), legacy_bridge=ad.get("legacy_bridge", False),
        bridge_hidden=ad.get("bridge_hidden", 4 * llama.dim),
    )
    kn = raw.get("knn", {})
    visual_cache = VisualCacheConfig(top_k=kn.get("cache_size", 10), temperature=float(kn.get("cache_t", 20.0)),
                                     weight=float(kn.get("cache_weight", 0.5)))
    return ModelConfig(name=raw.get("fixture", "reference"), imagebind=imagebind, llama=llama, adapter=adapter,
                       visual_cache=visual_cache)


__all__ = [
    "TrunkConfig", "PointConfig", "ImageBindConfig", "LlamaConfig", "AdapterConfig", "VisualCacheConfig",
    "GenerationConfig", "with_settings", "ModelConfig", "PRESETS", "from_name", "from_reference_json", "replace",
]
