"""ImageBind (vision incl. video, text, audio, depth, thermal, IMU) plus the Point-Bind 3D branch.

Every input becomes one embedding in the shared space: modality stem (patches / windows / token ids -> tokens,
CLS, position embedding) -> pre-LN transformer trunk -> head (norm, pick one token, project to E) ->
post-processor (L2-normalise, times a fixed or learnt scale). Facts and numbers: REFERENCE.md sections 1 and 3.

The module tree reproduces the official checkpoint's names (``modality_preprocessors.vision.rgbt_stem.proj.1.weight``,
``modality_heads.imu.3.weight``, ``point_trunk.point_encoder...``), so ``imagebind_w3D.pth`` loads strictly
after removing ImageBind-LLM's ``image_bind.`` prefix (see loading.py). Token counts are derived from the config,
so the same code builds ImageBind-Huge, the parity fixture and the project's toy preset.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ibllm.config import ImageBindConfig, TrunkConfig
from ibllm.encoders.layers import DropPath, Mlp, MultiheadAttention, drop_path_rates, init_linear
from ibllm.encoders.pointbind import PointBindTrunk
from ibllm.halfgemm import float32_gemm
from ibllm.kinds import ENCODER_BRANCHES

_BLOCK_EPS = 1e-6  # trunk blocks, vision pre-trunk norm, every head
_STEM_EPS = 1e-5  # audio / depth / thermal / imu stem norms (torch's default LayerNorm)
_MAX_LOGIT_SCALE = 100.0
# Post-processor scales (REFERENCE.md section 1); text's is learnt (initial value given), vision has none.
LOGIT_SCALES = {"text": 1 / 0.07, "audio": 20.0, "depth": 5.0, "thermal": 10.0, "imu": 5.0, "point": 1.0}
_IMAGE_STEMS = {"vision": "rgbt_stem", "audio": "rgbt_stem", "thermal": "rgbt_stem", "depth": "depth_stem"}


def _conv_out(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


def patch_grid(cfg: ImageBindConfig, modality: str) -> tuple[int, ...]:
    """Patch grid of one input of ``modality`` (without the CLS token); IMU: (windows,)."""
    if modality == "vision":
        kt, kh, kw = cfg.vision_kernel
        return (_conv_out(cfg.video_frames, kt, kt), _conv_out(cfg.image_size, kh, kh),
                _conv_out(cfg.image_size, kw, kw))
    if modality == "audio":
        k, s = cfg.audio_kernel, cfg.audio_stride
        return (_conv_out(cfg.audio_mel_bins, k, s), _conv_out(cfg.audio_target_len, k, s))
    if modality in ("depth", "thermal"):
        k = getattr(cfg, f"{modality}_kernel")
        return (_conv_out(cfg.image_size, k, k),) * 2
    if modality == "imu":
        return (cfg.imu_length // cfg.imu_window,)
    raise ValueError(f"{modality!r} has no patch grid")


def num_tokens(cfg: ImageBindConfig, modality: str) -> int:
    """Sequence length of a trunk: patches + 1 CLS (text: the context length, no CLS)."""
    if modality == "text":
        return cfg.text_context
    return 1 + math.prod(patch_grid(cfg, modality))


def input_shape(cfg: ImageBindConfig, modality: str) -> tuple[int, ...]:
    """Shape of one model-ready input (no batch axis); vision: one clip (3, T, H, W)."""
    return {
        "vision": (3, cfg.video_frames, cfg.image_size, cfg.image_size),
        "text": (cfg.text_context,),
        "audio": (1, cfg.audio_mel_bins, cfg.audio_target_len),
        "depth": (1, cfg.image_size, cfg.image_size),
        "thermal": (1, cfg.image_size, cfg.image_size),
        "imu": (cfg.imu_channels, cfg.imu_length),
        "point": (cfg.point.num_points, 3),
    }[modality]


# ----------------------------------------------------------------------------------------------------------
# Stems (modality_preprocessors)


class _PosEmbedding(nn.Module):
    """Holds ``pos_embed`` under the reference's ``pos_embedding_helper`` name."""

    def __init__(self, num_tokens: int, dim: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))


