"""Every size limit the loaders enforce before (and while) decoding an upload, in one place.

The defaults are sized for a chat server on a small machine: large enough for any ordinary photo, song
excerpt, phone video or scanned object, small enough that a hostile file cannot exhaust memory or CPU.
Pass a modified copy (``dataclasses.replace(DEFAULT_LIMITS, max_file_bytes=...)``) to change them.
"""

from __future__ import annotations

from dataclasses import dataclass

MB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Upper (and a few lower) bounds checked by the loaders; every violation is a MediaError."""

    max_file_bytes: int = 200 * MB
    max_image_pixels: int = 50_000_000  # width * height from the header, checked before any pixel is decoded
    # Long side / short side of an image, depth map or video frame. The encoders scale the short side to 224 and
    # crop the centre square, so a 1 x 200,000 strip would become 224 x 44.8 million pixels (~40 GB) first.
    max_aspect_ratio: float = 100.0
    max_audio_seconds: float = 600.0
    max_video_seconds: float = 600.0
    max_video_pixels: int = 8192 * 4352  # one frame; 8K UHD fits
    max_points: int = 5_000_000
    min_points: int = 4  # fewer points carry no shape (and cannot be scaled to the unit sphere meaningfully)
    max_text_chars: int = 100_000  # a text file sent as the "text" modality (the tokenizer keeps 75 tokens)
    max_imu_samples: int = 1_000_000  # time steps of a (6, T) IMU recording
    # decord.AudioReader decodes a whole file at once, so for FFmpeg-decoded audio whose container header does
    # not state a duration (ADTS without frames, WebM from a browser recorder) we fall back on the file size.
    max_undeclared_audio_bytes: int = 16 * MB


DEFAULT_LIMITS = Limits()

__all__ = ["Limits", "DEFAULT_LIMITS", "MB"]
