"""Thermal image -> (1, S, S) float32 for the thermal encoder (S = cfg.image_size).

The reference ships no thermal loader; ImageBind's thermal data (LLVIP) are 8-bit single-channel infrared
images, so a thermal upload is handled as a grayscale photo:

1. decode with the image validation of ``image.py`` (EXIF orientation, first frame, alpha onto white);
2. to one channel: 8-bit gray as is; colour (a false-colour palette) -> luminance (palettes such as "iron" are
   only roughly monotonic in temperature: upload the grayscale export when you can); 16-bit / float
   radiometric images -> linear stretch of their 1st..99th percentile to 0..255 (what a camera's automatic
   gain does for display);
3. PIL bicubic resize of the short side to S, centre crop S x S, scale to [0, 1];
4. normalise with mean 0.4489 / std 0.2686: the averages of CLIP's three channel means/stds, so the values
   fall in the same range the vision branch sees for a gray photo.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ibllm.config import ImageBindConfig
from ibllm.media.image import (
    CLIP_MEAN,
    CLIP_STD,
    center_crop,
    normalize_,
    open_image,
    pil_to_unit_tensor,
    resize_short_side,
    to_gray,
)
from ibllm.media.limits import DEFAULT_LIMITS, Limits

THERMAL_MEAN = sum(CLIP_MEAN) / 3
THERMAL_STD = sum(CLIP_STD) / 3


def thermal_gray(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit L following step 2."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        lo, hi = np.percentile(arr, [1, 99])
        if hi <= lo:
            lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
    return to_gray(img)


def thermal_to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    gray = center_crop(resize_short_side(thermal_gray(img), size, Image.BICUBIC), size)
    return normalize_(pil_to_unit_tensor(gray), (THERMAL_MEAN,), (THERMAL_STD,))


def load_thermal(path: str | Path, cfg: ImageBindConfig | None = None, limits: Limits = DEFAULT_LIMITS
                 ) -> torch.Tensor:
    """Thermal image file -> (1, S, S) float32 (see the module docstring)."""
    cfg = cfg or ImageBindConfig()
    return thermal_to_tensor(open_image(path, limits), cfg.image_size)


__all__ = ["load_thermal", "thermal_to_tensor", "thermal_gray", "THERMAL_MEAN", "THERMAL_STD"]
