"""Image file -> (3, S, S) float32 for the vision encoder (S = cfg.image_size, 224 for ImageBind-Huge).

Pipeline (REFERENCE.md section 2, the reference's ``load_and_transform_vision_data``): decode, RGB, PIL
bicubic resize of the short side to S (long side ``int(S * long / short)``), centre crop S x S (offsets
rounded half to even, as torchvision), scale to [0, 1], normalise with CLIP's mean/std.

What this adds to the reference, all before the pipeline above:
- only the first frame of an animated GIF/WebP is used;
- the EXIF orientation tag is applied (phone photos come out upright);
- transparency is flattened onto **white** (the reference's ``convert("RGB")`` just drops alpha, which shows
  whatever colour the transparent pixels happen to store, often black);
- 16-bit / 32-bit grayscale images are scaled to 8 bits by their range (PIL's own conversion would clip).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ibllm.config import ImageBindConfig
from ibllm.media.errors import MediaError
from ibllm.media.limits import DEFAULT_LIMITS, Limits
from ibllm.media.validate import IMAGE_FORMATS, check_aspect, check_file, require_format

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def open_image(path: str | Path, limits: Limits = DEFAULT_LIMITS) -> Image.Image:
    """Validated, fully decoded first frame with EXIF orientation applied (any PIL mode)."""
    name = Path(path).name
    check_file(path, limits)
    require_format(path, IMAGE_FORMATS, "an image")
    try:
        # Image.open reads only the header. PIL itself warns above Image.MAX_IMAGE_PIXELS (89 Mpx) and refuses
        # twice that; our own limit (lower by default) is checked here, before any pixel is decoded. (No
        # warnings.catch_warnings: it is not thread-safe, and the chat server decodes uploads concurrently.)
        with Image.open(path) as src:
            width, height = src.size
            if width <= 0 or height <= 0:
                raise MediaError(f"{name} declares an empty image ({width}x{height} pixels)")
            if width * height > limits.max_image_pixels:
                raise MediaError(
                    f"{name} declares {width}x{height} = {width * height / 1e6:.0f} megapixels; the limit is "
                    f"{limits.max_image_pixels / 1e6:.0f} megapixels. Downscale the image and upload it again."
                )
            check_aspect(width, height, limits, name, "an image")
            src.seek(0)  # first frame of an animation
            src.load()
            img = ImageOps.exif_transpose(src)  # a copy: the file is closed when this block ends
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL refuses the largest itself, in Image.open, before our check: say it in our words, with our limit.
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(declared.group(1)) / 1e6:.0f} megapixels" if declared else "more pixels than can be decoded"
        raise MediaError(
            f"{name} declares {size}; the limit is {limits.max_image_pixels / 1e6:.0f} megapixels. Downscale the "
            "image and upload it again."
        ) from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error... on bad files
        if "truncated" in str(exc):  # PIL: "image file is truncated (4 bytes not processed)"
            raise MediaError(f"{name} is truncated: the file ends before its image does (an interrupted download "
                             "or copy?). Upload the whole file again.") from None
        raise MediaError(f"{name} could not be decoded as an image (damaged or truncated?): {exc}") from None
    return img


def _wide_gray_to_l(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer or float grayscale -> 8-bit L, scaled by range instead of clipped."""
    arr = np.asarray(img).astype(np.float64)
    arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    if img.mode.startswith("I;16") or (img.mode == "I" and arr.min() >= 0 and arr.max() <= 65535):
        arr = arr / 257.0
    elif img.mode == "F" and arr.min() >= 0 and arr.max() <= 1:
        arr = arr * 255.0
    else:
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent areas become white."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _wide_gray_to_l(img)
    if img.mode == "RGB":
        return img
    if "transparency" in img.info or img.mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def to_gray(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit L (luminance), transparency flattened onto white first."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return _wide_gray_to_l(img)
    if img.mode == "L" and "transparency" not in img.info:
        return img
    return to_rgb(img).convert("L")


def resize_short_side(img: Image.Image, size: int, resample: int = Image.BICUBIC) -> Image.Image:
    """torchvision ``Resize(size)`` on a PIL image: short side to ``size``, long side truncated."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), resample)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision ``CenterCrop(size)`` (the image is at least ``size`` on both sides here)."""
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def pil_to_unit_tensor(img: Image.Image) -> torch.Tensor:
    """(C, H, W) float32 in [0, 1], as torchvision's ToTensor."""
    arr = np.array(img, dtype=np.uint8, copy=True)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous().float().div(255)


def normalize_(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """In-place (x - mean) / std over the channel axis 0, the op order of torchvision's Normalize."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    x.sub_(torch.as_tensor(mean, dtype=x.dtype).view(shape)).div_(torch.as_tensor(std, dtype=x.dtype).view(shape))
    return x


def image_to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL image -> (3, size, size) CLIP-normalised float32."""
    img = center_crop(resize_short_side(to_rgb(img), size, Image.BICUBIC), size)
    return normalize_(pil_to_unit_tensor(img), CLIP_MEAN, CLIP_STD)


def load_image(path: str | Path, cfg: ImageBindConfig | None = None, limits: Limits = DEFAULT_LIMITS) -> torch.Tensor:
    """Image file -> (3, S, S) float32 (see the module docstring)."""
    cfg = cfg or ImageBindConfig()
    return image_to_tensor(open_image(path, limits), cfg.image_size)


__all__ = [
    "load_image", "open_image", "to_rgb", "to_gray", "resize_short_side", "center_crop", "pil_to_unit_tensor",
    "normalize_", "image_to_tensor", "CLIP_MEAN", "CLIP_STD",
]