class _RepeatFrames(nn.Module):
    """Images get a time axis and are repeated to ``frames`` (a parameter-free ``proj.0``, as the reference)."""

    def __init__(self, frames: int):
        super().__init__()
        self.frames = frames

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 4:
            x = x.unsqueeze(2)
        if x.shape[2] == 1 and self.frames > 1:
            x = x.expand(-1, -1, self.frames, -1, -1)
        return x


class _PatchStem(nn.Module):
    """``proj`` (conv or linear) then an optional ``norm_layer``; returns tokens (B, N, D)."""

    def __init__(self, proj: nn.Module, norm: nn.Module | None):
        super().__init__()
        self.proj = proj
        if norm is not None:
            self.norm_layer = norm

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        if x.ndim > 3:  # conv output (B, D, *grid) -> (B, N, D)
            x = x.flatten(2).transpose(1, 2)
        return self.norm_layer(x) if hasattr(self, "norm_layer") else x


class ImagePreprocessor(nn.Module):
    """Vision / audio / depth / thermal: patch stem, prepend CLS, add the learnt position embedding."""

    def __init__(self, stem_name: str, stem: _PatchStem, num_tokens: int, dim: int, input_shape: tuple[int, ...]):
        super().__init__()
        self.stem_name = stem_name
        self.input_shape = input_shape
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        setattr(self, stem_name, stem)
        self.pos_embedding_helper = _PosEmbedding(num_tokens, dim)

    def forward(self, x: Tensor) -> Tensor:
        tokens = getattr(self, self.stem_name)(x)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        pos = self.pos_embedding_helper.pos_embed
        if tokens.shape[1] != pos.shape[1]:
            raise ValueError(f"input of shape {tuple(x.shape[1:])} gives {tokens.shape[1]} tokens; this model "
                             f"expects {pos.shape[1]} (inputs of shape {self.input_shape})")
        return tokens + pos


class ImuPreprocessor(nn.Module):
    """(B, C, L) -> windows of ``window`` samples flattened channel-major -> Linear -> LayerNorm, CLS, pos."""

    def __init__(self, cfg: ImageBindConfig, dim: int):
        super().__init__()
        self.window = cfg.imu_window
        self.input_shape = (cfg.imu_channels, cfg.imu_length)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens(cfg, "imu"), dim))
        self.imu_stem = _PatchStem(nn.Linear(cfg.imu_channels * cfg.imu_window, dim, bias=False),
                                   nn.LayerNorm(dim, eps=_STEM_EPS))

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"IMU input must be (B, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        windows = x.unfold(-1, self.window, self.window).permute(0, 2, 1, 3).flatten(2)  # (B, W, C * window)
        tokens = self.imu_stem(windows)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return tokens + self.pos_embed


class TextPreprocessor(nn.Module):
    """Token + position embeddings; the causal mask is a (persistent) buffer of the official layout."""

    def __init__(self, vocab_size: int, context: int, dim: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, context, dim))
        self.register_buffer("mask", torch.full((context, context), float("-inf")).triu_(1))

    def forward(self, ids: Tensor) -> Tensor:
        n = ids.shape[1]
        if n > self.pos_embed.shape[1]:
            raise ValueError(f"text of {n} tokens exceeds the context of {self.pos_embed.shape[1]}")
        return self.token_embedding(ids) + self.pos_embed[:, :n]


# ----------------------------------------------------------------------------------------------------------
# Trunks


