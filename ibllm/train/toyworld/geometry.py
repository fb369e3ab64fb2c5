"""3D shapes: signed distances (for rendering) and surface samples (for point clouds); rotations.

Object space is y-up, every shape fits in a radius of about 1.15 so sizes are comparable across shapes.
"""

from __future__ import annotations

import math

import numpy as np

_CUBE_HALF = 0.62
_CYL_R, _CYL_H = 0.62, 0.68
_CONE_R, _CONE_TOP, _CONE_BOT = 0.8, 0.9, -0.7
_PYR_B, _PYR_TOP, _PYR_BOT = 0.72, 0.85, -0.55
_TOR_R, _TOR_r = 0.68, 0.3
_SPRITE_EXTENT = 1.2


def _sdf(shape: str, p: np.ndarray) -> np.ndarray:
    """Signed distance (or a lower bound of it, which sphere tracing also accepts) from points (N, 3)."""
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    if shape == "sphere":
        return np.sqrt(x * x + y * y + z * z) - 0.95
    if shape == "cube":
        qx, qy, qz = np.abs(x) - _CUBE_HALF, np.abs(y) - _CUBE_HALF, np.abs(z) - _CUBE_HALF
        outside = np.sqrt(np.maximum(qx, 0.0) ** 2 + np.maximum(qy, 0.0) ** 2 + np.maximum(qz, 0.0) ** 2)
        return outside + np.minimum(np.maximum(np.maximum(qx, qy), qz), 0.0)
    if shape == "cylinder":
        dr = np.sqrt(x * x + z * z) - _CYL_R
        dy = np.abs(y) - _CYL_H
        return np.minimum(np.maximum(dr, dy), 0.0) + np.sqrt(np.maximum(dr, 0) ** 2 + np.maximum(dy, 0) ** 2)
    if shape == "cone":
        h = _CONE_TOP - _CONE_BOT
        side = (np.sqrt(x * x + z * z) * h + (y - _CONE_TOP) * _CONE_R) / math.hypot(h, _CONE_R)
        return np.maximum(side, _CONE_BOT - y)
    if shape == "pyramid":
        h = _PYR_TOP - _PYR_BOT
        norm = math.hypot(h, _PYR_B)
        sx = (np.abs(x) * h + (y - _PYR_TOP) * _PYR_B) / norm
        sz = (np.abs(z) * h + (y - _PYR_TOP) * _PYR_B) / norm
        return np.maximum(np.maximum(sx, sz), _PYR_BOT - y)
    if shape == "torus":
        return np.sqrt((np.sqrt(x * x + z * z) - _TOR_R) ** 2 + y * y) - _TOR_r
    raise ValueError(shape)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _triangle_samples(rng: np.random.Generator, tris: np.ndarray, n: int) -> np.ndarray:
    """n points uniform over the union of triangles (T, 3, 3), area-weighted."""
    areas = 0.5 * np.linalg.norm(np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0]), axis=1)
    idx = rng.choice(len(tris), n, p=areas / areas.sum())
    r1, r2 = rng.random(n), rng.random(n)
    flip = r1 + r2 > 1
    r1[flip], r2[flip] = 1 - r1[flip], 1 - r2[flip]
    t = tris[idx]
    return t[:, 0] + r1[:, None] * (t[:, 1] - t[:, 0]) + r2[:, None] * (t[:, 2] - t[:, 0])


def surface_points(shape: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """n points uniform over the surface of ``shape`` in object space (same dimensions as the renders)."""
    if shape == "sphere":
        return 0.95 * _unit(rng.standard_normal((n, 3)))
    if shape == "cube":
        a = _CUBE_HALF
        axis, sign = rng.integers(0, 3, n), rng.choice([-1.0, 1.0], n)
        p = rng.uniform(-a, a, (n, 3))
        p[np.arange(n), axis] = sign * a
        return p
    if shape in ("cylinder", "cone"):
        if shape == "cylinder":
            r, side_area, cap_area = _CYL_R, 2 * math.pi * _CYL_R * 2 * _CYL_H, 2 * math.pi * _CYL_R**2
        else:
            r = _CONE_R
            side_area = math.pi * r * math.hypot(r, _CONE_TOP - _CONE_BOT)
            cap_area = math.pi * r**2
        on_side = rng.random(n) < side_area / (side_area + cap_area)
        theta = rng.uniform(0, 2 * math.pi, n)
        u = rng.random(n)
        if shape == "cylinder":
            rad = np.where(on_side, r, r * np.sqrt(u))
            y = np.where(on_side, rng.uniform(-_CYL_H, _CYL_H, n), rng.choice([-_CYL_H, _CYL_H], n))
        else:
            # Uniform on a cone's side: the distance from the apex goes as sqrt(u).
            frac = np.sqrt(u)
            rad = np.where(on_side, r * frac, r * np.sqrt(u))
            y = np.where(on_side, _CONE_TOP - frac * (_CONE_TOP - _CONE_BOT), _CONE_BOT)
        return np.stack([rad * np.cos(theta), y, rad * np.sin(theta)], axis=1)
    if shape == "pyramid":
        b, top, bot = _PYR_B, _PYR_TOP, _PYR_BOT
        apex = np.array([0.0, top, 0.0])
        c = np.array([[b, bot, b], [-b, bot, b], [-b, bot, -b], [b, bot, -b]])
        tris = [np.stack([c[i], c[(i + 1) % 4], apex]) for i in range(4)]
        tris += [np.stack([c[0], c[1], c[2]]), np.stack([c[0], c[2], c[3]])]
        return _triangle_samples(rng, np.stack(tris), n)
    if shape == "torus":
        # Area element is proportional to (R + r cos v): rejection-sample v to stay uniform on the surface.
        out = np.empty((0, 3))
        while len(out) < n:
            m = 2 * (n - len(out)) + 16
            u, v = rng.uniform(0, 2 * math.pi, m), rng.uniform(0, 2 * math.pi, m)
            keep = rng.random(m) < (_TOR_R + _TOR_r * np.cos(v)) / (_TOR_R + _TOR_r)
            u, v = u[keep], v[keep]
            ring = _TOR_R + _TOR_r * np.cos(v)
            out = np.concatenate([out, np.stack([ring * np.cos(u), _TOR_r * np.sin(v), ring * np.sin(u)], 1)])
        return out[:n]
    raise ValueError(shape)


def _rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_y(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
