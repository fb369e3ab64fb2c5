"""Point-cloud loader: every format (open3d-written and our own), resampling, normalisation, hostile files."""

from __future__ import annotations

import dataclasses
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ibllm.config import ImageBindConfig, PointConfig
from ibllm.media import DEFAULT_LIMITS, MediaError, pointio
from ibllm.media.open3d_reader import import_open3d
from ibllm.media.point import is_normalized, load_point, read_points
from tests.media_samples import sphere_points, write_ply

N = 64
CFG = ImageBindConfig(point=PointConfig(num_points=N))
XYZ = sphere_points(200)


def _open3d():
    try:
        return import_open3d()
    except ImportError as exc:
        pytest.skip(f"open3d is not importable here: {exc}")


def _check_unit(x: torch.Tensor, n: int = N) -> None:
    assert x.shape == (n, 3) and x.dtype == torch.float32
    assert float(x.norm(dim=1).max()) == pytest.approx(1.0, abs=1e-5)
    assert float(x.mean(dim=0).norm()) < 0.1


def test_the_package_ply_writer_round_trips(tmp_path):
    """pointio.write_ply (the UI's previews and the toy world write with it) is read back by read_points and open3d."""
    colours = np.arange(len(XYZ) * 3).reshape(-1, 3) % 256
    for name, c in (("plain.ply", None), ("coloured.ply", colours)):
        path = pointio.write_ply(tmp_path / name, XYZ, c)
        np.testing.assert_allclose(read_points(path), XYZ.astype(np.float32), rtol=0, atol=0)
        assert load_point(path, CFG).shape == (N, 3)
    o3d = _open3d()
    cloud = o3d.io.read_point_cloud(str(tmp_path / "coloured.ply"))
    np.testing.assert_allclose(np.asarray(cloud.points), XYZ.astype(np.float32))
    np.testing.assert_allclose(np.asarray(cloud.colors) * 255, colours, atol=1e-3)


@pytest.mark.parametrize("fmt", ["ascii", "binary_little_endian", "binary_big_endian"])
@pytest.mark.parametrize("faces_first", [False, True])
def test_own_ply_writer(tmp_path, fmt, faces_first):
    path = write_ply(tmp_path / "a.ply", XYZ, fmt, faces_first)
    np.testing.assert_allclose(read_points(path), XYZ, rtol=1e-6, atol=1e-5)
    _check_unit(load_point(path, CFG))


@pytest.mark.parametrize("name,kw", [("a.ply", {"write_ascii": True}), ("b.ply", {"write_ascii": False}),
                                     ("a.pcd", {"write_ascii": True}), ("b.pcd", {"write_ascii": False})])
def test_open3d_files(tmp_path, name, kw):
    o3d = _open3d()
    pc = o3d.geometry.PointCloud()
    pc.points = o3d.utility.Vector3dVector(XYZ)
    pc.colors = o3d.utility.Vector3dVector(np.full_like(XYZ, 0.5))
    assert o3d.io.write_point_cloud(str(tmp_path / name), pc, **kw)
    np.testing.assert_allclose(read_points(tmp_path / name), XYZ, rtol=1e-5, atol=1e-5)


def test_compressed_pcd_is_read_through_open3d_in_a_child(tmp_path):
    o3d = _open3d()
    pc = o3d.geometry.PointCloud()
    pc.points = o3d.utility.Vector3dVector(XYZ)
    o3d.io.write_point_cloud(str(tmp_path / "c.pcd"), pc, write_ascii=False, compressed=True)
    np.testing.assert_allclose(read_points(tmp_path / "c.pcd"), XYZ, rtol=1e-5, atol=1e-5)
    _check_unit(load_point(tmp_path / "c.pcd", CFG))


