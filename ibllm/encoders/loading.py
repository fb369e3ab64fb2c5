"""Loading official encoder checkpoints into ``ImageBind``, strictly, through one key-mapping table.

Accepted layouts (REFERENCE.md sections 1, 3 and 5):
- ``imagebind_huge.pth``: the official keys, no point branch (pass ``require_point=False``);
- ``imagebind_w3D.pth``: the same plus ``point_trunk.*`` and the point head/post-processor, with or without
  ImageBind-LLM's ``image_bind.`` prefix;
- the standalone Point-Bind naming (``point_encoder.*``, ``pc_projection``, ``bind.modality_head_point.*``,
  ``bind.modality_postprocessor_point.*``), alone or next to an ImageBind file: pass several sources.

To avoid holding the weights twice, build the model on the meta device and let the tensors be assigned from
the memory-mapped file::

    with torch.device("meta"):
        model = ImageBind(cfg)
    load_imagebind_weights(model, "imagebind_w3D.pth")  # assign=True is implied for a meta model
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ibllm.checkpoint import CheckpointError, load_strict, read_state_dict
from ibllm.encoders.imagebind import ImageBind

# Foreign name prefix -> official name prefix. The first matching row renames a key; keys matching no row must
# already be official. Anything that does not end up as a key of the model is an error.
KEY_MAP: tuple[tuple[str, str], ...] = (
    ("image_bind.", ""),  # ImageBind-LLM's attribute name (imagebind_w3D.pth as saved inside the LLM)
    ("point_encoder.", "point_trunk.point_encoder."),  # standalone Point-Bind
    ("pc_projection", "point_trunk.pc_projection"),
    ("bind.modality_head_point.", "modality_heads.point."),
    ("bind.modality_postprocessor_point.", "modality_postprocessors.point."),
)

# Everything that belongs to the 3D branch (absent from imagebind_huge.pth).
POINT_PREFIXES = ("point_trunk.", "modality_heads.point.", "modality_postprocessors.point.")

StateSource = str | Path | Mapping[str, torch.Tensor]


def official_key(key: str) -> str:
    """The official (unprefixed ImageBind) name of a checkpoint key, through KEY_MAP."""
    for src, dst in KEY_MAP:
        if key.startswith(src):
            return dst + key[len(src):]
    return key


def _read(source: StateSource) -> tuple[str, Mapping[str, torch.Tensor]]:
    if isinstance(source, Mapping):
        return "state dict", source
    return str(source), read_state_dict(source)


def to_official_keys(states: Sequence[tuple[str, Mapping[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Merge several (name, state) pairs under official names (two sources may not give the same key)."""
    merged: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for what, state in states:
        for key, tensor in state.items():
            name = official_key(key)
            if name in merged:
                raise CheckpointError(f"{what}: key {key!r} gives {name!r}, already provided by {origin[name]!r}")
            merged[name] = tensor
            origin[name] = f"{what}:{key}" if len(states) > 1 else key
    return merged


def load_imagebind_weights(model: ImageBind, source: StateSource | Sequence[StateSource], *,
                           require_point: bool = True, assign: bool | None = None) -> list[str]:
    """Load one or several checkpoints (paths or state dicts) into ``model`` strictly.

    Unknown keys, missing keys and shape mismatches raise CheckpointError naming them. With
    ``require_point=False`` a checkpoint without any point-branch key (``imagebind_huge.pth``) is accepted: the
    point branch is left randomly initialised (materialised if the model was on the meta device) and
    ``model.point_weights_loaded`` becomes False, so encoding a point cloud raises instead of returning noise.
    A partial point branch is always an error. ``assign`` defaults to True for a model with meta tensors.
    Returns the official keys that were left unloaded (the point branch, or nothing).
    """
    sources = [source] if isinstance(source, (str, Path, Mapping)) else list(source)
    if not sources:
        raise CheckpointError("no checkpoint given")
    states = [_read(s) for s in sources]
    what = " + ".join(w for w, _ in states)
    state = to_official_keys(states)

    own = model.state_dict()
    has_point = any(k.startswith(POINT_PREFIXES) for k in state)
    skip_point = not require_point and not has_point  # a partial point branch stays an error
    if assign is None:
        assign = any(t.is_meta for t in own.values())
    try:
        load_strict(model, state, what, allow_missing=POINT_PREFIXES if skip_point else (), assign=assign)
    except CheckpointError as exc:
        if require_point and not has_point:
            raise CheckpointError(f"{exc} (a checkpoint without the point encoder, e.g. imagebind_huge.pth, needs "
                                  "require_point=False)") from None
        raise
    point_keys = [k for k in own if k.startswith(POINT_PREFIXES)]
    model.point_weights_loaded = not skip_point
    if skip_point:
        _materialise_point_branch(model, device=next(iter(state.values())).device)
        return sorted(point_keys)
    return []


def _materialise_point_branch(model: ImageBind, device: torch.device) -> None:
    """Give a meta-device point branch real (random) storage so the module stays movable and usable for training."""
    parts = (model.point_trunk, model.modality_heads["point"], model.modality_postprocessors["point"])
    if any(t.is_meta for part in parts for t in part.state_dict().values()):
        for part in parts:
            part.to_empty(device=device)
        model.reset_modality("point")
