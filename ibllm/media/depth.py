"""Depth map -> (1, S, S) float32 for the depth encoder (S = cfg.image_size).

The reference ships no depth loader; ImageBind was trained on disparity (inverse depth) maps of SUN RGB-D /
NYU, computed with each sensor's focal length and baseline, which an uploaded file never comes with. So:

1. values -> disparity (larger = nearer):
   - 16-bit PNG or TIFF (and 32-bit integer images): metric depth in **millimetres** (Kinect / RealSense / NYU /
     TUM convention), disparity = 1 / depth_m with depth clipped to [0.01, 50] m;
   - ``.npy`` / ``.npz`` (H, W), (1, H, W) or (H, W, 1), and floating-point TIFF: metric depth in **metres**, same
     conversion;
   - 8-bit PNG/JPEG (gray or colour -> luminance): a depth *visualisation* as exported by monocular estimators
     (MiDaS, DPT, Depth Anything), which are already relative inverse depth (brighter = nearer): used as is;
   - zero, negative or non-finite depth = missing measurement -> disparity 0 (as far as possible);
2. short side resized to S (bilinear, antialiased), centre crop S x S (same geometry as images);
3. standardised per image: ``(x - mean) / std`` over the crop. This removes the unknown scale (focal length x
   baseline, units) and keeps the scene's relative structure; a constant map becomes all zeros.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ibllm.config import ImageBindConfig
from ibllm.media.arrays import ARRAY_FORMATS, array_header, read_array
from ibllm.media.errors import MediaError
from ibllm.media.image import open_image, to_gray
from ibllm.media.limits import DEFAULT_LIMITS, Limits
from ibllm.media.validate import IMAGE_FORMATS, check_aspect, check_file, require_format

MIN_DEPTH_M, MAX_DEPTH_M = 0.01, 50.0


def depth_to_disparity(depth_m: np.ndarray) -> np.ndarray:
    valid = np.isfinite(depth_m) & (depth_m > 0)
    out = np.zeros(depth_m.shape, dtype=np.float64)
    out[valid] = 1.0 / np.clip(depth_m[valid], MIN_DEPTH_M, MAX_DEPTH_M)
    return out


def resize_crop_map(x: np.ndarray, size: int) -> torch.Tensor:
    """(H, W) float map -> (1, size, size): short side to ``size`` (bilinear, antialiased), centre crop."""
    h, w = x.shape
    short, long = min(h, w), max(h, w)
    new_long = int(size * long / short)
    new_h, new_w = (size, new_long) if h <= w else (new_long, size)
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
    t = torch.nn.functional.interpolate(t, size=(new_h, new_w), mode="bilinear", align_corners=False,
                                        antialias=True)[0]
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return t[:, top : top + size, left : left + size].contiguous()


def standardize(x: torch.Tensor) -> torch.Tensor:
    std = x.std(unbiased=False)
    return (x - x.mean()) / std if float(std) > 1e-12 else torch.zeros_like(x)


def read_disparity(path: str | Path, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """Any accepted depth file -> (H, W) float64 disparity-like map (see step 1)."""
    p = Path(path)
    check_file(p, limits)
    fmt = require_format(p, IMAGE_FORMATS + ARRAY_FORMATS, "a depth map")
    if fmt in ARRAY_FORMATS:
        shape, _ = array_header(p)
        squeezed = [d for d in shape if d != 1]
        if len(squeezed) != 2 or len(shape) > 3:
            raise MediaError(f"{p.name}: a depth array must be (H, W), (1, H, W) or (H, W, 1); this one is {shape}")
        if squeezed[0] * squeezed[1] > limits.max_image_pixels:
            raise MediaError(f"{p.name}: {squeezed[0]}x{squeezed[1]} depth values exceed the limit of "
                             f"{limits.max_image_pixels / 1e6:.0f} megapixels")
        check_aspect(squeezed[1], squeezed[0], limits, p.name, "a depth map")
        depth = read_array(p, limits, "depth map").astype(np.float64).reshape(squeezed)
        return depth_to_disparity(depth)
    img = open_image(p, limits)
    if img.mode.startswith("I;16") or img.mode == "I":
        return depth_to_disparity(np.asarray(img, dtype=np.float64) / 1000.0)
    if img.mode == "F":  # a floating-point TIFF: metres, as a .npy
        return depth_to_disparity(np.asarray(img, dtype=np.float64))
    return np.asarray(to_gray(img), dtype=np.float64) / 255.0


def disparity_to_tensor(disparity: np.ndarray, size: int, name: str = "depth map") -> torch.Tensor:
    if disparity.ndim != 2 or min(disparity.shape) < 1:
        raise MediaError(f"{name}: expected a 2-D map, got shape {disparity.shape}")
    if not (disparity > 0).any():
        raise MediaError(f"{name}: the depth map holds no valid (positive, finite) depth value")
    return standardize(resize_crop_map(disparity, size))


def load_depth(path: str | Path, cfg: ImageBindConfig | None = None, limits: Limits = DEFAULT_LIMITS) -> torch.Tensor:
    """Depth file -> (1, S, S) float32 standardised disparity (see the module docstring)."""
    cfg = cfg or ImageBindConfig()
    return disparity_to_tensor(read_disparity(path, limits), cfg.image_size, Path(path).name)


__all__ = ["load_depth", "read_disparity", "depth_to_disparity", "disparity_to_tensor", "resize_crop_map",
           "standardize"]