def test_corrupt_compressed_pcd_is_a_media_error(tmp_path):
    o3d = _open3d()
    pc = o3d.geometry.PointCloud()
    pc.points = o3d.utility.Vector3dVector(XYZ)
    o3d.io.write_point_cloud(str(tmp_path / "c.pcd"), pc, write_ascii=False, compressed=True)
    data = bytearray((tmp_path / "c.pcd").read_bytes())
    header_end = data.index(b"DATA binary_compressed") + len(b"DATA binary_compressed\n")
    data[header_end + 8:] = bytes(len(data) - header_end - 8)  # keep the sizes, zero the LZF stream
    (tmp_path / "bad.pcd").write_bytes(bytes(data[: header_end + 40]))
    with pytest.raises(MediaError, match="bad.pcd"):
        load_point(tmp_path / "bad.pcd", CFG)


def test_text_tables_obj_and_npy(tmp_path):
    rows = "\n".join(f"{x:.6f} {y:.6f} {z:.6f} 255 0 0" for x, y, z in XYZ)
    (tmp_path / "a.xyz").write_text(rows + "\n")
    (tmp_path / "a.pts").write_text(f"{len(XYZ)}\n" + rows + "\n")  # leading count line
    (tmp_path / "a.csv").write_text("x,y,z,intensity\n" + rows.replace(" ", ",") + "\n")
    (tmp_path / "a.txt").write_text("# scan\n" + rows.replace(" ", "\t") + "\n")
    (tmp_path / "a.obj").write_text("# cube\nmtllib x.mtl\n" + "".join(f"v {x} {y} {z}\n" for x, y, z in XYZ)
                                    + "vn 0 0 1\n")  # no faces: a point set (a mesh is sampled: test_mesh)
    np.save(tmp_path / "a.npy", np.hstack([XYZ, np.ones_like(XYZ)]).astype(np.float32))
    for name in ("a.xyz", "a.pts", "a.csv", "a.txt", "a.obj", "a.npy"):
        np.testing.assert_allclose(read_points(tmp_path / name), XYZ, atol=1e-5, err_msg=name)
        _check_unit(load_point(tmp_path / name, CFG))


