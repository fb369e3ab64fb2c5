"""Checkpoint files: reading them without materialising them twice, and the one strict loader.

``.pth``/``.pt`` files load with ``torch.load(weights_only=True, mmap=True)``: no pickle code runs and the
tensors stay backed by the file until used, so a 4.9 GB checkpoint costs ~1x its size. ``.safetensors`` files
are memory-mapped by safetensors itself. Anything else is refused.

``load_strict`` is the only place where a state dict meets a module: names go through a ``KeyTable`` (official
name <-> this code's name), and every missing or unexpected key and every shape mismatch is an error naming them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file


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


class KeyTable:
    """Official checkpoint names <-> this code's names, one row per renamed key or family of keys.

    A row is ``(official, ours)``; ``{}`` in both stands for the same number (a layer index), as litgpt's
    templates. Keys that match no row have the same name in both layouts.
    """

    def __init__(self, rows: Iterable[tuple[str, str]] = ()):
        self.rows = tuple(rows)
        self._to_ours = [(self._pattern(official), ours) for official, ours in self.rows]
        self._to_official = [(self._pattern(ours), official) for official, ours in self.rows]

    @staticmethod
    def _pattern(template: str) -> re.Pattern[str]:
        return re.compile(re.escape(template).replace(r"\{\}", r"(\d+)") + "$")

    @staticmethod
    def _rename(key: str, patterns: list[tuple[re.Pattern[str], str]]) -> str:
        for pattern, target in patterns:
            m = pattern.match(key)
            if m:
                return target.format(*m.groups())
        return key

    def to_ours(self, key: str) -> str:
        return self._rename(key, self._to_ours)

    def to_official(self, key: str) -> str:
        return self._rename(key, self._to_official)

    def __add__(self, other: KeyTable) -> KeyTable:
        return KeyTable(self.rows + other.rows)

    def under(self, prefix: str) -> KeyTable:
        """The same renames for a submodule mounted at ``prefix`` (e.g. ``"llama."``)."""
        return KeyTable((prefix + official, prefix + ours) for official, ours in self.rows)


NO_RENAMES = KeyTable()


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str, *,
                table: KeyTable = NO_RENAMES, allow_missing: Iterable[str] = (), assign: bool = False) -> list[str]:
    """Load a state dict in the official layout into ``module``, strictly.

    Names go through ``table``; missing keys (except those starting with an ``allow_missing`` prefix, in official
    names), unexpected keys and shape mismatches raise CheckpointError naming them in official names.
    ``assign=True`` keeps the given tensors (memory-mapped, or meta-built models). Returns the allowed missing keys.
    """
    own = module.state_dict()
    ours = {table.to_ours(k): v for k, v in state.items()}
    if len(ours) != len(state):
        raise CheckpointError(f"{what}: two keys map to the same parameter")
    allowed = tuple(allow_missing)
    missing_all = [table.to_official(k) for k in own if k not in ours]
    missing = [k for k in missing_all if not (allowed and k.startswith(allowed))]
    unexpected = [k for k, mine in zip(state, ours, strict=True) if mine not in own]
    if missing or unexpected:
        raise CheckpointError(describe_key_mismatch(missing, unexpected, what))
    shapes = [f"{table.to_official(k)}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in ours.items()
              if tuple(v.shape) != tuple(own[k].shape)]
    if shapes:
        raise CheckpointError(f"{what}: shape mismatch: " + "; ".join(shapes[:20]))
    module.load_state_dict(ours, strict=False, assign=assign)
    return sorted(set(missing_all) - set(missing))
