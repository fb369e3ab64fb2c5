"""Video file -> (clips * 3, 3, 2, S, S) float32 for the vision encoder (S = cfg.image_size, 2 = cfg.video_frames).

Pipeline (REFERENCE.md section 2; the reference's ``load_and_transform_video_data``, which decodes with PyAV
through pytorchvideo; decoding here is decord's, whose FFmpeg gives the same RGB frames on the fixture):
1. duration ``d`` = end time of the last frame (first frame's start time taken as 0); clip ``i`` of ``clips``
   (default 5) covers ``[i * max(d - 2, 0) / max(clips - 1, 1), ... + 2)`` seconds: the first clip starts at 0,
   the last one ends at the end (the pinned pytorchvideo's sampler, ``clips.py``);
2. the frames whose start timestamps fall in the clip (start inclusive, end exclusive) are sub-sampled
   uniformly to ``cfg.video_frames`` frames (``linspace(0, n - 1, 2)`` truncated: the first and the last);
   a clip containing no frame (a gap in a variable-frame-rate file) takes the frame nearest to its start;
3. uint8 -> float32 / 255; short side resized to S (bilinear, no antialias, long side floored); CLIP mean/std;
4. three S x S crops along the long side: start, centre (offset rounded up), end — left/centre/right for
   landscape, top/centre/bottom for portrait — ordered clip-major: ``[c0 crop0, c0 crop1, c0 crop2, c1 ...]``.

Only the needed frames are decoded. Files decord cannot index (a browser's MediaRecorder WebM has no duration,
frame count or rate) are read with PyAV instead, timestamps taken from the packets. Very short videos (one
frame, 0.5 s) give clips that all start at 0.
Rotation metadata of phone videos is ignored, as in the reference (a portrait video stored as rotated
landscape is encoded as stored).
"""

from __future__ import annotations

from pathlib import Path

import av
import decord
import numpy as np
import torch

from ibllm.config import ImageBindConfig
from ibllm.media.clips import clip_starts
from ibllm.media.errors import MediaError
from ibllm.media.image import CLIP_MEAN, CLIP_STD, normalize_
from ibllm.media.limits import DEFAULT_LIMITS, Limits
from ibllm.media.tracks import read_tracks, sound_only
from ibllm.media.validate import VIDEO_FORMATS, check_aspect, check_file, human_duration, require_format

CLIPS = 5
CLIP_SECONDS = 2
CROPS = 3
_EPS = 1e-6  # decord reports timestamps as float seconds; compare with a tolerance well below a frame


def clip_windows(duration: float, clips: int = CLIPS, clip_seconds: int = CLIP_SECONDS) -> list[tuple[float, float]]:
    return [(float(start), float(start + clip_seconds)) for start in clip_starts(duration, clips, clip_seconds)]


def select_frames(starts: np.ndarray, duration: float, num_frames: int, clips: int = CLIPS,
                  clip_seconds: int = CLIP_SECONDS) -> list[list[int]]:
    """Per clip, the indices of the frames to decode (see step 2)."""
    chosen = []
    for lo, hi in clip_windows(duration, clips, clip_seconds):
        inside = np.nonzero((starts >= lo - _EPS) & (starts < hi - _EPS))[0]
        if inside.size == 0:
            inside = np.array([int(np.argmin(np.abs(starts - lo)))])
        pick = torch.linspace(0, inside.size - 1, num_frames).clamp(0, inside.size - 1).long().numpy()
        chosen.append([int(inside[k]) for k in pick])
    return chosen


def short_side_scale(x: torch.Tensor, size: int) -> torch.Tensor:
    """(C, T, H, W) -> short side ``size``, bilinear without antialias (pytorchvideo's ShortSideScale)."""
    _, _, h, w = x.shape
    if w < h:
        new_h, new_w = int(np.floor(h / w * size)), size
    else:
        new_h, new_w = size, int(np.floor(w / h * size))
    return torch.nn.functional.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)


