"""Numerical parity against a fixture produced by the reference implementation.

``python -m ibllm parity DIR`` loads ``DIR/config.json`` and the official-layout weights in DIR, runs every
check group below and prints the max absolute difference of each expected tensor. Each group is a function
``(Fixture) -> Iterator[Comparison]`` living next to the code it checks.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import load_file

from ibllm.config import ModelConfig, from_reference_json


@dataclass
class Comparison:
    """One expected tensor against ours. Integer tensors must match exactly (tol 0)."""

    name: str
    actual: torch.Tensor
    expected: torch.Tensor
    tol: float = 1e-4
    note: str = ""

    @property
    def max_abs_diff(self) -> float:
        if self.actual.shape != self.expected.shape:
            return float("inf")
        if self.actual.numel() == 0:
            return 0.0
        return (self.actual.double() - self.expected.double()).abs().max().item()

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tol


class Fixture:
    """Lazy access to a parity fixture directory (see shared/fixtures/parity-a/README.md)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not (self.root / "config.json").is_file():
            raise FileNotFoundError(f"{self.root}/config.json not found: not a parity fixture directory")

    @cached_property
    def raw_config(self) -> dict:
        return json.loads((self.root / "config.json").read_text())

    @cached_property
    def config(self) -> ModelConfig:
        return from_reference_json(self.root / "config.json")

    @cached_property
    def inputs(self) -> dict[str, torch.Tensor]:
        return load_file(self.root / "inputs.safetensors")

    @cached_property
    def expected(self) -> dict[str, torch.Tensor]:
        return load_file(self.root / "expected.safetensors")

    @cached_property
    def state_dict(self) -> dict[str, torch.Tensor]:
        return load_file(self.root / "model.safetensors")

    @cached_property
    def knn_vectors(self) -> torch.Tensor:
        return load_file(self.root / "knn_cache.safetensors")["vectors"]

    @cached_property
    def preprocessed(self) -> dict[str, torch.Tensor]:
        return load_file(self.root / "preprocessing" / "preprocessed.safetensors")

    @property
    def media_dir(self) -> Path:
        return self.root / "preprocessing"

    @property
    def fps_seed(self) -> int:
        return int(self.raw_config["seeds"]["fps_seed"])


CheckGroup = Callable[[Fixture], Iterator[Comparison]]


def check_groups() -> list[tuple[str, CheckGroup]]:
    """Every check group that exists so far (imported lazily so a missing part does not break the others)."""
    groups: list[tuple[str, CheckGroup]] = []
    for title, module_name in (
        ("encoders", "ibllm.parity.encoders"),
        ("preprocessing", "ibllm.parity.preprocessing"),
        ("language", "ibllm.parity.language"),
        ("end-to-end", "ibllm.parity.endtoend"),
    ):
        try:
            module = __import__(module_name, fromlist=["checks"])
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        groups.append((title, module.checks))
    return groups


def run(root: str | Path, only: str | None = None) -> list[Comparison]:
    fixture = Fixture(root)
    results: list[Comparison] = []
    with torch.no_grad():
        for title, group in check_groups():
            if only and title != only:
                continue
            results.extend(group(fixture))
    return results


def report(results: list[Comparison]) -> str:
    width = max((len(r.name) for r in results), default=10)
    lines = []
    for r in results:
        status = "ok  " if r.ok else "FAIL"
        shape = ""
        if r.actual.shape != r.expected.shape:
            shape = f"  shape {tuple(r.actual.shape)} != {tuple(r.expected.shape)}"
        note = f"  ({r.note})" if r.note else ""
        lines.append(f"{status} {r.name:<{width}}  max|diff| {r.max_abs_diff:.3e}  tol {r.tol:.0e}{shape}{note}")
    failed = sum(not r.ok for r in results)
    lines.append(f"{len(results) - failed} of {len(results)} tensors within tolerance")
    return "\n".join(lines)
