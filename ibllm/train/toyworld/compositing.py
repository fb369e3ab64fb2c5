"""Stamps: premultiplied RGBA patches, composed into one another and pasted onto the canvas ("over")."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ibllm.train.toyworld.formats import IMAGE_SIZE


@dataclass
class _Stamp:
    """A premultiplied RGBA patch with the object's centre at (ay, ax); composited with the "over" operator."""

    premul: np.ndarray  # (h, w, 3) float32: colour x alpha
    alpha: np.ndarray  # (h, w) float32
    ay: int
    ax: int


def _clip(h: int, w: int, top: int, left: int) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]] | None:
    """Canvas and patch (rows, cols) where an (h, w) patch with its corner at (top, left) meets the canvas."""
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + h, IMAGE_SIZE), min(left + w, IMAGE_SIZE)
    if r0 >= r1 or c0 >= c1:
        return None
    return (r0, r1, c0, c1), (r0 - top, r1 - top, c0 - left, c1 - left)


def _corner(size: int, cx: float, cy: float) -> tuple[int, int]:
    return int(round(cy)) - size // 2, int(round(cx)) - size // 2


def _compose(parts: Sequence[tuple[_Stamp, int, int]]) -> _Stamp:
    """Stamps drawn in order at integer offsets (dy, dx) from a shared anchor, flattened into one stamp."""
    tops = [dy - s.ay for s, dy, _ in parts]
    lefts = [dx - s.ax for s, _, dx in parts]
    top, left = min(tops), min(lefts)
    h = max(t + s.alpha.shape[0] for t, (s, _, _) in zip(tops, parts, strict=True)) - top
    w = max(lf + s.alpha.shape[1] for lf, (s, _, _) in zip(lefts, parts, strict=True)) - left
    premul = np.zeros((h, w, 3), np.float32)
    alpha = np.zeros((h, w), np.float32)
    for (s, _, _), t, lf in zip(parts, tops, lefts, strict=True):
        r0, c0 = t - top, lf - left
        r1, c1 = r0 + s.alpha.shape[0], c0 + s.alpha.shape[1]
        keep = 1.0 - s.alpha
        premul[r0:r1, c0:c1] = premul[r0:r1, c0:c1] * keep[..., None] + s.premul
        alpha[r0:r1, c0:c1] = alpha[r0:r1, c0:c1] * keep + s.alpha
    return _Stamp(premul, alpha, -top, -left)


def _paste(canvas: np.ndarray, stamp: _Stamp, cx: float, cy: float) -> None:
    h, w = stamp.alpha.shape
    region = _clip(h, w, int(round(cy)) - stamp.ay, int(round(cx)) - stamp.ax)
    if region is None:
        return
    (r0, r1, c0, c1), (s0, s1, t0, t1) = region
    keep = 1.0 - stamp.alpha[s0:s1, t0:t1, None]
    canvas[r0:r1, c0:c1] = canvas[r0:r1, c0:c1] * keep + stamp.premul[s0:s1, t0:t1]


def _arc_stamp(radius: float) -> _Stamp:
    """Two curved strokes around a spinning object (a comic-style rotation cue), as a stamp."""
    width = max(2, int(radius / 12))
    r = 1.3 * radius
    size = 2 * int(math.ceil(r + width)) + 4
    c = size / 2
    overlay = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for start, end in ((200, 290), (20, 110)):
        draw.arc((c - r, c - r, c + r, c + r), start, end, fill=(235, 235, 235, 210), width=width)
    rgba = np.asarray(overlay, np.float32)
    alpha = rgba[..., 3] / 255.0
    return _Stamp(rgba[..., :3] * alpha[..., None], alpha, size // 2, size // 2)
