"""What a file is: its media kind, from its extension checked against its content.

The extension proposes a kind; the sniffed content (``sniff.py``) must fit it; where several kinds share an
extension, the content decides (rules in ``detect_modality``). Nothing is decoded beyond headers, except that a
container is opened to see whether it has a video track.
"""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

from ibllm.kinds import ALL_EXTENSIONS, KINDS, MEDIA_KINDS
from ibllm.media.arrays import ARRAY_FORMATS, array_header
from ibllm.media.errors import MediaError
from ibllm.media.limits import DEFAULT_LIMITS, Limits
from ibllm.media.sniff import describe, sniff
from ibllm.media.tracks import sound_only
from ibllm.media.validate import AUDIO_FORMATS, IMAGE_FORMATS, VIDEO_FORMATS, check_file

# Extension -> the kind it means when nothing in the content says otherwise.
_DEFAULT_KIND = {
    ".jpg": "image", ".jpeg": "image", ".png": "image", ".webp": "image", ".bmp": "image", ".gif": "image",
    ".tif": "image", ".tiff": "image",
    ".mp4": "video", ".m4v": "video", ".mov": "video", ".webm": "video", ".mkv": "video", ".avi": "video",
    ".wav": "audio", ".flac": "audio", ".ogg": "audio", ".oga": "audio", ".opus": "audio", ".mp3": "audio",
    ".m4a": "audio", ".aac": "audio", ".aif": "audio", ".aiff": "audio",
    ".ply": "point", ".pcd": "point", ".xyz": "point", ".pts": "point", ".obj": "point", ".csv": "point",
    ".npy": "point", ".npz": "point", ".off": "point", ".stl": "point", ".txt": "text",
}
# Content family -> kind, for files whose extension is missing or unknown.
_KIND_OF_FORMAT = {
    **{f: "image" for f in IMAGE_FORMATS}, "wav": "audio", "aiff": "audio", "flac": "audio", "ogg": "audio",
    "mp3": "audio", "adts": "audio", "mp4": "video", "matroska": "video", "avi": "video", "ply": "point",
    "pcd": "point", "npy": "point", "npz": "point", "stl": "point", "text": "text",
}
# Content families that may sit behind each kind's extensions (a JPEG named .png is still an image).
_FORMATS_OF_KIND = {
    "image": IMAGE_FORMATS, "thermal": IMAGE_FORMATS, "video": VIDEO_FORMATS, "audio": AUDIO_FORMATS,
    "text": ("text",), "point": ("ply", "pcd", "stl", *ARRAY_FORMATS, "text"), "depth": IMAGE_FORMATS + ARRAY_FORMATS,
    "imu": (*ARRAY_FORMATS, "text"),
}


def accepted_table() -> str:
    """The accepted-extensions table as Markdown (for the UI)."""
    rows = ["| input | file types |", "|---|---|"]
    rows += [f"| {kind.name} | {' '.join(kind.extensions)} |" for kind in KINDS.values()]
    return "\n".join(rows)


def array_kinds(path: str | Path) -> list[str]:
    """The kinds an .npy / .npz array can be read as, from its header's shape alone: a point cloud (N, 3..16), as
    detection sees one; an IMU recording (6, T) or (T, 6); a depth map (H, W) no thinner than the loaders accept.
    A (6, 2000) trace is IMU or points, never a depth map. MediaError for an unreadable header."""
    shape, _ = array_header(Path(path))
    dims = [d for d in shape if d != 1]
    kinds = []
    if len(shape) == 2 and 3 <= shape[1] <= 16:
        kinds.append("point")
    if len(shape) == 2 and 6 in shape:
        kinds.append("imu")
    if len(dims) == 2 and len(shape) <= 3 and max(dims) <= DEFAULT_LIMITS.max_aspect_ratio * min(dims):
        kinds.append("depth")
    return kinds


def _array_kind(path: Path) -> str:
    shape, _ = array_header(path)
    dims = [d for d in shape if d != 1]
    if len(shape) == 2 and shape[0] == 6 and shape[1] > 6:
        return "imu"
    if len(shape) == 2 and 3 <= shape[1] <= 16:
        return "point"
    if len(dims) == 2 and len(shape) <= 3:
        return "depth"
    raise MediaError(f"{path.name}: cannot tell what a {shape} array is. Point clouds are (N, 3+), IMU (6, T), "
                     "depth maps (H, W); choose the input type explicitly.")