def test_already_normalised_cloud_passes_through_unchanged(tmp_path):
    half = sphere_points(N // 2, radius=0.97, centre=(0.0, 0.0, 0.0))
    pts = (np.concatenate([half, -half]) + 0.01).astype(np.float32)  # centroid (0.01, 0.01, 0.01)
    assert is_normalized(pts)
    np.save(tmp_path / "unit.npy", pts)
    assert torch.equal(load_point(tmp_path / "unit.npy", CFG), torch.from_numpy(pts))


def test_resampling_is_deterministic(tmp_path):
    np.save(tmp_path / "many.npy", sphere_points(1000))
    np.save(tmp_path / "few.npy", sphere_points(10))
    many, few = load_point(tmp_path / "many.npy", CFG), load_point(tmp_path / "few.npy", CFG)
    _check_unit(many)
    _check_unit(few)
    assert torch.equal(many, load_point(tmp_path / "many.npy", CFG))
    assert len(torch.unique(few, dim=0)) == 10  # upsampled by repetition: every point kept
    assert load_point(tmp_path / "many.npy").shape == (8192, 3)  # default: Point-Bind's 8192


def test_hostile_and_malformed(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "cloud.pt").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(MediaError, match="arbitrary code"):
        load_point(tmp_path / "cloud.pt")
    # An object array inside a .npy: refused from the header, never unpickled.
    buf = io.BytesIO()
    np.save(buf, np.array([Exploit(), 1], dtype=object), allow_pickle=True)
    (tmp_path / "obj.npy").write_bytes(buf.getvalue())
    with pytest.raises(MediaError, match="Python objects"):
        load_point(tmp_path / "obj.npy")
    assert not marker.exists()

    bad = XYZ.copy()
    bad[5, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(MediaError, match="NaN"):
        load_point(tmp_path / "nan.npy")
    np.save(tmp_path / "one.npy", np.zeros((1, 3)))
    with pytest.raises(MediaError, match="at least 4"):
        load_point(tmp_path / "one.npy")
    np.save(tmp_path / "same.npy", np.ones((50, 3)))
    with pytest.raises(MediaError, match="same position"):
        load_point(tmp_path / "same.npy")
    np.save(tmp_path / "flat.npy", np.zeros((50,)))
    with pytest.raises(MediaError, match=r"\(N, 3\)"):
        load_point(tmp_path / "flat.npy")


def test_limits_and_truncation(tmp_path):
    limits = dataclasses.replace(DEFAULT_LIMITS, max_points=100)
    np.save(tmp_path / "big.npy", XYZ)
    write_ply(tmp_path / "big.ply", XYZ, "binary_little_endian")
    (tmp_path / "big.xyz").write_text("\n".join("1 2 3" for _ in range(200)))
    for name in ("big.npy", "big.ply", "big.xyz"):
        with pytest.raises(MediaError, match="limit is 100"):
            load_point(tmp_path / name, CFG, limits)
    # A tiny PLY that declares a billion vertices: refused by the count limit, never allocated.
    header = (b"ply\nformat binary_little_endian 1.0\nelement vertex 1000000000\n"
              b"property float x\nproperty float y\nproperty float z\nend_header\n")
    (tmp_path / "liar.ply").write_bytes(header + b"\0" * 24)
    with pytest.raises(MediaError, match="limit is"):
        load_point(tmp_path / "liar.ply")
    data = write_ply(tmp_path / "full.ply", XYZ, "binary_big_endian").read_bytes()
    (tmp_path / "cut.ply").write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="truncated"):
        load_point(tmp_path / "cut.ply")
    # A text cloud cut inside a line: truncated (it read as a "malformed" line), for PLY and PCD alike
    data = write_ply(tmp_path / "full.ply", XYZ, "ascii").read_bytes()
    pcd = b"VERSION .7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH %d\nHEIGHT 1\nPOINTS %d\n" \
          b"DATA ascii\n" % (len(XYZ), len(XYZ)) + b"".join(b"%.6f %.6f %.6f\n" % tuple(p) for p in XYZ)
    for name, text in (("cut.ply", data), ("cut.pcd", pcd)):
        cut = text[: len(text) // 2]
        (tmp_path / name).write_bytes(cut[: cut.rindex(b" ") + 1])  # ends after a number's space: one short
        with pytest.raises(MediaError, match="truncated"):
            load_point(tmp_path / name)
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1_000_000, 3)))
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    (tmp_path / "liar.npy").write_bytes(buf.getvalue() + b"\0" * 48)
    with pytest.raises(MediaError, match="truncated"):
        load_point(tmp_path / "liar.npy")


def test_wrong_content_and_empty(tmp_path):
    (tmp_path / "a.ply").write_text("hello\n")
    with pytest.raises(MediaError, match="plain text"):
        load_point(tmp_path / "a.ply")
    (tmp_path / "b.xyz").write_text("no numbers here\nnone at all\n")
    with pytest.raises(MediaError, match="numeric columns"):
        load_point(tmp_path / "b.xyz")
    (tmp_path / "c.npy").write_bytes(b"")
    with pytest.raises(MediaError, match="empty"):
        load_point(tmp_path / "c.npy")


def test_a_compressed_pcd_whose_block_sizes_do_not_fit_is_refused_before_open3d_starts(tmp_path):
    o3d = _open3d()
    pc = o3d.geometry.PointCloud()
    pc.points = o3d.utility.Vector3dVector(XYZ)
    o3d.io.write_point_cloud(str(tmp_path / "c.pcd"), pc, write_ascii=False, compressed=True)
    data = (tmp_path / "c.pcd").read_bytes()
    (tmp_path / "cut.pcd").write_bytes(data[: len(data) - 10])
    with pytest.raises(MediaError, match="cut.pcd: the PCD file is truncated"):
        load_point(tmp_path / "cut.pcd", CFG)
    header_end = data.index(b"DATA binary_compressed") + len(b"DATA binary_compressed\n")
    wrong = bytearray(data)
    wrong[header_end + 4: header_end + 8] = (12345).to_bytes(4, "little")  # the uncompressed size
    (tmp_path / "wrong.pcd").write_bytes(bytes(wrong))
    with pytest.raises(MediaError, match="wrong.pcd: the PCD file is damaged"):
        load_point(tmp_path / "wrong.pcd", CFG)
