"""Depth, thermal and IMU loaders (the reference ships none: these check the documented conventions)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ibllm.config import ImageBindConfig
from ibllm.media import MediaError, detect_modality
from ibllm.media.depth import load_depth
from ibllm.media.imu import load_imu
from ibllm.media.thermal import THERMAL_MEAN, THERMAL_STD, load_thermal
from tests.media_samples import write_image

SMALL = ImageBindConfig(image_size=32, imu_length=100)


def _ramp_depth_mm(h: int = 48, w: int = 64) -> np.ndarray:
    return np.tile(np.linspace(500, 5000, w), (h, 1)).astype(np.uint16)  # 0.5 m (left) .. 5 m (right)


def test_depth_16bit_png_npy_and_8bit_agree_on_structure(tmp_path):
    mm = _ramp_depth_mm()
    Image.fromarray(mm).save(tmp_path / "d16.png")
    np.save(tmp_path / "d.npy", mm.astype(np.float32) / 1000.0)
    a, b = load_depth(tmp_path / "d16.png", SMALL), load_depth(tmp_path / "d.npy", SMALL)
    assert a.shape == (1, 32, 32) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert a[0, :, 0].mean() > a[0, :, -1].mean()  # disparity: near (left) is large
    assert float(a.mean()) == pytest.approx(0, abs=1e-5) and float(a.std(unbiased=False)) == pytest.approx(1, abs=1e-4)
    # An 8-bit visualisation is taken as inverse depth already (brighter = nearer).
    vis = np.tile(np.linspace(255, 0, 64), (48, 1)).astype(np.uint8)
    Image.fromarray(vis).save(tmp_path / "vis.png")
    c = load_depth(tmp_path / "vis.png", SMALL)
    assert c[0, :, 0].mean() > c[0, :, -1].mean()


def test_depth_missing_values_and_shapes(tmp_path):
    d = np.full((1, 40, 40), 2.0, np.float32)
    d[0, :10] = np.nan  # missing measurements are allowed in depth maps
    d[0, 10:20] = 0
    np.save(tmp_path / "holes.npy", d)
    assert torch.isfinite(load_depth(tmp_path / "holes.npy", SMALL)).all()
    np.save(tmp_path / "none.npy", np.zeros((20, 20), np.float32))
    with pytest.raises(MediaError, match="no valid"):
        load_depth(tmp_path / "none.npy", SMALL)
    np.save(tmp_path / "cube.npy", np.ones((4, 20, 20), np.float32))
    with pytest.raises(MediaError, match=r"\(H, W\)"):
        load_depth(tmp_path / "cube.npy", SMALL)
    (tmp_path / "t.png").write_text("no")
    with pytest.raises(MediaError, match="plain text"):
        load_depth(tmp_path / "t.png", SMALL)


def test_thermal_gray_colour_and_16bit(tmp_path):
    write_image(tmp_path / "t.png", 64, 48, mode="L")
    x = load_thermal(tmp_path / "t.png", SMALL)
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32
    unit = x * THERMAL_STD + THERMAL_MEAN
    assert float(unit.min()) >= 0 and float(unit.max()) <= 1
    assert load_thermal(write_image(tmp_path / "c.jpg", 64, 48), SMALL).shape == (1, 32, 32)
    raw = np.tile(np.linspace(7000, 7600, 64), (48, 1)).astype(np.uint16)  # radiometric counts
    Image.fromarray(raw).save(tmp_path / "r16.png")
    unit16 = load_thermal(tmp_path / "r16.png", SMALL) * THERMAL_STD + THERMAL_MEAN
    assert float(unit16.max() - unit16.min()) > 0.5  # stretched (the crop cuts the ends), not a flat gray


def test_imu_layouts_agree(tmp_path):
    t = np.linspace(0, 10, 500)
    data = np.stack([np.sin(t * (k + 1)) * (k + 1) + k for k in range(6)])  # (6, T)
    np.save(tmp_path / "ct.npy", data)
    np.save(tmp_path / "tc.npy", data.T)
    header = "timestamp,acc_x,acc_y,acc_z,gyro_x,gyro_y,gyro_z\n"
    (tmp_path / "a.csv").write_text(header + "\n".join(",".join(f"{v:.9f}" for v in (ti, *row))
                                                         for ti, row in zip(t, data.T, strict=True)))
    x = load_imu(tmp_path / "ct.npy", SMALL)
    assert x.shape == (6, 100) and x.dtype == torch.float32
    torch.testing.assert_close(x.mean(dim=1), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dim=1, unbiased=False), torch.ones(6), atol=1e-4, rtol=0)
    torch.testing.assert_close(load_imu(tmp_path / "tc.npy", SMALL), x)
    torch.testing.assert_close(load_imu(tmp_path / "a.csv", SMALL), x, atol=1e-5, rtol=0)
    assert load_imu(tmp_path / "ct.npy").shape == (6, 2000)


@pytest.mark.parametrize("steps", [40, 2000])
@pytest.mark.parametrize("ext", ["csv", "txt"])
def test_imu_tables_in_both_orientations_equal_the_npy(tmp_path, steps, ext):
    rng = np.random.default_rng(steps)
    data = np.cumsum(rng.standard_normal((6, steps)), axis=1)  # (6, T)
    clock = np.arange(steps) / 200.0
    np.save(tmp_path / "ref.npy", data)
    sep = "," if ext == "csv" else " "
    tables = {"rows": data, "rows_clock": np.vstack([clock, data]), "cols": data.T,
              "cols_clock": np.vstack([clock, data]).T}
    expected = load_imu(tmp_path / "ref.npy", SMALL)
    for name, table in tables.items():
        path = tmp_path / f"{name}.{ext}"
        np.savetxt(path, table, delimiter=sep, fmt="%.10g")
        torch.testing.assert_close(load_imu(path, SMALL), expected, atol=1e-6, rtol=0, msg=name)
    # One row per channel is unmistakable, so detection names it IMU (one row per step stays a point cloud
    # unless its header says acc/gyr: a 6-column table is also xyz + normals).
    if steps > 16:
        assert detect_modality(tmp_path / f"rows.{ext}") == "imu"
        assert detect_modality(tmp_path / f"rows_clock.{ext}") == "imu"


def test_imu_tables_of_other_shapes_are_refused(tmp_path):
    np.savetxt(tmp_path / "nine.csv", np.ones((9, 40)), delimiter=",")
    with pytest.raises(MediaError, match="9 rows of 40 values"):
        load_imu(tmp_path / "nine.csv", SMALL)
    np.savetxt(tmp_path / "wide.csv", np.ones((100, 9)), delimiter=",")
    with pytest.raises(MediaError, match="100 rows of 9 values"):
        load_imu(tmp_path / "wide.csv", SMALL)


def test_imu_errors(tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((5, 100)))
    with pytest.raises(MediaError, match=r"\(6, T\)"):
        load_imu(tmp_path / "bad.npy", SMALL)
    nan = np.ones((6, 50))
    nan[2, 7] = np.inf
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(MediaError, match="NaN or infinite"):
        load_imu(tmp_path / "nan.npy", SMALL)
    np.save(tmp_path / "one.npy", np.zeros((6, 1)))
    with pytest.raises(MediaError, match="at least 2"):
        load_imu(tmp_path / "one.npy", SMALL)
    (tmp_path / "few.csv").write_text("1,2,3\n4,5,6\n")
    with pytest.raises(MediaError, match="6 numeric columns"):
        load_imu(tmp_path / "few.csv", SMALL)


@pytest.mark.parametrize("sep", [";", "\t"])
def test_an_imu_table_with_decimal_commas_reads_as_the_same_table_with_points(tmp_path, sep):
    """A spreadsheet exported in a locale that writes 9,81 separates its columns with semicolons or tabs."""
    from ibllm.media.imu import read_imu

    rows = np.random.default_rng(3).normal(size=(120, 6)).round(4)
    plain = "ax,ay,az,gx,gy,gz\n" + "".join(",".join(f"{v}" for v in r) + "\n" for r in rows)
    local = sep.join(["ax", "ay", "az", "gx", "gy", "gz"]) + "\n" + \
        "".join(sep.join(f"{v}".replace(".", ",") for v in r) + "\n" for r in rows)
    (tmp_path / "plain.csv").write_text(plain)
    (tmp_path / "local.csv").write_text(local)
    np.testing.assert_array_equal(read_imu(tmp_path / "local.csv"), rows.T)
    np.testing.assert_array_equal(read_imu(tmp_path / "plain.csv"), rows.T)


def test_tiff_files_read_as_the_same_pictures_in_png_and_npy(tmp_path):
    """TIFF (a thermal camera's or a depth sensor's export): 8-bit is a picture, 16-bit is depth in millimetres
    (as a 16-bit PNG), floating point is depth in metres (as a .npy); a 16-bit TIFF asked as thermal reads as the
    16-bit PNG does."""
    from ibllm.media import detect_modality, load_media

    rng = np.random.default_rng(5)
    rgb = (rng.random((40, 50, 3)) * 255).astype(np.uint8)
    mm = (rng.random((40, 50)) * 4000 + 300).astype(np.uint16)
    Image.fromarray(rgb).save(tmp_path / "photo.tif")
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    Image.fromarray(mm).save(tmp_path / "scan.tiff")
    Image.fromarray(mm).save(tmp_path / "scan.png")
    Image.fromarray(mm.astype(np.float32) / 1000).save(tmp_path / "metres.tiff")
    np.save(tmp_path / "metres.npy", mm.astype(np.float32) / 1000)
    assert detect_modality(tmp_path / "photo.tif") == "image"
    assert detect_modality(tmp_path / "scan.tiff") == detect_modality(tmp_path / "metres.tiff") == "depth"
    torch.testing.assert_close(load_media(tmp_path / "photo.tif"), load_media(tmp_path / "photo.png"))
    torch.testing.assert_close(load_media(tmp_path / "scan.tiff"), load_media(tmp_path / "scan.png"))
    torch.testing.assert_close(load_media(tmp_path / "metres.tiff"), load_media(tmp_path / "metres.npy"))
    torch.testing.assert_close(load_media(tmp_path / "scan.tiff", "thermal"), load_media(tmp_path / "scan.png",
                                                                                      "thermal"))
