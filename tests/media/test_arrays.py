"""NumPy array files: an .npz reads as the .npy of the same array, for every kind an array can be, and a hostile
archive is refused with a message before it can inflate or unpickle anything."""

from __future__ import annotations

import dataclasses
import io
import zipfile

import numpy as np
import pytest
import torch

from ibllm.media.depth import load_depth
from ibllm.media.detect import detect_modality
from ibllm.media.errors import MediaError
from ibllm.media.imu import load_imu
from ibllm.media.limits import DEFAULT_LIMITS, MB
from ibllm.media.point import load_point

RNG = np.random.default_rng(3)
ARRAYS = {
    "point": (load_point, RNG.normal(size=(700, 3)).astype(np.float32)),
    "depth": (load_depth, RNG.uniform(0.4, 6.0, size=(90, 130))),
    "imu": (load_imu, RNG.normal(size=(6, 500))),
}


@pytest.mark.parametrize("kind", ARRAYS)
@pytest.mark.parametrize("writer", ["savez", "savez_compressed", "named with others"])
def test_an_npz_reads_as_the_npy_of_its_array(tmp_path, kind, writer):
    load, data = ARRAYS[kind]
    np.save(tmp_path / "plain.npy", data)
    archive = tmp_path / "archive.npz"
    if writer == "named with others":  # the data named for its kind, next to arrays that are not the data
        np.savez_compressed(archive, **{"xyz" if kind == "point" else kind: data}, labels=np.arange(4),
                            colours=np.ones((5, 3)))
    else:
        getattr(np, writer)(archive, data)
    assert detect_modality(archive) == detect_modality(tmp_path / "plain.npy") == kind
    assert torch.equal(load(archive), load(tmp_path / "plain.npy"))


def test_a_fortran_ordered_member_keeps_its_values(tmp_path):
    data = np.asfortranarray(RNG.normal(size=(6, 300)))
    np.savez(tmp_path / "f.npz", data)
    np.save(tmp_path / "c.npy", np.ascontiguousarray(data))
    assert torch.equal(load_imu(tmp_path / "f.npz"), load_imu(tmp_path / "c.npy"))


def _zip(path, members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, blob in members.items():
            archive.writestr(name, blob)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def test_an_archive_that_inflates_past_the_file_limit_is_refused_before_it_is_read(tmp_path):
    bomb = tmp_path / "bomb.npz"
    np.savez_compressed(bomb, points=np.zeros((200_000, 3)))  # 4.8 MB of zeros in a few kB
    assert bomb.stat().st_size < 100_000
    small = dataclasses.replace(DEFAULT_LIMITS, max_file_bytes=1 * MB)
    with pytest.raises(MediaError, match=r"unpacks to 4\.6 MB; the limit is 1\.0 MB"):
        load_point(bomb, limits=small)


def test_hostile_archives_are_refused_with_a_reason(tmp_path):
    _zip(tmp_path / "objects.npz", {"points.npy": _npy_bytes(np.array([{"x": 1}] * 4, dtype=object))})
    with pytest.raises(MediaError, match="Python objects"):
        load_point(tmp_path / "objects.npz")

    header = _npy_bytes(np.zeros((100_000, 3)))[:128]  # a header promising 2.4 MB, followed by nothing
    _zip(tmp_path / "promise.npz", {"points.npy": header})
    with pytest.raises(MediaError, match="truncated"):
        load_point(tmp_path / "promise.npz")

    np.savez(tmp_path / "two.npz", first=np.zeros((9, 3)), second=np.ones((9, 3)))
    with pytest.raises(MediaError, match=r"2 arrays \(first, second\)"):
        load_point(tmp_path / "two.npz")

    whole = tmp_path / "whole.npz"
    np.savez_compressed(whole, RNG.normal(size=(2000, 3)))
    blob = whole.read_bytes()
    (tmp_path / "cut.npz").write_bytes(blob[: len(blob) // 2])
    damaged = bytearray(blob)
    damaged[200:260] = bytes(60)  # inside the deflate stream: the CRC (or the inflater) catches it
    (tmp_path / "damaged.npz").write_bytes(bytes(damaged))
    for name in ("cut.npz", "damaged.npz"):
        with pytest.raises(MediaError, match=name):
            load_point(tmp_path / name)

    _zip(tmp_path / "notes.npz", {"readme.txt": b"no arrays here"})
    with pytest.raises(MediaError):
        detect_modality(tmp_path / "notes.npz")
    with pytest.raises(MediaError):
        load_point(tmp_path / "notes.npz")