def spatial_crops(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    """(C, T, H, W) -> [start, centre, end] crops of size x size along the long side."""
    h, w = x.shape[2], x.shape[3]
    y_centre, x_centre = -(-(h - size) // 2), -(-(w - size) // 2)  # ceil, as the reference's uniform_crop
    crops = []
    for idx in range(CROPS):
        y, x0 = y_centre, x_centre
        if h > w:
            y = 0 if idx == 0 else h - size if idx == 2 else y_centre
        else:
            x0 = 0 if idx == 0 else w - size if idx == 2 else x_centre
        crops.append(x[:, :, y : y + size, x0 : x0 + size])
    return crops


def frames_to_clip(frames: np.ndarray, size: int) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, size', size'') CLIP-normalised, short side resized."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).to(torch.float32) / 255.0
    return normalize_(short_side_scale(x, size), CLIP_MEAN, CLIP_STD)


class _PacketIndexedFrames:
    """The decord ``VideoReader`` calls made below (len, get_frame_timestamp, [i], get_batch), served by PyAV, for
    files decord cannot index: a browser's recording (MediaRecorder's WebM, e.g. from the app's webcam) stores
    neither a duration nor a frame count nor a frame rate, all of which decord needs. Timestamps come from the
    packets (nothing decoded); frames are decoded in one pass that stops at the last one asked for."""

    def __init__(self, path: Path):
        self.path = path
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            self.pts = sorted(p.pts for p in container.demux(stream) if p.pts is not None)
            base = float(stream.time_base)
        starts = np.asarray(self.pts, dtype=np.float64) * base
        gaps = np.diff(starts)
        last = float(np.median(gaps)) if gaps.size else 0.0  # the last frame lasts as long as a typical one
        self.stamps = np.stack([starts, np.append(starts[1:], starts[-1:] + last)], axis=1) if self.pts else \
            np.zeros((0, 2))

    def __len__(self) -> int:
        return len(self.pts)

    def get_frame_timestamp(self, index: np.ndarray) -> np.ndarray:
        return self.stamps[index]

    def __getitem__(self, index: int) -> np.ndarray:
        return self.get_batch([index])[0]

    def get_batch(self, wanted: list[int]) -> np.ndarray:
        rows = {self.pts[i]: k for k, i in enumerate(wanted)}
        frames: list[np.ndarray | None] = [None] * len(wanted)
        with av.open(str(self.path)) as container:
            for frame in container.decode(video=0):
                k = rows.pop(frame.pts, None)
                if k is not None:
                    frames[k] = frame.to_ndarray(format="rgb24")
                if not rows:
                    break
        if rows:
            raise MediaError(f"{self.path.name}: {len(rows)} of its frames could not be decoded")
        return np.stack(frames)


def _check_complete(path: Path) -> None:
    """Refuse a file that ends before what its own header lists (an interrupted download or copy): decord and
    PyAV would quietly read the frames that are there, and which clips a cut file yields would depend on the
    byte it was cut at. MP4/MOV/AVI store a frame count (slack: a frame or 2 %, as a header's count can differ
    a little from the packets for other reasons); Matroska stores a duration, matched against where the last
    packet of any track ends (slack: 0.25 s or 5 %)."""
    try:
        head = read_tracks(path)
    except Exception:
        raise MediaError(f"{path.name} could not be opened as a video (damaged or truncated?)") from None
    if head.frames and head.present < head.frames - max(1, head.frames // 50):
        raise MediaError(f"{path.name} ends early: its header lists {head.frames} frames, the file holds "
                         f"{head.present} (damaged or truncated? upload the complete file)")
    if not head.frames and head.seconds and head.reach < head.seconds - max(0.25, 0.05 * head.seconds):
        raise MediaError(f"{path.name} ends early: its header says {human_duration(head.seconds)}, the file "
                         f"holds {human_duration(head.reach)} (damaged or truncated? upload the complete file)")


def _open(path: str | Path, limits: Limits):
    name = Path(path).name
    try:
        try:
            vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        except Exception as exc:
            if "broken metadata" not in str(exc).lower():
                raise
            vr = _PacketIndexedFrames(Path(path))  # a browser recording: no duration, frame count or rate
        n = len(vr)
        stamps = vr.get_frame_timestamp(np.arange(n)) if n else np.zeros((0, 2))
    except Exception as exc:
        msg = str(exc).lower()
        if "video stream" in msg and sound_only(Path(path)):
            raise MediaError(f"{name} has no video track (an audio-only file? upload it as audio)") from None
        raise MediaError(f"{name} could not be opened as a video (damaged or truncated?)") from None
    if n == 0:
        raise MediaError(f"{name} contains no video frames")
    stamps = np.asarray(stamps, dtype=np.float64).reshape(n, 2)
    if not np.isfinite(stamps).all():
        raise MediaError(f"{name} has invalid frame timestamps")
    _check_complete(Path(path))
    return vr, stamps


def _decode_batch(vr, wanted: list[int], path: Path, n: int) -> np.ndarray:
    """The ``wanted`` frames as (len, H, W, 3) uint8; through PyAV when decord fails on a file it opened (decord
    0.6 cannot copy out frames narrower than its 32-pixel row alignment, e.g. a 16x16 video)."""
    try:
        batch = vr.get_batch(wanted)
        return batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)
    except Exception:
        if isinstance(vr, _PacketIndexedFrames):
            raise
    frames = _PacketIndexedFrames(path)
    if len(frames) != n:  # the two would not number the frames alike
        raise MediaError(f"{path.name}: decoding its frames failed (damaged or truncated video?)")
    return frames.get_batch(wanted)


def decode_clip_frames(path: str | Path, clips: int = CLIPS, clip_seconds: int = CLIP_SECONDS,
                       frames_per_clip: int = 2, limits: Limits = DEFAULT_LIMITS) -> list[np.ndarray]:
    """Per clip, the chosen RGB frames as (T, H, W, 3) uint8 (before any scaling)."""
    name = Path(path).name
    check_file(path, limits)
    require_format(path, VIDEO_FORMATS, "a video")
    vr, stamps = _open(path, limits)
    t0 = stamps[:, 0].min()
    starts = stamps[:, 0] - t0
    duration = float(stamps[:, 1].max() - t0)
    if duration > limits.max_video_seconds:
        raise MediaError(f"{name} is {human_duration(duration)} long; the limit for video is "
                         f"{human_duration(limits.max_video_seconds)}. Trim it and upload again.")
    chosen = select_frames(starts, max(duration, 0.0), frames_per_clip, clips, clip_seconds)
    wanted = sorted({i for c in chosen for i in c})
    try:
        first = vr[wanted[0]]
        shape = tuple(first.shape)
        if len(shape) != 3 or shape[0] * shape[1] > limits.max_video_pixels:
            raise MediaError(
                f"{name} has {shape[1]}x{shape[0]} frames; the limit is "
                f"{limits.max_video_pixels / 1e6:.0f} megapixels per frame"
            )
        check_aspect(shape[1], shape[0], limits, name, "a video frame")
        arr = _decode_batch(vr, wanted, Path(path), len(stamps))
    except MediaError:
        raise
    except Exception:
        raise MediaError(f"{name}: decoding its frames failed (damaged or truncated video?)") from None
    if arr.ndim != 4 or arr.shape[0] != len(wanted) or arr.shape[-1] != 3 or min(arr.shape[1:3]) < 1:
        raise MediaError(f"{name}: the decoder returned unexpected frames {arr.shape}")
    row = {frame: k for k, frame in enumerate(wanted)}
    return [arr[[row[i] for i in c]] for c in chosen]


def load_video(path: str | Path, cfg: ImageBindConfig | None = None, limits: Limits = DEFAULT_LIMITS, *,
               clips: int = CLIPS, clip_seconds: int = CLIP_SECONDS) -> torch.Tensor:
    """Video file -> (clips * 3, 3, cfg.video_frames, S, S) float32 (see the module docstring)."""
    cfg = cfg or ImageBindConfig()
    per_clip = decode_clip_frames(path, clips, clip_seconds, cfg.video_frames, limits)
    out = []
    for frames in per_clip:
        out.extend(spatial_crops(frames_to_clip(frames, cfg.image_size), cfg.image_size))
    return torch.stack(out)


__all__ = ["load_video", "decode_clip_frames", "select_frames", "clip_windows", "short_side_scale", "spatial_crops"]
