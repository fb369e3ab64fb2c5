"""A parity fixture on disk (shared/fixtures/parity-a/README.md) and one compared tensor."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ibllm.config import ModelConfig, from_reference_json
from ibllm.media.point import is_normalized
from ibllm.model import ImageBindLLM


def point_input_case(xyz: np.ndarray) -> tuple[bool, str]:
    """Whether the loader passes a fixture's point cloud through unchanged, and a note that says which case applied.

    The reference feeds ``.npy`` points as they are; ours does too when the cloud is already normalised (unit
    radius, centred: ``media.point.is_normalized``) and otherwise applies its documented normalisation. Parity
    rows compare against the reference's tensor or, for other clouds, against that tensor normalised the same way.
    """
    if is_normalized(xyz):
        return True, "already normalised: passed through unchanged, as the reference"
    radius = float(np.sqrt(((xyz - xyz.mean(axis=0)) ** 2).sum(axis=1)).max())
    offset = float(np.linalg.norm(xyz.mean(axis=0)))
    return False, (f"not normalised (radius {radius:.3g} about a centroid {offset:.3g} from the origin): "
                   "compared after the loader's documented normalisation")


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


def build_network(fx: Fixture) -> ImageBindLLM:
    """The whole model from the fixture's official-layout state dict, through the app's strict loader."""
    with torch.device("meta"):
        net = ImageBindLLM(fx.config)
    net.load_official(fx.state_dict, what="parity fixture", assign=True)
    return net.eval()
