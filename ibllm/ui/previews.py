"""What each attachment looks like in the inputs panel: files the browser can show, made server-side.

``gr.Model3D`` only reads mesh formats, so point clouds (pcd, xyz, npy, …) are rewritten as point-only PLY; IMU
traces become a plotly figure; depth and thermal maps become colour-mapped PNGs. Images, audio and video are shown
as they are where a browser can show them; a TIFF becomes a PNG, an AIFF a FLAC, an AVI/MKV/MOV its first frame.
Previews are made from files the engine has already accepted, are cached per file version, and never unpickle
anything: every file is read by the media package's own (bounds-checked) reader for its format, so a preview
shows what the model reads.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import decord
import numpy as np
import plotly.graph_objects as go
import soundfile as sf
from PIL import Image
from plotly.subplots import make_subplots

from ibllm.media.depth import read_disparity
from ibllm.media.image import open_image, to_rgb
from ibllm.media.imu import read_imu
from ibllm.media.point import read_points
from ibllm.media.pointio import write_ply
from ibllm.media.sniff import sniff
from ibllm.media.text import read_text_file
from ibllm.media.thermal import thermal_gray

MAX_PREVIEW_POINTS = 50_000  # enough to see a shape; Model3D gets slow beyond ~100k points
MAX_TEXT_CHARS = 2000
PREVIEW_FORMAT = 2  # part of each preview's file name: raise it when a preview is drawn differently

# Colour maps as evenly spaced anchors (sampled from the perceptually uniform viridis / inferno maps).
_VIRIDIS = ["#440154", "#482878", "#3e4a89", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b",
            "#fde725"]
_INFERNO = ["#000004", "#1b0c41", "#4a0c6b", "#781c6d", "#a52c60", "#cf4446", "#ed6925", "#fb9b06", "#f7d13d",
            "#fcffa4"]
BROWSER_VIDEO = (".mp4", ".webm", ".ogg")


@dataclass(frozen=True)
class Preview:
    """``kind`` names the Gradio component to show ``value`` in: image, video, audio, model3d, plot, text, none."""

    kind: str
    value: Any = None
    note: str = ""


def _preview_dir() -> Path:
    d = Path(tempfile.gettempdir()) / "ibllm-previews"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _key(path: str, kind: str) -> str:
    """The name of a file version's preview (from path, size and modification time: the file is not read)."""
    st = os.stat(path)
    version = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{kind}|{PREVIEW_FORMAT}"
    return hashlib.sha1(version.encode()).hexdigest()[:16]


def colour_map(values: np.ndarray, name: str = "viridis") -> np.ndarray:
    """Map values in [0, 1] (any shape) to uint8 RGB with the named map; NaN becomes black."""
    anchors = _VIRIDIS if name == "viridis" else _INFERNO
    rgb = np.array([[int(h[i:i + 2], 16) for i in (1, 3, 5)] for h in anchors], dtype=np.float32)
    x = np.linspace(0.0, 1.0, len(anchors))
    v = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0)
    out = np.stack([np.interp(v, x, rgb[:, c]) for c in range(3)], axis=-1)
    out[np.isnan(values)] = 0.0
    return out.astype(np.uint8)


def _normalise(a: np.ndarray, invalid_zero: bool) -> np.ndarray:
    """Scale to [0, 1] between the 2nd and 98th percentiles so one hot pixel does not wash out the map."""
    a = a.astype(np.float32)
    valid = np.isfinite(a) & ((a > 0) if invalid_zero else True)
    if not valid.any():
        return np.full(a.shape, np.nan, dtype=np.float32)
    lo, hi = np.percentile(a[valid], [2, 98])
    out = (a - lo) / max(float(hi - lo), 1e-6)
    out[~valid] = np.nan
    return out


def _read_map(path: str, modality: str) -> np.ndarray:
    """The map as the encoders read it: a depth file as disparity (larger = nearer, 0 = no reading), a thermal
    image as its 8-bit gray levels (brighter = hotter)."""
    if modality == "depth":
        return read_disparity(path)
    return np.asarray(thermal_gray(open_image(path)), dtype=np.float32)


def map_png(path: str, modality: str) -> str:
    """A colour-mapped PNG of a depth (viridis, near is bright, no reading is black) or thermal (inferno) map."""
    out = _preview_dir() / f"{_key(path, modality)}.png"
    if not out.exists():
        depth = modality == "depth"
        norm = _normalise(_read_map(path, modality), invalid_zero=depth)
        Image.fromarray(colour_map(norm, "viridis" if depth else "inferno")).save(out)
    return str(out)


