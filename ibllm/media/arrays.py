"""NumPy array files (``.npy``, and ``.npz`` archives as ``np.savez`` writes them), read without ever unpickling.

Point clouds, depth maps and IMU recordings may each come as an array file; the loaders ask ``array_header``
for the shape first (to pick the kind and to check it against the limits), then ``read_array`` for the data.

An ``.npz`` is a zip of ``.npy`` members. Its one array is used; of several, the one named for what it holds
(``points``, ``xyz``, ``depth``, ``imu``) when exactly one is, otherwise the upload is refused with the names it
holds. A member is read through the zip's own stream, so it can never yield more bytes than its entry declares,
and that declared size is checked against the per-file limit before anything is inflated (a small archive can
unpack to gigabytes).
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np

from ibllm.media.errors import MediaError
from ibllm.media.limits import Limits
from ibllm.media.sniff import sniff
from ibllm.media.validate import human_bytes

ARRAY_FORMATS = ("npy", "npz")
"""The sniffed content families of an array file."""

# Member names that say which array of a multi-array archive is the data (the rest are e.g. colours, labels).
_DATA_NAMES = ("points", "xyz", "depth", "imu")


def _member(archive: zipfile.ZipFile, name: str) -> zipfile.ZipInfo:
    arrays = [m for m in archive.infolist() if m.filename.endswith(".npy") and not m.is_dir()]
    if not arrays:
        raise MediaError(f"{name}: the .npz archive holds no array")
    if len(arrays) == 1:
        return arrays[0]
    named = [m for m in arrays if m.filename[:-4].lower() in _DATA_NAMES]
    if len(named) == 1:
        return named[0]
    keys = ", ".join(m.filename[:-4] for m in arrays[:8]) + (", ..." if len(arrays) > 8 else "")
    raise MediaError(f"{name}: the .npz archive holds {len(arrays)} arrays ({keys}) and none is named "
                     f"{', '.join(_DATA_NAMES)}; save the one to use on its own (np.save, or np.savez with one "
                     "array) and upload that")


@contextmanager
def _opened(path: Path) -> Iterator[tuple[IO[bytes], int]]:
    """The array's stream, positioned at its .npy magic, and the bytes it holds (an .npz member's declared size)."""
    if sniff(path) == "npz":
        with zipfile.ZipFile(path) as archive:
            info = _member(archive, path.name)
            with archive.open(info) as fh:
                yield fh, info.file_size
    else:
        with open(path, "rb") as fh:
            yield fh, path.stat().st_size


def _header(fh: IO[bytes], size: int, name: str) -> tuple[tuple[int, ...], np.dtype, bool]:
    """Shape, dtype and Fortran order from the .npy header at the stream's position, checked: numeric or at least
    not objects, non-negative dimensions, and no more data promised than ``size`` holds."""
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh, max_header_size=10_000)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh, max_header_size=10_000)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
        data_start = fh.tell()
    except Exception as exc:
        raise MediaError(f"{name}: not a valid .npy array ({exc})") from None
    if dtype.hasobject:
        raise MediaError(f"{name} holds Python objects (a pickle inside a .npy), which are never loaded because "
                         "unpickling can run arbitrary code. Save a plain numeric array instead.")
    if any(d < 0 for d in shape):
        raise MediaError(f"{name}: invalid array shape {shape}")
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if need > size - data_start:
        raise MediaError(f"{name} is truncated: its header declares {shape} {dtype} "
                         f"({need:,} bytes) but only {max(size - data_start, 0):,} bytes follow")
    return tuple(shape), dtype, fortran


def array_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of the array in a .npy or .npz file, without reading the data (and never unpickling).

    Also checks that the file (or the archive entry) holds as many bytes as the header promises, so a tiny file
    cannot make the reader allocate a huge array.
    """
    try:
        with _opened(path) as (fh, size):
            shape, dtype, _ = _header(fh, size, path.name)
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as exc:
        raise MediaError(f"{path.name}: the .npz archive is damaged or cut short ({exc}); save it again and "
                         "upload it again") from None
    return shape, dtype


def read_array(path: Path, limits: Limits, what: str = "array") -> np.ndarray:
    """The numeric array of a .npy or .npz file; header, dtype and size are checked before the data is read."""
    name = path.name
    try:
        with _opened(path) as (fh, size):
            if size > limits.max_file_bytes:
                raise MediaError(f"{name}: its array unpacks to {human_bytes(size)}; the limit is "
                                 f"{human_bytes(limits.max_file_bytes)} per file")
            shape, dtype, fortran = _header(fh, size, name)
            if dtype.kind not in "biuf":
                raise MediaError(f"{name}: the {what} must be numeric, not {dtype}")
            count = int(np.prod(shape, dtype=object))
            data = fh.read(count * dtype.itemsize)
    except MediaError:
        raise
    except Exception as exc:  # a corrupt deflate stream, a CRC mismatch, an unsupported compression ...
        raise MediaError(f"{name}: the array file could not be read ({exc})") from None
    if len(data) < count * dtype.itemsize:
        raise MediaError(f"{name} is truncated: {len(data):,} of the {count * dtype.itemsize:,} bytes its header "
                         "declares are there")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C").copy()


__all__ = ["ARRAY_FORMATS", "array_header", "read_array"]
