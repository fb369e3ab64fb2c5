"""LoRA for training through peft, and the one key table between the official and peft layouts.

How the model represents LoRA:

- **Native** (``ibllm.llm.llama``): ``lora_w*_l1`` / ``lora_w*_l2`` are plain bias-free Linears next to the base
  projection, so the model's state dict *is* the official layout. Loading, saving and inference use this form
  (inference after ``Transformer.merge_lora``).
- **peft** (stage-2 training): ``to_peft`` removes the native pairs and wraps the base Linears with peft LoRA
  layers (``r = lora_alpha = rank``, so peft's scale is exactly 1, the reference's unscaled ``l2(l1(x))``) holding
  the same tensors: ``lora_A`` = l1 (r, in), ``lora_B`` = l2 (out, r). ``from_peft`` puts them back;
  ``official_state_dict`` writes a peft model's tensors under the official names without touching the model.

The round trip official -> native -> peft -> official is exact (same tensors, copied, never recomputed), and a
peft forward equals the native forward (peft adds ``lora_B(lora_A(x)) * 1.0`` where native adds ``l2(l1(x))``).
"""

from __future__ import annotations

import functools
import re

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from ibllm.llm.llama import Transformer, is_finetuned

# Which Linear of which block carries LoRA (REFERENCE.md section 4).
LORA_SITES: dict[str, tuple[str, ...]] = {
    "attention": ("wq", "wk", "wv", "wo"),
    "feed_forward": ("w1", "w2", "w3"),
}
PEFT_PREFIX = "base_model.model."

# The one mapping table. {block} is "layers.<i>.attention" or "layers.<i>.feed_forward", {proj} one of its
# LORA_SITES, {adapter} the peft adapter name. Keys that match no row (norms, embeddings, gates) are the same in
# both layouts.
KEY_TABLE: tuple[tuple[str, str], ...] = (
    ("{block}.lora_{proj}_l1.weight", "{block}.{proj}.lora_A.{adapter}.weight"),
    ("{block}.lora_{proj}_l2.weight", "{block}.{proj}.lora_B.{adapter}.weight"),
    ("{block}.{proj}.weight", "{block}.{proj}.base_layer.weight"),
    ("{block}.{proj}.bias", "{block}.{proj}.base_layer.bias"),
)

_PROJ = "|".join(p for projs in LORA_SITES.values() for p in projs)
_BLOCK = r"layers\.\d+\.(?:" + "|".join(LORA_SITES) + ")"
TARGET_MODULES = sorted({p for projs in LORA_SITES.values() for p in projs})


@functools.lru_cache(maxsize=8)
def _patterns(adapter: str) -> list[tuple[re.Pattern[str], re.Pattern[str]]]:
    """KEY_TABLE rows as (official regex, peft regex) with named groups block / proj."""

    def compile_(template: str) -> re.Pattern[str]:
        rx = re.escape(template).replace(r"\{block\}", f"(?P<block>{_BLOCK})")
        rx = rx.replace(r"\{proj\}", f"(?P<proj>{_PROJ})", 1).replace(r"\{proj\}", "(?P=proj)")
        return re.compile(rx.replace(r"\{adapter\}", re.escape(adapter)) + "$")

    return [(compile_(official), compile_(peft)) for official, peft in KEY_TABLE]


def _convert(key: str, src: int, adapter: str) -> str:
    for row, patterns in zip(KEY_TABLE, _patterns(adapter), strict=True):
        m = patterns[src].match(key)
        # the projection must belong to its block (no "attention.w1")
        if m and m.group("proj") in LORA_SITES[m.group("block").rsplit(".", 1)[1]]:
            return row[1 - src].format(block=m.group("block"), proj=m.group("proj"), adapter=adapter)
    return key


def official_to_peft_key(key: str, adapter: str = "default") -> str:
    """``layers.0.attention.lora_wq_l1.weight`` -> ``layers.0.attention.wq.lora_A.default.weight`` (no prefix)."""
    return _convert(key, 0, adapter)


def peft_to_official_key(key: str, adapter: str = "default") -> str:
    """Inverse of ``official_to_peft_key``; a leading ``base_model.model.`` is dropped."""
    return _convert(key.removeprefix(PEFT_PREFIX), 1, adapter)


def to_peft(model: Transformer, *, adapter_name: str = "default", dropout: float = 0.0) -> nn.Module:
    """Wrap ``model`` (native LoRA, not merged) with peft LoRA holding the same tensors; returns the PeftModel.

    The native pairs are removed from ``model`` (it is modified in place and owned by the PeftModel afterwards).
    peft freezes everything but LoRA; see ``mark_stage2_trainable`` for the reference's stage-2 set.
    """
    if not model.cfg.w_lora:
        raise ValueError("the model has no LoRA (w_lora=False)")
    if model.lora_merged:
        raise ValueError("LoRA is merged into the base weights; reload the checkpoint before training")
    lora = {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k}
    for layer in model.layers:
        for block_name, projs in LORA_SITES.items():
            block = getattr(layer, block_name)
            for proj in projs:
                setattr(block, f"lora_{proj}_l1", None)
                setattr(block, f"lora_{proj}_l2", None)
    rank = model.cfg.lora_rank
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=dropout, bias="none",
                        target_modules=TARGET_MODULES)
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    inner = peft_model.get_base_model()
    with torch.no_grad():
        for key, value in lora.items():
            inner.get_parameter(official_to_peft_key(key, adapter_name)).copy_(value)
    return peft_model


def official_state_dict(peft_model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """A peft-wrapped model's tensors under the official names (as the native model would save them)."""
    return {peft_to_official_key(k, adapter): v for k, v in peft_model.state_dict().items()}


def from_peft(peft_model: nn.Module, adapter: str = "default") -> Transformer:
    """Undo ``to_peft``: the native model with its LoRA pairs restored from peft's (possibly trained) A and B."""
    state = official_state_dict(peft_model, adapter)
    model: Transformer = peft_model.unload()
    cfg = model.cfg
    for i, layer in enumerate(model.layers):
        for block_name, projs in LORA_SITES.items():
            block = getattr(layer, block_name)
            for proj in projs:
                base: nn.Linear = getattr(block, proj)
                for part, shape in (("l1", (cfg.lora_rank, base.in_features)),
                                    ("l2", (base.out_features, cfg.lora_rank))):
                    weight = state[f"layers.{i}.{block_name}.lora_{proj}_{part}.weight"]
                    linear = nn.Linear(shape[1], shape[0], bias=False, device=weight.device, dtype=weight.dtype)
                    with torch.no_grad():
                        linear.weight.copy_(weight)
                    setattr(block, f"lora_{proj}_{part}", linear)
    model.requires_grad_(True)
    return model


def stage2_trainable(name: str) -> bool:
    """Stage 2 trains LLaMA's norms, biases and LoRA only (REFERENCE.md section 6); works for either layout."""
    return is_finetuned(name.removeprefix(PEFT_PREFIX))


def mark_stage2_trainable(model: nn.Module) -> int:
    """Set requires_grad on the LLaMA (native or peft) per ``stage2_trainable``; returns the trainable count."""
    count = 0
    for name, p in model.named_parameters():
        p.requires_grad_(stage2_trainable(name))
        count += p.numel() if p.requires_grad else 0
    return count
