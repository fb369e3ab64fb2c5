"""Point clouds: one object's surface samples, as Point-Bind expects them."""

from __future__ import annotations

import math

import numpy as np

from ibllm.train.toyworld.formats import POINTS
from ibllm.train.toyworld.geometry import _rot_y, surface_points
from ibllm.train.toyworld.latents import Scene, _modality_rng


def render_points(scene: Scene, n: int = POINTS) -> np.ndarray:
    """(n, 3) float32: one object's surface, random yaw, centred at the mean, max radius 1 (Point-Bind's norm)."""
    rng = _modality_rng(scene, "point")
    pts = surface_points(scene.shape, n, rng) @ _rot_y(rng.uniform(0, 2 * math.pi)).T
    pts = pts + rng.normal(0.0, 0.004, pts.shape)
    pts = pts - pts.mean(axis=0)
    pts = pts / np.linalg.norm(pts, axis=1).max()
    return pts.astype(np.float32)
