"""Media loaders: an uploaded file -> the tensor its ImageBind / Point-Bind encoder expects (no batch axis).

| kind    | encoder branch | output (ImageBind-Huge sizes)   | module       |
|---------|----------------|---------------------------------|--------------|
| image   | vision         | (3, 224, 224)                   | image.py     |
| video   | vision         | (15, 3, 2, 224, 224): 5 clips x 3 crops | video.py |
| audio   | audio          | (3, 1, 128, 204): 3 clips       | audio.py     |
| text    | text           | (77,) int64                     | text.py      |
| point   | point          | (8192, 3)                       | point.py     |
| depth   | depth          | (1, 224, 224)                   | depth.py     |
| thermal | thermal        | (1, 224, 224)                   | thermal.py   |
| imu     | imu            | (6, 2000)                       | imu.py       |

Sizes come from an ``ImageBindConfig`` (default ImageBind-Huge). Every failure is a ``MediaError`` whose
message says what was wrong and what is accepted; limits live in ``limits.Limits``. Each module's docstring
documents its pipeline.

Image, audio, video, text and point loaders reproduce the reference (parity-a: bit-identical on its files).
Choices where the reference has none, in short:
- image: EXIF orientation applied, first animation frame, transparency flattened onto white;
- text: over-long texts keep their end token (first 75 BPE tokens + EOT);
- point: resampled to N (seeded random pre-subset + farthest-point sampling down, seeded repetition up),
  centred at the centroid and scaled to radius 1 unless already normalised (then passed through unchanged);
- depth: 16-bit PNG = millimetres, .npy/.npz = metres, converted to disparity 1/depth; 8-bit images are taken as
  inverse-depth visualisations; then resize/crop and per-image standardisation (zero mean, unit std);
- thermal: grayscale (16-bit stretched over its 1..99th percentiles), bicubic resize/crop, [0, 1], then
  mean 0.4489 / std 0.2686 (CLIP's channel averages);
- imu: (6, T) or (T, 6), linear resampling of the whole recording to 2000 steps, per-channel standardisation.
Content is sniffed before any decoder runs (``detect.py`` says what a file is); pickles are never opened. The
kinds, their encoder branches and extensions are ``ibllm.kinds``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ibllm.config import ImageBindConfig
from ibllm.kinds import MEDIA_KINDS
from ibllm.media.audio import load_audio
from ibllm.media.depth import load_depth
from ibllm.media.detect import accepted_table, detect_modality
from ibllm.media.errors import MediaError
from ibllm.media.image import load_image
from ibllm.media.imu import load_imu
from ibllm.media.limits import DEFAULT_LIMITS, Limits
from ibllm.media.point import load_point
from ibllm.media.text import load_text
from ibllm.media.thermal import load_thermal
from ibllm.media.video import load_video

LOADERS: dict[str, Callable[..., torch.Tensor]] = {
    "image": load_image, "video": load_video, "audio": load_audio, "text": load_text, "point": load_point,
    "depth": load_depth, "thermal": load_thermal, "imu": load_imu,
}
"""Media kind -> its loader ``(path, cfg, limits) -> tensor``."""


def load_media(path: str | Path, modality: str | None = None, cfg: ImageBindConfig | None = None,
               limits: Limits = DEFAULT_LIMITS) -> torch.Tensor:
    """File -> encoder-ready tensor without a batch axis. ``modality`` (a media kind) overrides detection."""
    kind = modality or detect_modality(path)
    if kind not in MEDIA_KINDS:
        raise MediaError(f"unknown input type {kind!r}; choose one of {', '.join(MEDIA_KINDS)}")
    return LOADERS[kind](path, cfg or ImageBindConfig(), limits)


__all__ = ["MediaError", "Limits", "DEFAULT_LIMITS", "LOADERS", "accepted_table", "detect_modality", "load_media"]
