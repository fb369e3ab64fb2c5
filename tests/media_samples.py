"""Writers of small real media files for the media-loader tests and bench/preprocess.py.

Everything is synthetic and deterministic: PIL for images, soundfile for wav/flac/ogg/mp3, PyAV for
video and AAC/Opus audio, numpy for arrays and tables, and our own PLY writer (open3d is used by the tests
that need it, imported there because it needs libusb preloaded).
"""

from __future__ import annotations

import contextlib
import io
import struct
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from PIL import Image


def gradient_rgb(w: int, h: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1).astype(np.uint8)


def write_image(path: Path, w: int = 64, h: int = 48, mode: str = "RGB", **save_kw) -> Path:
    img = Image.fromarray(gradient_rgb(w, h))
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, **save_kw)
    return path


def tone(seconds: float, rate: int, channels: int = 1, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    sig = 0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return np.stack([sig * (0.5 + 0.5 * c / max(channels, 1)) for c in range(channels)], 1).astype(np.float32)


def write_sound(path: Path, seconds: float = 1.0, rate: int = 22050, channels: int = 1, subtype: str | None = None,
                ) -> Path:
    data = tone(seconds, rate, channels)
    # libsndfile's Vorbis encoder crashes on one large write: always write in blocks.
    with sf.SoundFile(path, "w", rate, channels, subtype=subtype) as f:
        for s in range(0, len(data), 4096):
            f.write(data[s : s + 4096])
    return path


class _Stream(io.RawIOBase):
    """A file that cannot seek, as a browser's MediaRecorder writes: the muxer cannot go back to fill in the
    duration or write an index."""

    def __init__(self, f: Any):
        self.f = f

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return self.f.write(b)


def write_av(path: Path, *, video: str | None = "libx264", w: int = 96, h: int = 64, fps: int = 10,
             seconds: float = 1.0, audio: str | None = None, rate: int = 44100, fmt: str | None = None,
             options: dict | None = None, streamed: bool = False) -> Path:
    """A video (moving bars) and/or a sine soundtrack with PyAV; ``streamed``: written as a live recording is (no
    seeking: no duration, no index; give ``fmt``)."""
    import av

    with contextlib.ExitStack() as stack:
        target = _Stream(stack.enter_context(open(path, "wb"))) if streamed else str(path)
        _write_av(av, target, video, w, h, fps, seconds, audio, rate, fmt, options)
    return path


def _write_av(av: Any, target: Any, video: str | None, w: int, h: int, fps: int, seconds: float, audio: str | None,
              rate: int, fmt: str | None, options: dict | None) -> None:
    with av.open(target, "w", format=fmt, options=options or {}) as c:
        vs = None
        if video:
            vs = c.add_stream(video, rate=fps)
            vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        a = None
        if audio:
            a = c.add_stream(audio, rate=rate)
            a.layout = "stereo"
        if vs is not None:
            for i in range(max(1, int(round(seconds * fps)))):
                img = np.zeros((h, w, 3), np.uint8)
                img[:, : (i * 7) % w] = (220, 40, 20)
                img[: h // 3, :, 2] = 200
                img[2 * h // 3 :, :, 1] = 200
                for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    c.mux(p)
            for p in vs.encode():
                c.mux(p)
        if a is not None:
            sig = tone(seconds, rate, 1)[:, 0]
            _encode_audio(c, a, np.stack([sig, sig]), rate, "stereo")


def sphere_points(n: int, seed: int = 0, radius: float = 3.0, centre=(5.0, -2.0, 1.0)) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True) * radius + np.asarray(centre)


def write_ply(path: Path, xyz: np.ndarray, fmt: str = "ascii", faces_first: bool = False) -> Path:
    """A PLY with extra vertex properties (normals, colour) and a face element, before or after the vertices."""
    n = len(xyz)
    faces = np.array([[0, 1, 2], [1, 2, 3]], dtype=np.int32) if n >= 4 else np.zeros((0, 3), np.int32)
    vertex_header = (f"element vertex {n}\nproperty float x\nproperty float y\nproperty float z\nproperty float nx\n"
                     "property float ny\nproperty float nz\nproperty uchar red\nproperty uchar green\n"
                     "property uchar blue\n")
    face_header = f"element face {len(faces)}\nproperty list uchar int vertex_indices\n"
    elements = [face_header, vertex_header] if faces_first else [vertex_header, face_header]
    header = f"ply\nformat {fmt} 1.0\ncomment made by tests\n" + "".join(elements) + "end_header\n"
    normals = np.tile([0.0, 0.0, 1.0], (n, 1))
    colours = np.tile([10, 20, 30], (n, 1))
    if fmt == "ascii":
        vlines = "".join(f"{x} {y} {z} {a} {b} {c} {r} {g} {bl}\n" for (x, y, z), (a, b, c), (r, g, bl)
                         in zip(xyz, normals, colours, strict=True))
        flines = "".join(f"3 {i} {j} {k}\n" for i, j, k in faces)
        body = (flines + vlines) if faces_first else (vlines + flines)
        path.write_bytes(header.encode() + body.encode())
        return path
    order = "<" if fmt == "binary_little_endian" else ">"
    vdt = np.dtype([(k, order + "f4") for k in ("x", "y", "z", "nx", "ny", "nz")] + [(k, "u1") for k in "rgb"])
    rec = np.zeros(n, vdt)
    for i, k in enumerate(("x", "y", "z")):
        rec[k] = xyz[:, i]
    rec["nz"], rec["r"], rec["g"], rec["b"] = 1, 10, 20, 30
    fbytes = b"".join(struct.pack(order + "B3i", 3, *f) for f in faces)
    body = (fbytes + rec.tobytes()) if faces_first else (rec.tobytes() + fbytes)
    path.write_bytes(header.encode() + body)
    return path


def png_with_declared_size(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose IHDR claims width x height (a decompression bomb's header)."""
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    idat = zlib.compress(b"\x00" * 64)
    chunk2 = struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    iend = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk + chunk2 + iend)
    return path


def encode_mono(path: Path, samples: np.ndarray, rate: int, codec: str, fmt: str | None = None) -> Path:
    """Mono float samples encoded with PyAV (FFmpeg's encoders) into ``path``: the same recording as a WAV of them."""
    import av

    with av.open(str(path), "w", format=fmt) as c:
        stream = c.add_stream(codec, rate=rate)
        stream.layout = "mono"
        _encode_audio(c, stream, samples[None], rate, "mono")
    return path


def _encode_audio(container, stream, signal: np.ndarray, rate: int, layout: str) -> None:
    """(channels, n) float samples -> the encoder's frames (planar or packed, float or s16), muxed, flushed."""
    import av

    n = stream.codec_context.frame_size or 1024
    afmt = stream.codec_context.format.name
    for s in range(0, signal.shape[1], n):
        chunk = signal[:, s : s + n]
        arr = np.pad(chunk, ((0, 0), (0, n - chunk.shape[1]))).astype(np.float32)
        if not afmt.endswith("p"):
            arr = arr.T.reshape(1, -1)
        if afmt.startswith("s16"):
            arr = (arr * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(arr), format=afmt, layout=layout)
        frame.sample_rate, frame.pts = rate, s
        for p in stream.encode(frame):
            container.mux(p)
    for p in stream.encode():
        container.mux(p)


def xcorr_lag(x: np.ndarray, reference: np.ndarray, max_lag: int = 600) -> int:
    """The shift (in samples) by which ``x`` trails ``reference``: the argmax of their cross-correlation."""
    n = min(len(x), len(reference)) - max_lag
    x, reference = np.asarray(x, np.float64), np.asarray(reference, np.float64)
    span = n - max_lag
    scores = [np.dot(x[max_lag + k : max_lag + k + span], reference[max_lag:n]) for k in range(-max_lag, max_lag + 1)]
    return int(np.argmax(scores)) - max_lag
