"""ibllm.ui.previews: what each input looks like in the panel, read by the media package's own readers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ibllm.media.limits import DEFAULT_LIMITS
from ibllm.media.pointio import read_ply
from ibllm.ui import previews


def test_point_cloud_preview_is_point_only_ply(tmp_path):
    pts = np.random.default_rng(0).normal(size=(300, 3)).astype(np.float32)
    (tmp_path / "cloud.xyz").write_text("\n".join(" ".join(f"{v:.5f}" for v in p) for p in pts))
    np.save(tmp_path / "cloud.npy", pts)
    for name in ("cloud.xyz", "cloud.npy"):
        p = previews.make_preview(str(tmp_path / name), "point")
        assert p.kind == "model3d", p.note
        data = Path(p.value).read_bytes()
        header, body = data.split(b"end_header\n", 1)
        assert b"element vertex 300" in header and b"element face" not in header
        rec = np.frombuffer(body, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("r", "u1"), ("g", "u1"),
                                         ("b", "u1")])
        xyz = np.stack([rec["x"], rec["y"], rec["z"]], axis=1)
        assert len(xyz) == 300 and np.linalg.norm(xyz, axis=1).max() == pytest.approx(1.0, abs=1e-5)
        # the media package's PLY parser reads what the preview wrote
        np.testing.assert_allclose(read_ply(Path(p.value), DEFAULT_LIMITS), xyz)


def test_depth_preview_shows_what_the_encoder_reads(tmp_path):
    # 16-bit PNG: millimetres, 0 = no reading; near is bright (as the encoder's disparity), no reading stays black
    depth = np.zeros((16, 16), np.uint16)
    depth[:8, 4:12] = 1000
    depth[8:, 4:12] = 4000
    Image.fromarray(depth).save(tmp_path / "d.png")
    p = previews.make_preview(str(tmp_path / "d.png"), "depth")
    with Image.open(p.value) as im:
        rgb = np.asarray(im).astype(int)
    assert rgb.shape == (16, 16, 3) and (rgb[0, 0] == 0).all()
    assert rgb[2, 6].sum() > rgb[12, 6].sum()  # 1 m is brighter than 4 m
    # 8-bit PNG: already relative inverse depth (brighter = nearer), so bright stays bright
    vis = np.full((16, 16), 40, np.uint8)
    vis[:8] = 220
    Image.fromarray(vis).save(tmp_path / "v.png")
    with Image.open(previews.make_preview(str(tmp_path / "v.png"), "depth").value) as im:
        rgb = np.asarray(im).astype(int)
    assert rgb[2, 2].sum() > rgb[12, 2].sum()


def test_imu_preview_reads_every_layout_the_encoder_reads(tmp_path):
    t = np.arange(500) / 200.0
    channels = np.stack([np.sin(t * (i + 1)) for i in range(6)])
    np.save(tmp_path / "imu.npy", channels.T.astype(np.float32))  # (T, 6)
    # a CSV with a header and a timestamp column (7 columns): the media reader drops the clock
    rows = ["t,ax,ay,az,gx,gy,gz",
            *(",".join(f"{v:.5f}" for v in (ts, *c)) for ts, c in zip(t, channels.T, strict=True))]
    (tmp_path / "imu.csv").write_text("\n".join(rows))
    for name in ("imu.npy", "imu.csv"):
        p = previews.make_preview(str(tmp_path / name), "imu")
        assert p.kind == "plot", p.note
        traces = p.value.data
        assert len(traces) == 6
        np.testing.assert_allclose(np.asarray(traces[2].y), channels[2], atol=1e-4)
    # a file that cannot be previewed gets a note, never an exception
    np.save(tmp_path / "bad.npy", np.zeros((3,), np.float32))
    assert previews.make_preview(str(tmp_path / "bad.npy"), "imu").kind == "none"


def test_thermal_and_text_previews(tmp_path):
    Image.fromarray(np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))).save(tmp_path / "t.png")
    p = previews.make_preview(str(tmp_path / "t.png"), "thermal")
    with Image.open(p.value) as im:
        rgb = np.asarray(im).astype(int)
    assert p.kind == "image" and rgb[0, -1].sum() > rgb[0, 0].sum()  # hotter is brighter
    (tmp_path / "t.txt").write_text("a red cube")
    assert previews.make_preview(str(tmp_path / "t.txt"), "text").value == "a red cube"


def test_a_preview_never_reads_past_the_limits(tmp_path):
    from tests.media_samples import png_with_declared_size

    bomb = png_with_declared_size(tmp_path / "bomb.png", 100_000, 100_000)
    p = previews.make_preview(str(bomb), "depth")
    assert p.kind == "none" and "megapixels" in p.note


def test_files_a_browser_cannot_show_are_previewed_as_copies_it_can(tmp_path):
    """Chromium shows no TIFF and plays no AIFF: their previews are a PNG and a FLAC of the same content."""
    import soundfile as sf

    rgb = (np.random.default_rng(2).random((30, 40, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.tiff")
    shown = previews.make_preview(str(tmp_path / "photo.tiff"), "image")
    assert shown.kind == "image" and shown.value.endswith(".png")
    np.testing.assert_array_equal(np.asarray(Image.open(shown.value)), rgb)
    samples = (np.sin(np.arange(8000) / 5.0) * 0.5)[:, None].repeat(2, axis=1)
    sf.write(tmp_path / "take.aiff", samples, 8000, subtype="PCM_16")
    heard = previews.make_preview(str(tmp_path / "take.aiff"), "audio")
    assert heard.kind == "audio" and heard.value.endswith(".flac")
    np.testing.assert_allclose(sf.read(heard.value)[0], sf.read(tmp_path / "take.aiff")[0], atol=1 / 32768)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    assert previews.make_preview(str(tmp_path / "photo.png"), "image").value == str(tmp_path / "photo.png")
