"""Numerical parity against a fixture produced by the reference implementation.

``python -m ibllm parity DIR`` loads ``DIR/config.json`` and the official-layout weights in DIR, runs every
check group below and prints the max absolute difference of each expected tensor. Each group is a function
``(Fixture) -> Iterator[Comparison]`` living next to the code it checks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ibllm.parity import encoders, endtoend, language, preprocessing
from ibllm.parity.fixture import Comparison, Fixture, build_network

CheckGroup = Callable[[Fixture], Iterator[Comparison]]


GROUPS: tuple[tuple[str, CheckGroup], ...] = (
    ("encoders", encoders.checks),
    ("preprocessing", preprocessing.checks),
    ("language", language.checks),
    ("end-to-end", endtoend.checks),
)


def check_groups() -> list[tuple[str, CheckGroup]]:
    return list(GROUPS)


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


__all__ = ["Comparison", "Fixture", "build_network", "run", "report", "check_groups"]