def point_cloud_ply(path: str) -> str:
    """A PLY for ``gr.Model3D``: subsampled, centred, scaled to the unit sphere, coloured by height."""
    out = _preview_dir() / f"{_key(path, 'point')}.ply"
    if not out.exists():
        pts = np.asarray(read_points(path), dtype=np.float32)
        pts = pts[np.isfinite(pts).all(axis=1)]
        if len(pts) == 0:
            raise ValueError("no points")
        if len(pts) > MAX_PREVIEW_POINTS:
            pts = pts[np.random.default_rng(0).choice(len(pts), MAX_PREVIEW_POINTS, replace=False)]
        pts = pts - pts.mean(axis=0)
        pts = pts / max(float(np.linalg.norm(pts, axis=1).max()), 1e-6)
        height = pts[:, 1]
        colours = colour_map((height - height.min()) / max(float(np.ptp(height)), 1e-6))
        write_ply(out, pts, colours)
    return str(out)


def imu_figure(path: str) -> Any:
    """A plotly figure of the six IMU channels (two stacked panels: accelerometer, gyroscope)."""

    a = read_imu(path)  # (6, T): accelerometer xyz, gyroscope xyz
    step = max(1, a.shape[1] // 2000)  # a plot does not need more than ~2000 samples per line
    a = a[:, ::step]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("accelerometer", "gyroscope"))
    for i, name in enumerate(("acc x", "acc y", "acc z", "gyro x", "gyro y", "gyro z")):
        fig.add_trace(go.Scatter(y=a[i], mode="lines", name=name, line={"width": 1}), row=1 + i // 3, col=1)
    fig.update_layout(height=320, margin={"l": 30, "r": 10, "t": 30, "b": 20}, showlegend=True,
                      legend={"orientation": "h", "y": -0.1})
    return fig


def video_frame_png(path: str) -> str | None:
    """The first frame of a video the browser cannot play (avi, mkv, mov), or None without a decoder."""
    out = _preview_dir() / f"{_key(path, 'frame')}.png"
    if out.exists():
        return str(out)
    try:
        frame = decord.VideoReader(path, num_threads=1)[0].asnumpy()
    except Exception:  # noqa: BLE001 - the preview is optional; the engine reports unusable videos itself
        return None
    Image.fromarray(frame).save(out)
    return str(out)


def browser_image_png(path: str) -> str:
    """A PNG copy of an image the browser cannot show (TIFF), as the model reads it (first page, RGB)."""
    out = _preview_dir() / f"{_key(path, 'image')}.png"
    if not out.exists():
        to_rgb(open_image(path)).save(out)
    return str(out)


def browser_audio_flac(path: str) -> str:
    """A FLAC copy of a recording the browser cannot play (AIFF)."""
    out = _preview_dir() / f"{_key(path, 'audio')}.flac"
    if not out.exists():
        data, rate = sf.read(path, dtype="float32", always_2d=True)
        sf.write(out, data, rate, subtype="PCM_16")
    return str(out)


def read_text(path: str) -> str:
    """The text as the model reads it (UTF-8, UTF-16 or UTF-32 with its mark, a code page), cut for the panel."""
    text = read_text_file(path)
    return text if len(text) <= MAX_TEXT_CHARS else text[:MAX_TEXT_CHARS] + "…"


@lru_cache(maxsize=256)
def _cached_preview(path: str, modality: str, key: str) -> Preview:
    del key  # part of the cache key only: a file rewritten in place gets a new preview
    if modality == "image":
        # by content, not name: a TIFF named .png is shown no better (Chromium decodes no TIFF, plays no AIFF)
        return Preview("image", browser_image_png(path) if sniff(path) == "tiff" else path)
    if modality in ("depth", "thermal"):
        return Preview("image", map_png(path, modality), f"{modality} map, colour-mapped")
    if modality == "point":
        return Preview("model3d", point_cloud_ply(path))
    if modality == "imu":
        return Preview("plot", imu_figure(path))
    if modality == "audio":
        return Preview("audio", browser_audio_flac(path) if sniff(path) == "aiff" else path)
    if modality == "video":
        if path.lower().endswith(BROWSER_VIDEO):
            return Preview("video", path)
        frame = video_frame_png(path)
        return Preview("image", frame, "first frame") if frame else Preview("none", note="no preview for this format")
    if modality == "text":
        return Preview("text", read_text(path))
    return Preview("none", note=f"no preview for {modality}")


def make_preview(path: str, modality: str) -> Preview:
    """The preview of one attachment; a file that cannot be previewed gets a note instead of an exception."""
    try:
        return _cached_preview(path, modality, _key(path, modality))
    except Exception as e:  # noqa: BLE001 - a preview must never break the chat
        return Preview("none", note=f"no preview: {e}")