class Block(nn.Module):
    """Pre-LN block: x + attn(norm_1(x)), then x + mlp(norm_2(x)), each through drop path."""

    def __init__(self, dim: int, num_heads: int, add_bias_kv: bool, drop_path: float):
        super().__init__()
        self.attn = MultiheadAttention(dim, num_heads, add_bias_kv)
        self.drop_path = DropPath(drop_path)
        self.norm_1 = nn.LayerNorm(dim, eps=_BLOCK_EPS)
        self.mlp = Mlp(dim, 4 * dim)
        self.norm_2 = nn.LayerNorm(dim, eps=_BLOCK_EPS)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm_1(x), attn_mask))
        return x + self.drop_path(self.mlp(self.norm_2(x)))


class Trunk(nn.Module):
    """A stack of blocks; vision has a LayerNorm before them (``pre_transformer_layer.0``)."""

    def __init__(self, cfg: TrunkConfig, *, pre_norm: bool, add_bias_kv: bool):
        super().__init__()
        self.pre_transformer_layer = (nn.Sequential(nn.LayerNorm(cfg.embed_dim, eps=_BLOCK_EPS)) if pre_norm
                                      else nn.Identity())
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, add_bias_kv, p) for p in drop_path_rates(cfg.drop_path, cfg.num_blocks)
        )

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        x = self.pre_transformer_layer(x)
        for block in self.blocks:
            x = block(x, attn_mask)
        return x


# ----------------------------------------------------------------------------------------------------------
# Heads and post-processors


class SelectToken(nn.Module):
    def __init__(self, index: int = 0):
        super().__init__()
        self.index = index

    def forward(self, x: Tensor) -> Tensor:
        return x[:, self.index]