# A header field that names an IMU channel: acc_x, gyro, accelerometer_z, and the short ax/ay/az, gx/gy/gz and
# wx/wy/wz (angular velocity) that phone-logging apps write. A point cloud's header (x, y, z, r, g, b, nx...) has none.
_IMU_FIELD = re.compile(rb"acc|gyr|[agw][_ .-]?[xyz]")


def _names_imu_channels(line: bytes) -> bool:
    fields = [f.strip(b" \t\"'#").lower() for f in re.split(rb"[,;\t]+|\s+", line.strip())]
    return any(_IMU_FIELD.fullmatch(f) or f.startswith((b"acc", b"gyr")) for f in fields if f)


def _table_kind(path: Path) -> str:
    """A numeric table is a point cloud unless its header names IMU channels or it is a few very long rows
    (an IMU recording with one row per channel: 6 or 7 rows of T values)."""
    with open(path, "rb") as fh:
        head = fh.read(4096).lower()
        if any(_names_imu_channels(line) for line in head.splitlines()[:4] if re.search(rb"[a-z]", line)):
            return "imu"
        fh.seek(0)
        lines, widest = 0, 0
        for line in fh:  # stops after a few lines: a point cloud has thousands
            fields = len(re.split(rb"[,;\s]+", line.strip()))
            if line.strip():
                lines, widest = lines + 1, max(widest, fields)
            if lines > 7:
                return "point"
    return "imu" if 6 <= lines <= 7 and widest > 16 else "point"


def _txt_kind(path: Path) -> str:
    """A .txt holds either prose (text) or a numeric table (point cloud, or IMU: see ``_table_kind``)."""
    lines = [ln for ln in path.read_bytes()[:8192].splitlines() if ln.strip()][:20]
    numeric = sum(bool(re.fullmatch(rb"[\s,;]*([-+0-9.eE]+[\s,;]+){2,}[-+0-9.eE]+[\s,;]*", ln)) for ln in lines)
    if lines and numeric >= max(1, len(lines) // 2):
        return _table_kind(path)
    return "text"


def detect_modality(path: str | Path) -> str:
    """The media kind of a file (one of MEDIA_KINDS), from its extension checked against its content.

    Rules where an extension is shared: an MP4/WebM/MKV without a video track is "audio"; a 16-bit grayscale
    PNG or TIFF (or a floating-point TIFF) is "depth"; ``.npy`` / ``.npz`` is "imu" for (6, T), "point" for (N, 3..16),
    "depth" for (H, W); ``.csv`` is "imu" when its header names IMU channels (acc_x, gyro_z, ax, gy...), else
    "point"; ``.txt`` is "text" unless it is a numeric table.
    "thermal" is never guessed (a thermal image looks like any grayscale photo): choose it explicitly.
    """
    p = Path(path)
    ext = p.suffix.lower()
    check_file(p, Limits(max_file_bytes=1 << 62))  # existence, emptiness, pickle extensions; size is the loader's
    fmt = sniff(p)
    if fmt in ("pickle", "zip"):
        raise MediaError(f"{p.name} is a {describe(fmt)}; pickled files can run arbitrary code when loaded, so "
                         "they are never opened. Upload the data as .npy, .ply, .csv or a media file.")
    kind = _DEFAULT_KIND.get(ext)
    if kind is None:
        kind = _KIND_OF_FORMAT.get(fmt)
        if kind is None:
            raise MediaError(f"{p.name}: unrecognised file type ({describe(fmt)}). "
                             f"Accepted: {' '.join(ALL_EXTENSIONS)}")
    if fmt not in _FORMATS_OF_KIND[kind] and not (kind == "video" and fmt in AUDIO_FORMATS):
        label = KINDS[kind].label
        article = "an" if label[0].lower() in "aeiou" else "a"  # "an audio file", "an IMU recording"
        raise MediaError(f"{p.name} is named like {article} {label} file but its content looks like {describe(fmt)}. "
                         f"Accepted for {label}: {' '.join(KINDS[kind].extensions)}")
    if kind == "video" and (fmt not in VIDEO_FORMATS or sound_only(p)):
        return "audio"
    if kind == "image" and fmt in ("png", "tiff"):
        try:
            with Image.open(p) as img:
                if img.mode.startswith("I;16") or img.mode in ("I", "F"):
                    return "depth"
        except Exception:
            pass  # the image loader gives the proper error
    if kind == "point" and fmt in ARRAY_FORMATS:
        return _array_kind(p)
    if ext == ".csv":
        return _table_kind(p)
    if ext == ".txt":
        return _txt_kind(p)
    return kind


__all__ = ["detect_modality", "accepted_table", "MEDIA_KINDS"]
