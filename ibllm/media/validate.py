"""Checks shared by every loader, run before any decoder sees the file."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import numpy as np

from ibllm.media.errors import MediaError
from ibllm.media.limits import MB, Limits
from ibllm.media.sniff import describe, sniff

IMAGE_FORMATS = ("png", "jpeg", "gif", "webp", "bmp", "tiff")
SOUNDFILE_FORMATS = ("wav", "flac", "ogg", "mp3", "aiff")  # decoded by libsndfile (soundfile)
FFMPEG_AUDIO_FORMATS = ("adts", "mp4", "matroska", "avi")  # decoded by FFmpeg (decord.AudioReader)
AUDIO_FORMATS = SOUNDFILE_FORMATS + FFMPEG_AUDIO_FORMATS
VIDEO_FORMATS = ("mp4", "matroska", "avi")
PICKLE_EXTENSIONS = (".pt", ".pth", ".pkl", ".pickle", ".joblib", ".ckpt")


def human_bytes(n: float) -> str:
    return f"{n / MB:.1f} MB" if n >= MB else f"{n / 1024:.1f} kB" if n >= 1024 else f"{int(n)} bytes"


def human_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest} s" if rest else f"{minutes} min"


def check_file(path: str | Path, limits: Limits) -> int:
    """The file exists, is a regular file, is not empty and not over the size limit. Returns its size."""
    p = Path(path)
    if p.suffix.lower() in PICKLE_EXTENSIONS:
        raise MediaError(
            f"{p.name}: {p.suffix} files are Python pickles, and loading a pickle can run arbitrary code, so "
            "they are never opened. Save point clouds as .ply/.pcd/.xyz/.npy and arrays as .npy, .npz or .csv instead."
        )
    if not p.exists():
        raise MediaError(f"{p.name}: file not found")
    if not p.is_file():
        raise MediaError(f"{p.name}: not a regular file")
    size = p.stat().st_size
    if size == 0:
        raise MediaError(f"{p.name} is empty (0 bytes); the upload may have failed, try again")
    if size > limits.max_file_bytes:
        raise MediaError(
            f"{p.name} is {human_bytes(size)}; the limit is {human_bytes(limits.max_file_bytes)} per file"
        )
    return size


def require_format(path: str | Path, allowed: Collection[str], what: str) -> str:
    """Sniff the content and refuse it unless it is one of ``allowed``; returns the sniffed family."""
    fmt = sniff(path)
    if fmt not in allowed:
        accepted = ", ".join(describe(f) for f in allowed)
        raise MediaError(
            f"{Path(path).name} does not contain {what}: its content looks like {describe(fmt)}. "
            f"Accepted: {accepted}."
        )
    return fmt


def check_aspect(width: int, height: int, limits: Limits, name: str, what: str) -> None:
    """MediaError for a picture too thin to scale: its short side goes to 224 pixels before the centre crop."""
    if max(width, height) > limits.max_aspect_ratio * min(width, height):
        raise MediaError(
            f"{name}: {what} of {width}x{height} pixels is too thin to read (its long side is over "
            f"{limits.max_aspect_ratio:g} times its short side). Crop it closer to a square and upload it again."
        )


def check_finite(arr: np.ndarray, name: str, what: str) -> None:
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise MediaError(f"{name}: {what} contains {bad} NaN or infinite values; clean the data and upload again")


__all__ = [
    "check_file", "require_format", "check_aspect", "check_finite", "human_bytes", "human_duration", "IMAGE_FORMATS",
    "SOUNDFILE_FORMATS", "FFMPEG_AUDIO_FORMATS", "AUDIO_FORMATS", "VIDEO_FORMATS", "PICKLE_EXTENSIONS",
]