class TextHead(nn.Module):
    """Pick the token at the end-of-text position, then ``proj`` = LayerNorm -> Linear."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(dim, eps=_BLOCK_EPS), nn.Linear(dim, out_dim, bias=False))

    def forward(self, x: Tensor, eot: Tensor) -> Tensor:
        return self.proj(x[torch.arange(x.shape[0], device=x.device), eot])


class Normalize(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1)


class LogitScale(nn.Module):
    """Multiply by exp(log_logit_scale) clipped at 100: a parameter for text, a fixed buffer elsewhere."""

    def __init__(self, init: float, learnable: bool):
        super().__init__()
        self.init = init
        value = torch.tensor(math.log(init))
        if learnable:
            self.log_logit_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_logit_scale", value)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.log_logit_scale.fill_(math.log(self.init))

    def forward(self, x: Tensor) -> Tensor:
        return self.log_logit_scale.exp().clamp(max=_MAX_LOGIT_SCALE) * x


def _head(dim: int, out_dim: int, *, dropout: bool = False) -> nn.Sequential:
    # The IMU head has Dropout(0.5) before its Linear, which is why its weight is ``modality_heads.imu.3``.
    layers: list[nn.Module] = [nn.LayerNorm(dim, eps=_BLOCK_EPS), SelectToken(0)]
    if dropout:
        layers.append(nn.Dropout(0.5))
    layers.append(nn.Linear(dim, out_dim, bias=False))
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------------------------------------
# The model


class EncoderOutput(NamedTuple):
    embedding: Tensor  # (B, E) post-processed (normalised, scaled), averaged over clips
    prenorm: Tensor  # (B, E) head output before normalisation, averaged over clips


# Dimensions of one input; one more axis means several clips per sample (B, S, ...), averaged after encoding.
_SINGLE_NDIM = {"vision": 5, "text": 2, "audio": 4, "depth": 4, "thermal": 4, "imu": 3, "point": 3}
_MULTI_CLIP = ("vision", "audio", "depth", "thermal", "imu")


class ImageBind(nn.Module):
    """All ImageBind modalities plus Point-Bind. ``model(modality, x)`` returns (B, out_embed_dim).

    Inputs: vision (B,3,H,W) images (repeated to ``video_frames``), (B,3,T,H,W) clips or (B,S,3,T,H,W);
    text (B,L<=77) ids (the end-of-text position is the argmax id); audio (B,1,mel,T) or (B,S,1,mel,T);
    depth/thermal (B,1,H,W) [or (B,S,1,H,W)]; imu (B,6,2000) [or (B,S,6,2000)]; point (B,N,3).
    """

    def __init__(self, cfg: ImageBindConfig):
        super().__init__()
        self.cfg = cfg
        self.point_weights_loaded = True  # set False by the loader when a checkpoint had no point branch
        e = cfg.out_embed_dim
        d = {m: cfg.trunk(m).embed_dim for m in ENCODER_BRANCHES if m != "point"}

        pre = {
            "vision": ImagePreprocessor(
                _IMAGE_STEMS["vision"],
                _PatchStem(nn.Sequential(_RepeatFrames(cfg.video_frames),
                                         nn.Conv3d(3, d["vision"], cfg.vision_kernel, stride=cfg.vision_kernel,
                                                   bias=False)), None),
                num_tokens(cfg, "vision"), d["vision"], input_shape(cfg, "vision")),
            "text": TextPreprocessor(cfg.text_vocab_size, cfg.text_context, d["text"]),
            "audio": ImagePreprocessor(
                _IMAGE_STEMS["audio"],
                _PatchStem(nn.Conv2d(1, d["audio"], cfg.audio_kernel, stride=cfg.audio_stride, bias=False),
                           nn.LayerNorm(d["audio"], eps=_STEM_EPS)),
                num_tokens(cfg, "audio"), d["audio"], input_shape(cfg, "audio")),
        }
        for m in ("depth", "thermal"):
            k = getattr(cfg, f"{m}_kernel")
            pre[m] = ImagePreprocessor(
                _IMAGE_STEMS[m],
                _PatchStem(nn.Conv2d(1, d[m], k, stride=k, bias=False), nn.LayerNorm(d[m], eps=_STEM_EPS)),
                num_tokens(cfg, m), d[m], input_shape(cfg, m))
        pre["imu"] = ImuPreprocessor(cfg, d["imu"])
        self.modality_preprocessors = nn.ModuleDict(pre)

        self.modality_trunks = nn.ModuleDict({
            m: Trunk(cfg.trunk(m), pre_norm=m == "vision", add_bias_kv=m not in ("vision", "text"))
            for m in d
        })

        p = cfg.point.proj_dim
        heads: dict[str, nn.Module] = {m: _head(d[m], e, dropout=m == "imu") for m in d if m != "text"}
        heads["text"] = TextHead(d["text"], e)
        heads["point"] = nn.Sequential(nn.LayerNorm(p, eps=_BLOCK_EPS), nn.Dropout(0.5), nn.Linear(p, e, bias=False))
        self.modality_heads = nn.ModuleDict({m: heads[m] for m in ENCODER_BRANCHES})

        post: dict[str, nn.Module] = {"vision": Normalize()}
        for m, scale in LOGIT_SCALES.items():
            post[m] = nn.Sequential(Normalize(), LogitScale(scale, learnable=m == "text"))
        self.modality_postprocessors = nn.ModuleDict({m: post[m] for m in ENCODER_BRANCHES})

        self.point_trunk = PointBindTrunk(cfg.point)
        self.reset_parameters()

    # -- initialisation (random weights for training the toy model; official files overwrite all of it)

    def reset_parameters(self) -> None:
        for name in ENCODER_BRANCHES:
            self.reset_modality(name)

    def reset_modality(self, modality: str) -> None:
        modules = [self.modality_heads[modality], self.modality_postprocessors[modality]]
        if modality == "point":
            modules.append(self.point_trunk)
        else:
            modules += [self.modality_preprocessors[modality], self.modality_trunks[modality]]
        for root in modules:
            for module in root.modules():
                init_linear(module)
                if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d)):
                    module.reset_parameters()  # torch's defaults; also refills storage after to_empty()
                elif isinstance(module, (MultiheadAttention, LogitScale, PointBindTrunk)):
                    module.reset_parameters()
                elif isinstance(module, (ImagePreprocessor, ImuPreprocessor)):
                    nn.init.normal_(module.cls_token, std=0.02)
                elif isinstance(module, _PosEmbedding):
                    nn.init.normal_(module.pos_embed, std=0.02)
                elif isinstance(module, TextPreprocessor):
                    nn.init.normal_(module.token_embedding.weight, std=0.02)
                    nn.init.normal_(module.pos_embed, std=0.01)
                if isinstance(module, ImuPreprocessor):
                    nn.init.normal_(module.pos_embed, std=0.02)

    @property
    def dtype(self) -> torch.dtype:
        return self.modality_heads["vision"][-1].weight.dtype

    # -- encoding

    def _trunk_features(self, modality: str, x: Tensor, fps_start: Tensor | None) -> Tensor:
        """Head output (before post-processing) of a batch of single inputs."""
        if modality == "point":
            if not self.point_weights_loaded:
                raise RuntimeError("the loaded ImageBind checkpoint has no point encoder (imagebind_huge.pth?); "
                                   "load imagebind_w3D.pth or a Point-Bind checkpoint to encode point clouds")
            return self.modality_heads["point"](self.point_trunk(x, fps_start))
        if modality == "text":
            tokens = self.modality_preprocessors["text"](x)
            n = tokens.shape[1]
            mask = self.modality_preprocessors["text"].mask[:n, :n]
            return self.modality_heads["text"](self.modality_trunks["text"](tokens, mask), x.argmax(dim=-1))
        tokens = self.modality_preprocessors[modality](x)
        return self.modality_heads[modality](self.modality_trunks[modality](tokens))

    def encode(self, modality: str, x: Tensor, *, fps_start: Tensor | None = None) -> EncoderOutput:
        """Post-processed embedding and head output, both averaged over clips when x carries a clip axis."""
        if modality not in _SINGLE_NDIM:
            raise ValueError(f"unknown modality {modality!r}; known: {list(_SINGLE_NDIM)}")
        if modality not in ("text", "point"):  # point clouds are grouped in float32 whatever the model dtype
            x = x.to(self.dtype)
        single = _SINGLE_NDIM[modality]
        clips = None
        if modality in _MULTI_CLIP and x.ndim == single + 1:
            b, clips = x.shape[:2]
            x = x.flatten(0, 1)
        elif not (x.ndim == single or (modality == "vision" and x.ndim == 4)):
            dims = ", ".join(map(str, input_shape(self.cfg, modality)))
            accepted = f"(B, {dims})" + (f" or (B, S, {dims})" if modality in _MULTI_CLIP else "")
            if modality == "vision":
                accepted = f"(B, 3, {self.cfg.image_size}, {self.cfg.image_size}), {accepted}"
            raise ValueError(f"{modality} input has shape {tuple(x.shape)}; expected {accepted}")
        if fps_start is not None and modality != "point":
            raise ValueError("fps_start only applies to the point modality")
        weight = self.modality_heads["vision"][-1].weight
        with float32_gemm(weight.dtype, weight.device):  # every encoder call is many tokens: compute-bound GEMMs
            head = self._trunk_features(modality, x, fps_start)
        emb = self.modality_postprocessors[modality](head)
        if clips is not None:
            # Each clip is post-processed on its own, then the clips are averaged (not re-normalised).
            head = head.view(b, clips, -1).mean(dim=1)
            emb = emb.view(b, clips, -1).mean(dim=1)
        return EncoderOutput(emb, head)

    def forward(self, modality: str, x: Tensor, *, fps_start: Tensor | None = None) -> Tensor:
        return self.encode(modality, x, fps_start=fps_start).embedding

    def head_output(self, modality: str, x: Tensor, *, fps_start: Tensor | None = None) -> Tensor:
        """The head output before normalisation and scaling (the reference's ``prenorm``), clip-averaged."""
        return self.encode(modality, x, fps_start=fps_start).prenorm
