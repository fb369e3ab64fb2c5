"""One object sphere-traced (orthographic) into a "sprite": coverage, shading, height and normal per pixel."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ibllm.train.toyworld.geometry import _SPRITE_EXTENT, _sdf, _unit


@dataclass
class _Sprite:
    """One object rendered around its own centre; arrays are (2S, 2S)."""

    alpha: np.ndarray  # coverage 0..1 (anti-aliased from the closest approach of missing rays)
    shade: np.ndarray  # diffuse light x surface stripes, multiplies the colour
    spec: np.ndarray  # specular highlight, added as white
    z: np.ndarray  # camera-space height towards the camera, in object units
    nz: np.ndarray  # normal's component towards the camera (thermal limb darkening)


def _render_sprite(shape: str, rot: np.ndarray, radius_px: float, light: np.ndarray) -> _Sprite:
    half = int(math.ceil(_SPRITE_EXTENT * radius_px)) + 1
    coords = (np.arange(2 * half) + 0.5 - half) / radius_px
    u, v = np.meshgrid(coords, -coords)  # v up, rows down
    n_pix = u.size
    # Camera space: the camera looks down -z from z = 2. p_obj = rot^T p_cam, i.e. row vectors times rot.
    origin = np.stack([u.ravel(), v.ravel(), np.full(n_pix, 2.0)], axis=1) @ rot
    direction = np.array([0.0, 0.0, -1.0]) @ rot
    # March only inside the object's bounding sphere: rays outside it are skipped (a third of the sprite),
    # the others start where they enter it and stop where they leave it.
    r2 = u.ravel() ** 2 + v.ravel() ** 2
    chord = np.sqrt(np.maximum(_SPRITE_EXTENT**2 - r2, 0.0))
    t = 2.0 - chord
    t_exit = 2.0 + chord
    dmin = np.full(n_pix, np.inf)
    t_at_min = t.copy()
    hit = np.zeros(n_pix, dtype=bool)
    eps = 0.2 / radius_px
    idx = np.flatnonzero(r2 < _SPRITE_EXTENT**2)
    for _ in range(48):
        if idx.size == 0:
            break
        d = _sdf(shape, origin[idx] + t[idx, None] * direction)
        better = d < dmin[idx]
        dmin[idx[better]] = d[better]
        t_at_min[idx[better]] = t[idx[better]]
        done = d < eps
        hit[idx[done]] = True
        t[idx] += np.maximum(d, 0.25 * eps)
        idx = idx[~done & (t[idx] < t_exit[idx])]
    # Coverage: a full pixel on a hit, else how close the ray passed (half a pixel either side of the edge).
    alpha = np.where(hit, 1.0, np.clip(0.5 - dmin * radius_px, 0.0, 1.0))
    shade = np.zeros(n_pix)
    spec = np.zeros(n_pix)
    zc = np.full(n_pix, -10.0)
    nzc = np.zeros(n_pix)
    lit = np.flatnonzero(alpha > 0)
    if lit.size:
        p = origin[lit] + t_at_min[lit, None] * direction
        # Normal from the tetrahedron of finite differences (4 evaluations instead of 6).
        h = 1e-3
        taps = np.array([[1, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, 1, 1]], dtype=float)
        grad = sum(k * _sdf(shape, p + h * k)[:, None] for k in taps)
        n_cam = _unit(grad) @ rot.T
        lambert = np.clip(n_cam @ light, 0.0, 1.0)
        half_vec = _unit(light + np.array([0.0, 0.0, 1.0]))
        # Stripes around the object's own axis: they make a spinning sphere visibly spin.
        stripe = np.where((np.floor(np.arctan2(p[:, 2], p[:, 0]) / (math.pi / 4)) % 2) == 0, 1.0, 0.8)
        shade[lit] = (0.28 + 0.8 * lambert) * stripe
        spec[lit] = 0.45 * np.clip(n_cam @ half_vec, 0.0, 1.0) ** 30
        zc[lit] = 2.0 - t_at_min[lit]
        nzc[lit] = np.clip(n_cam[:, 2], 0.0, 1.0)
    shape2 = (2 * half, 2 * half)
    return _Sprite(alpha.reshape(shape2), shade.reshape(shape2), spec.reshape(shape2), zc.reshape(shape2),
                   nzc.reshape(shape2))
