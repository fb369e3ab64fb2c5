"""The ImageBind-LLM network as one ``nn.Module``, and its official checkpoint layout.

``ImageBindLLM`` holds the four parts of the paper: the frozen ImageBind/Point-Bind encoders (``image_bind``),
the bind network (``bind``), the per-layer prefix queries (``prefix_query``) and the gated LLaMA (``llama``).
Its state dict uses the official names except for the bind network, which ``bind.bind_key_table`` renames
(the official file stores it as flat ``image_bind_f2_3.weight``-style keys). ``to_official`` / ``from_official``
are the only place where that happens.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ibllm.bind import BindNetwork, PrefixQuery, bind_key_table
from ibllm.checkpoint import CheckpointError, describe_key_mismatch
from ibllm.config import ModelConfig
from ibllm.encoders import ImageBind
from ibllm.llm.llama import Transformer


class ImageBindLLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.image_bind = ImageBind(cfg.imagebind)
        self.bind = BindNetwork.from_config(cfg.adapter, cfg.imagebind.out_embed_dim, cfg.llama.dim)
        self.prefix_query = PrefixQuery(cfg.adapter.query_layer, cfg.llama.dim)
        self.llama = Transformer(cfg.llama, query_layer=cfg.adapter.query_layer)

    def injection(self, feature: torch.Tensor) -> torch.Tensor:
        """Fused ImageBind feature (B, E) -> the per-layer gated values LLaMA adds to its attention outputs."""
        dtype = self.bind.proj.weight.dtype
        visual_query = self.bind(feature.to(dtype))  # (B, 1, D)
        return self.llama.visual_injection(self.prefix_query(visual_query))

    # -- official layout ----------------------------------------------------------------------------------------

    def _bind_table(self) -> dict[str, str]:
        return bind_key_table(self.cfg.adapter.bridge_blocks, self.cfg.adapter.legacy_bridge)

    def to_official(self, state: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """This module's state dict under the official checkpoint names."""
        state = self.state_dict() if state is None else state
        ours_to_official = {f"bind.{ours}": official for official, ours in self._bind_table().items()}
        return {ours_to_official.get(k, k): v for k, v in state.items()}

    def from_official(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Official names -> this module's names (keys of other parts pass through unchanged)."""
        official_to_ours = {official: f"bind.{ours}" for official, ours in self._bind_table().items()}
        return {official_to_ours.get(k, k): v for k, v in state.items()}

    def load_official(self, state: Mapping[str, torch.Tensor], *, what: str = "checkpoint",
                      allow_missing: tuple[str, ...] = (), assign: bool = False) -> list[str]:
        """Load an official-layout state dict strictly; returns the missing keys that ``allow_missing`` allowed.

        Unexpected keys are always an error. ``allow_missing`` lists key prefixes that may be absent, e.g.
        ``("image_bind.",)`` when the encoders come from their own file (``image_bind.``/``llama.`` keys have the
        same name in both layouts).
        """
        ours = self.from_official(state)  # a 1:1 renaming, so keys stay aligned with ``state``
        own = self.state_dict()
        unexpected = [official for official, k in zip(state, ours, strict=True) if k not in own]
        missing_all = [k for k in own if k not in ours]
        missing = [k for k in missing_all if not k.startswith(allow_missing)]
        if missing or unexpected:
            raise CheckpointError(describe_key_mismatch(self.to_official(dict.fromkeys(missing)), unexpected, what))
        shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in ours.items()
                  if tuple(v.shape) != tuple(own[k].shape)]
        if shapes:
            raise CheckpointError(f"{what}: shape mismatch: " + "; ".join(shapes[:20]))
        self.load_state_dict(ours, strict=False, assign=assign)
        return [k for k in missing_all if k.startswith(allow_missing)]
