"""Reading checkpoint files without materialising them twice.

``.pth``/``.pt`` files load with ``torch.load(weights_only=True, mmap=True)``: no pickle code runs and the
tensors stay backed by the file until used, so a 4.9 GB checkpoint costs ~1x its size. ``.safetensors`` files
are memory-mapped by safetensors itself. Anything else is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model. The message names the file and keys."""


def read_state_dict(path: str | Path, *, unwrap: Iterable[str] = ("model", "state_dict")) -> dict[str, torch.Tensor]:
    """Return the tensors of a checkpoint file.

    Official files nest their tensors (``7B.pth`` is ``{'model': {...}}``); the first key of ``unwrap`` found at
    the top level is descended into.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix not in {".pth", ".pt", ".bin"}:
        raise CheckpointError(f"{path}: unsupported checkpoint format (expected .pth, .pt, .bin or .safetensors)")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        # Files written with the legacy (non-zip) serialisation cannot be memory-mapped; load them plainly.
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - re-raised with the file name
            raise CheckpointError(f"{path}: cannot read as a weights-only checkpoint: {exc}") from exc
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot read as a weights-only checkpoint: {exc}") from exc
    for key in unwrap:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: non-tensor entries {bad[:10]}")
    return dict(obj)


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys under ``prefix`` with it removed; other keys are dropped."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def describe_key_mismatch(missing: Iterable[str], unexpected: Iterable[str], what: str, limit: int = 20) -> str:
    """A readable error message naming the offending keys."""
    missing, unexpected = sorted(missing), sorted(unexpected)
    parts = [f"{what} does not match the model"]
    if missing:
        more = f" (+{len(missing) - limit} more)" if len(missing) > limit else ""
        parts.append(f"missing keys: {missing[:limit]}{more}")
    if unexpected:
        more = f" (+{len(unexpected) - limit} more)" if len(unexpected) > limit else ""
        parts.append(f"unexpected keys: {unexpected[:limit]}{more}")
    return "; ".join(parts)


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str, *,
                allow_missing: Iterable[str] = (), assign: bool = False) -> None:
    """``load_state_dict`` that raises CheckpointError naming every missing/unexpected key and shape mismatch.

    ``allow_missing`` lists key prefixes that may be absent (e.g. frozen parts shipped in another file).
    """
    own = module.state_dict()
    allowed = tuple(allow_missing)
    missing = [k for k in own if k not in state and not k.startswith(allowed)] if allowed else \
        [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(describe_key_mismatch(missing, unexpected, what))
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
              if tuple(v.shape) != tuple(own[k].shape)]
    if shapes:
        raise CheckpointError(f"{what}: shape mismatch: " + "; ".join(shapes[:20]))
    module.load_state_dict(dict(state), strict=False, assign=assign)
