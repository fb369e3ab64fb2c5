"""What each attachment looks like in the inputs panel: files the browser can show, made server-side.

``gr.Model3D`` only reads mesh formats, so point clouds (pcd, xyz, npy, …) are rewritten as point-only PLY; IMU
traces become a plotly figure; depth and thermal maps become colour-mapped PNGs. Images, audio and video are shown
as they are. Previews are made from files the engine has already accepted, are cached per file content, and never
unpickle anything.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

MAX_PREVIEW_POINTS = 50_000  # enough to see a shape; Model3D gets slow beyond ~100k points
MAX_TEXT_CHARS = 2000

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
    st = os.stat(path)
    return hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{kind}".encode()).hexdigest()[:16]


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


def _read_map(path: str) -> np.ndarray:
    if path.lower().endswith(".npy"):
        a = np.squeeze(_read_npy(path, "depth/thermal map"))
        if a.ndim == 3:  # (H, W, C) or (C, H, W): show the first channel
            a = a[..., 0] if a.shape[-1] <= 4 else a[0]
        return a
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            return np.asarray(im).astype(np.float32)
        return np.asarray(im.convert("L")).astype(np.float32)


def map_png(path: str, modality: str) -> str:
    """A colour-mapped PNG of a depth (viridis, 0 = no reading) or thermal (inferno) map."""
    out = _preview_dir() / f"{_key(path, modality)}.png"
    if not out.exists():
        a = _read_map(path)
        cmap = "viridis" if modality == "depth" else "inferno"
        # depth: near is bright, as people expect from depth visualisations
        norm = _normalise(a, invalid_zero=modality == "depth")
        if modality == "depth":
            norm = 1.0 - norm
        Image.fromarray(colour_map(norm, cmap)).save(out)
    return str(out)


def read_points(path: str) -> np.ndarray:
    """(N, 3) positions of a point-cloud file, through the media package's bounds-checked parsers."""
    from ibllm.media import pointio
    from ibllm.media.limits import DEFAULT_LIMITS

    readers = {".ply": pointio.read_ply, ".pcd": pointio.read_pcd, ".obj": pointio.read_obj,
               ".npy": pointio.read_npy_points}
    reader = readers.get(Path(path).suffix.lower(), pointio.read_table)
    return np.asarray(reader(Path(path), DEFAULT_LIMITS), dtype=np.float32)


def _read_npy(path: str, what: str) -> np.ndarray:
    """A numeric .npy array; the header is checked first and pickles are never loaded."""
    from ibllm.media import pointio
    from ibllm.media.limits import DEFAULT_LIMITS

    return pointio.read_npy(Path(path), DEFAULT_LIMITS, what)


def write_ply(points: np.ndarray, out: str | Path, colours: np.ndarray | None = None) -> str:
    """Write a binary point-only PLY (x, y, z float32 and optional uchar red, green, blue)."""
    points = np.asarray(points, dtype=np.float32).reshape(-1, 3)
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if colours is not None:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    rec = np.empty(len(points), dtype=fields)
    rec["x"], rec["y"], rec["z"] = points[:, 0], points[:, 1], points[:, 2]
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(points)}",
              "property float x", "property float y", "property float z"]
    if colours is not None:
        colours = np.asarray(colours, dtype=np.uint8).reshape(-1, 3)
        rec["red"], rec["green"], rec["blue"] = colours[:, 0], colours[:, 1], colours[:, 2]
        header += ["property uchar red", "property uchar green", "property uchar blue"]
    header.append("end_header")
    with open(out, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(rec.tobytes())
    return str(out)


def point_cloud_ply(path: str) -> str:
    """A PLY for ``gr.Model3D``: subsampled, centred, scaled to the unit sphere, coloured by height."""
    out = _preview_dir() / f"{_key(path, 'point')}.ply"
    if not out.exists():
        pts = read_points(path)
        pts = pts[np.isfinite(pts).all(axis=1)]
        if len(pts) == 0:
            raise ValueError("no points")
        if len(pts) > MAX_PREVIEW_POINTS:
            pts = pts[np.random.default_rng(0).choice(len(pts), MAX_PREVIEW_POINTS, replace=False)]
        pts = pts - pts.mean(axis=0)
        pts = pts / max(float(np.linalg.norm(pts, axis=1).max()), 1e-6)
        height = pts[:, 1]
        colours = colour_map((height - height.min()) / max(float(np.ptp(height)), 1e-6))
        write_ply(pts, out, colours)
    return str(out)


def read_imu(path: str) -> np.ndarray:
    """(6, T) float32: accelerometer xyz then gyroscope xyz, from npy or csv in either orientation."""
    a = _read_npy(path, "IMU recording") if path.lower().endswith(".npy") else _read_csv_matrix(path)
    a = np.squeeze(np.asarray(a, dtype=np.float32))
    if a.ndim != 2 or 6 not in a.shape:
        raise ValueError(f"expected a (6, T) or (T, 6) array, got shape {a.shape}")
    return a if a.shape[0] == 6 else a.T


def _read_csv_matrix(path: str) -> np.ndarray:
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rows.append([float(p) for p in line.replace(",", " ").split()])
            except ValueError:
                continue  # header
    return np.asarray([r for r in rows if r], dtype=np.float32)


def imu_figure(path: str) -> Any:
    """A plotly figure of the six IMU channels (two stacked panels: accelerometer, gyroscope)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    a = read_imu(path)
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
        import decord

        frame = decord.VideoReader(path, num_threads=1)[0].asnumpy()
    except Exception:  # noqa: BLE001 - the preview is optional; the engine reports unusable videos itself
        return None
    Image.fromarray(frame).save(out)
    return str(out)


def read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read(MAX_TEXT_CHARS + 1)
    return text if len(text) <= MAX_TEXT_CHARS else text[:MAX_TEXT_CHARS] + "…"


@lru_cache(maxsize=256)
def _cached_preview(path: str, modality: str, key: str) -> Preview:
    del key  # part of the cache key only: a file rewritten in place gets a new preview
    if modality == "image":
        return Preview("image", path)
    if modality in ("depth", "thermal"):
        return Preview("image", map_png(path, modality), f"{modality} map, colour-mapped")
    if modality == "point":
        return Preview("model3d", point_cloud_ply(path))
    if modality == "imu":
        return Preview("plot", imu_figure(path))
    if modality == "audio":
        return Preview("audio", path)
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
