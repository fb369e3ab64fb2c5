"""IMU recording -> (6, L) float32 for the IMU encoder (6 = cfg.imu_channels, L = cfg.imu_length = 2000).

The reference ships no IMU loader; ImageBind was trained on Ego4D IMU windows of 2000 steps (10 s at
200 Hz) with channels accelerometer x, y, z then gyroscope x, y, z. Accepted:

- ``.npy`` / ``.npz`` of shape (6, T) or (T, 6) (a (6, 6) array is read as (6, T));
- ``.csv`` / ``.txt`` in either orientation, as ``.npy``: one row per time step with 6 numeric columns (acc xyz,
  gyro xyz), or 7 when the first is a timestamp; or one row per channel (6 rows of T values, or 7 when the first
  row is a timestamp). A timestamp column/row is recognised by being strictly increasing and dropped; header
  lines are skipped; a table of 6 (or 7) rows *and* 6 (or 7) columns is read as one row per time step. Any other
  shape is refused.

Processing: the whole recording is resampled linearly to L steps (so ~10 s recordings match training best;
the sampling rate is not needed), then each channel is standardised to zero mean and unit variance (units
(m/s^2 or g, rad/s or deg/s) vary between devices, and standardising makes them irrelevant; a constant channel
becomes zeros).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ibllm.config import ImageBindConfig
from ibllm.media.arrays import ARRAY_FORMATS, array_header, read_array
from ibllm.media.errors import MediaError
from ibllm.media.limits import DEFAULT_LIMITS, Limits
from ibllm.media.pointio import read_table
from ibllm.media.validate import check_file, check_finite, require_format

IMU_EXTENSIONS = (".npy", ".npz", ".csv", ".txt")


def read_imu(path: str | Path, channels: int = 6, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """Any accepted IMU file -> (channels, T) float64."""
    p = Path(path)
    check_file(p, limits)
    fmt = require_format(p, ARRAY_FORMATS + ("text",), "IMU data (.npy/.npz or a .csv table)")
    if fmt in ARRAY_FORMATS:
        shape, _ = array_header(p)
        if len(shape) != 2 or channels not in shape:
            raise MediaError(f"{p.name}: IMU data must have shape ({channels}, T) or (T, {channels}); "
                             f"this one is {shape}")
        arr = read_array(p, limits, "IMU recording").astype(np.float64)
        data = arr if shape[0] == channels else arr.T
    else:
        data = _imu_table(p, channels, limits)
    if data.shape[1] > limits.max_imu_samples:
        raise MediaError(f"{p.name} has {data.shape[1]:,} time steps; the limit is {limits.max_imu_samples:,}")
    return data


def _drop_timestamps(table: np.ndarray, channels: int) -> np.ndarray:
    """(channels + 1, T) -> (channels, T): the first row is dropped when it is strictly increasing (a clock);
    otherwise the first ``channels`` rows are the channels."""
    if table.shape[0] == channels:
        return table
    if table.shape[1] > 1 and (np.diff(table[0]) > 0).all():
        return table[1:]
    return table[:channels]


def _imu_table(path: Path, channels: int, limits: Limits) -> np.ndarray:
    """A text table in either orientation -> (channels, T)."""
    table = read_table(path, limits, min_columns=channels, max_columns=limits.max_imu_samples + 1,
                       max_rows=limits.max_imu_samples + 1)
    rows, cols = table.shape
    if cols in (channels, channels + 1):  # one row per time step (also the reading of a small square table)
        return _drop_timestamps(table.T, channels)
    if rows in (channels, channels + 1):  # one row per channel
        return _drop_timestamps(table, channels)
    raise MediaError(f"{path.name}: an IMU table needs {channels} values per time step (acc xyz, gyro xyz; a "
                     f"timestamp may come first), one row per time step or one row per channel; this one has "
                     f"{rows:,} rows of {cols:,} values")


def imu_to_tensor(data: np.ndarray, length: int, name: str = "IMU data") -> torch.Tensor:
    """(C, T) -> (C, length): linear resampling, then per-channel standardisation."""
    if data.ndim != 2 or data.shape[1] < 2:
        raise MediaError(f"{name}: at least 2 time steps are needed, got shape {data.shape}")
    check_finite(data, name, "the IMU recording")
    x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float64))[None]
    x = torch.nn.functional.interpolate(x, size=length, mode="linear", align_corners=True)[0]
    mean = x.mean(dim=1, keepdim=True)
    std = x.std(dim=1, unbiased=False, keepdim=True)
    x = torch.where(std > 1e-12, (x - mean) / std.clamp_min(1e-12), torch.zeros_like(x)).to(torch.float32)
    if not torch.isfinite(x).all():  # finite input whose squares overflow
        raise MediaError(f"{name}: the IMU values are too large to process (damaged file?)")
    return x


def load_imu(path: str | Path, cfg: ImageBindConfig | None = None, limits: Limits = DEFAULT_LIMITS) -> torch.Tensor:
    """IMU file -> (cfg.imu_channels, cfg.imu_length) float32 (see the module docstring)."""
    cfg = cfg or ImageBindConfig()
    return imu_to_tensor(read_imu(path, cfg.imu_channels, limits), cfg.imu_length, Path(path).name)


__all__ = ["load_imu", "read_imu", "imu_to_tensor", "IMU_EXTENSIONS"]
