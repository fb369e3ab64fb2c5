"""Writers (and a ply reader) for the standard file formats: PNG, WAV, binary ply, H.264 mp4."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image

from ibllm.media import pointio
from ibllm.media.limits import DEFAULT_LIMITS
from ibllm.train.toyworld.formats import AUDIO_RATE, VIDEO_FPS

try:
    import av
except ImportError:  # PyAV is optional (a test requirement): write_mp4 then uses imageio-ffmpeg
    av = None


def write_png(path: Path, array: np.ndarray) -> None:
    # The sensor noise makes PNGs nearly incompressible: level 1 is 4x faster than 6 and only ~15 % larger.
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def write_wav(path: Path, audio: np.ndarray, rate: int = AUDIO_RATE) -> None:
    soundfile.write(str(path), audio, rate, subtype="PCM_16", format="WAV")


def write_ply(path: Path, points: np.ndarray) -> None:
    """Binary little-endian ply with float x y z (what open3d and every point-cloud viewer read)."""
    pointio.write_ply(path, points)


def read_ply(path: str | Path) -> np.ndarray:
    """(N, 3) float32 points of a ply file, through the media package's parser (the one PLY reader)."""
    return pointio.read_ply(Path(path), DEFAULT_LIMITS).astype(np.float32)


def write_mp4(path: Path, frames: np.ndarray, fps: int = VIDEO_FPS) -> None:
    """H.264 yuv420p mp4, one encoder thread (the machine's cores are shared; x264 is deterministic then)."""
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError("yuv420p needs even dimensions")
    if av is not None:
        with av.open(str(path), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps, 1))
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"crf": "23", "preset": "veryfast", "threads": "1"}
            stream.codec_context.thread_count = 1
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return
    # Imported here, not at the top: the fallback without PyAV, a test requirement only (like PyAV itself),
    # so an install with neither fails here, with its own ImportError, and nowhere else.
    import imageio_ffmpeg

    writer = imageio_ffmpeg.write_frames(str(path), (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
                                         quality=None, macro_block_size=2,
                                         output_params=["-crf", "23", "-preset", "veryfast", "-threads", "1"])
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
