"""The ImageBind-LLM network as one ``nn.Module``, and its official checkpoint layout.

``ImageBindLLM`` holds the four parts of the paper: the frozen ImageBind/Point-Bind encoders (``image_bind``),
the bind network (``bind``), the per-layer prefix queries (``prefix_query``) and the gated LLaMA (``llama``).
Its state dict uses the official names except for the bind network (the official file stores it as flat
``image_bind_f2_3.weight``-style keys: ``bind.bind_key_table``) and the gates (``llama.OFFICIAL_KEYS``);
``key_table`` joins the two, and ``checkpoint.load_strict`` applies it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ibllm.bind import BindNetwork, PrefixQuery, bind_key_table
from ibllm.checkpoint import CheckpointError, KeyTable, load_strict
from ibllm.config import ModelConfig
from ibllm.encoders import ImageBind
from ibllm.llm.llama import OFFICIAL_KEYS as llama_keys
from ibllm.llm.llama import Transformer, is_finetuned


def is_adapter_key(official: str) -> bool:
    """Whether an official name belongs in an adapter file (``7B.pth``): the bind network, the prefix queries, the
    gates and what stage 2 fine-tunes of LLaMA (LoRA, biases, norms); not the frozen LLaMA base, not the encoders."""
    if official.startswith("image_bind."):
        return False
    if not official.startswith("llama."):
        return True
    name = official.removeprefix("llama.")
    return is_finetuned(name) or name.endswith(".attention.gate")


class ImageBindLLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.image_bind = ImageBind(cfg.imagebind)
        self.bind = BindNetwork.from_config(cfg.adapter, cfg.imagebind.out_embed_dim, cfg.llama.dim)
        self.prefix_query = PrefixQuery(cfg.adapter.query_layer, cfg.llama.dim)
        self.llama = Transformer(cfg.llama, query_layer=cfg.adapter.query_layer)

    @torch.no_grad()
    def blank_feature(self) -> torch.Tensor:
        """The feature of a text-only turn (1, E), float32: the reference trains those with an all-zero image, so
        the model expects the (normalised) embedding of one. Computed in eval mode, whatever the current mode."""
        s = self.cfg.imagebind.image_size
        param = next(self.image_bind.parameters())
        was_training = self.image_bind.training
        self.image_bind.eval()
        try:
            zeros = torch.zeros(1, 3, s, s, device=param.device, dtype=param.dtype)
            return torch.nn.functional.normalize(self.image_bind("vision", zeros).float(), dim=-1)
        finally:
            self.image_bind.train(was_training)

    def injection(self, feature: torch.Tensor) -> torch.Tensor:
        """Fused ImageBind feature (B, E) -> the per-layer gated values LLaMA adds to its attention outputs."""
        dtype = self.bind.proj.weight.dtype
        visual_query = self.bind(feature.to(dtype))  # (B, 1, D)
        return self.llama.visual_injection(self.prefix_query(visual_query))

    # -- official layout ----------------------------------------------------------------------------------------

    def key_table(self) -> KeyTable:
        """Official names <-> this module's: the bind network's flat names and the gates (the rest is the same)."""
        bind = bind_key_table(self.cfg.adapter.bridge_blocks, self.cfg.adapter.legacy_bridge)
        return KeyTable((official, f"bind.{ours}") for official, ours in bind.items()) + llama_keys.under("llama.")

    def to_official(self, state: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """This module's state dict (or ``state``, in its names) under the official checkpoint names."""
        state = self.state_dict() if state is None else state
        table = self.key_table()
        return {table.to_official(k): v for k, v in state.items()}

    def load_official(self, state: Mapping[str, torch.Tensor], *, what: str = "checkpoint",
                      allow_missing: tuple[str, ...] = (), assign: bool = False) -> list[str]:
        """Load an official-layout state dict strictly (``checkpoint.load_strict``); returns the missing keys that
        ``allow_missing`` (official name prefixes, e.g. ``("image_bind.",)`` when the encoders come from their own
        file) allowed."""
        return load_strict(self, state, what, table=self.key_table(), allow_missing=allow_missing, assign=assign)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors under the official names (``is_adapter_key``): what an adapter file holds."""
        return {k: v for k, v in self.to_official().items() if is_adapter_key(k)}

    def load_adapter(self, state: Mapping[str, torch.Tensor], *, what: str = "adapter") -> None:
        """Replace the adapter's tensors with an adapter file's (e.g. a fine-tune's ``adapter.pth``) over weights
        already loaded. Every adapter key must be there; unknown keys and shape mismatches are errors."""
        missing = [k for k in self.adapter_state() if k not in state]
        if missing:
            more = f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
            raise CheckpointError(f"{what} is not a complete ImageBind-LLM adapter: missing {missing[:10]}{more}")
        self.load_official(state, what=what, allow_missing=("",))  # the rest keeps the weights already loaded
