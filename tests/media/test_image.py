"""Image loader: real files of every accepted kind, and the malformed ones."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from ibllm.config import ImageBindConfig
from ibllm.media import DEFAULT_LIMITS, MediaError
from ibllm.media.image import CLIP_MEAN, CLIP_STD, image_to_tensor, load_image
from tests.media_samples import gradient_rgb, png_with_declared_size, write_image

SMALL = ImageBindConfig(image_size=32)


def _white() -> torch.Tensor:
    return torch.tensor([(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)])


@pytest.mark.parametrize("ext,kw", [("jpg", {"quality": 95}), ("png", {}), ("webp", {"lossless": True}),
                                    ("bmp", {}), ("gif", {})])
def test_formats_give_normalised_square(tmp_path, ext, kw):
    x = load_image(write_image(tmp_path / f"a.{ext}", 80, 50, **kw), SMALL)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert load_image(tmp_path / f"a.{ext}").shape == (3, 224, 224)  # default: ImageBind-Huge size


def test_pipeline_matches_pil_bicubic_and_centre_crop(tmp_path):
    path = write_image(tmp_path / "g.png", 90, 60)
    img = Image.open(path).convert("RGB").resize((48, 32), Image.BICUBIC).crop((8, 0, 40, 32))
    expected = (torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 - torch.tensor(CLIP_MEAN)[:, None,
                None]) / torch.tensor(CLIP_STD)[:, None, None]
    torch.testing.assert_close(load_image(path, SMALL), expected, atol=1e-6, rtol=0)


def test_exif_orientation_is_applied(tmp_path):
    arr = gradient_rgb(60, 40)
    upright = Image.fromarray(arr).transpose(Image.Transpose.ROTATE_270)  # what a viewer shows for tag 6
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(arr).save(tmp_path / "rot.jpg", quality=100, exif=exif.tobytes())
    upright.save(tmp_path / "upright.jpg", quality=100)
    got, ref = load_image(tmp_path / "rot.jpg", SMALL), load_image(tmp_path / "upright.jpg", SMALL)
    assert (got - ref).abs().mean() < 0.05  # same picture up to JPEG noise
    assert (load_image(tmp_path / "rot.jpg", SMALL) - image_to_tensor(Image.fromarray(arr), 32)).abs().mean() > 0.3


def test_alpha_is_flattened_onto_white(tmp_path):
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 0] = 255  # red but fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    x = load_image(tmp_path / "t.png", SMALL)
    torch.testing.assert_close(x, _white()[:, None, None].expand(3, 32, 32), atol=1e-5, rtol=0)


def test_palette_with_transparency_and_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (30, 30), c) for c in ((0, 0, 255), (255, 0, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    x = load_image(tmp_path / "anim.gif", SMALL)
    assert x[2].mean() > x[0].mean()  # blue, the first frame
    p = Image.new("P", (30, 30), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.save(tmp_path / "p.png", transparency=0)
    torch.testing.assert_close(load_image(tmp_path / "p.png", SMALL), _white()[:, None, None].expand(3, 32, 32),
                               atol=1e-5, rtol=0)


def test_grayscale_and_16_bit(tmp_path):
    write_image(tmp_path / "l.png", 40, 40, mode="L")
    x = load_image(tmp_path / "l.png", SMALL)
    assert torch.allclose(x[0] * CLIP_STD[0] + CLIP_MEAN[0], x[1] * CLIP_STD[1] + CLIP_MEAN[1], atol=1e-5)
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    y = load_image(tmp_path / "g16.png", SMALL)
    unit = y[0] * CLIP_STD[0] + CLIP_MEAN[0]
    assert unit[:, 0].mean() < 0.05 and unit[:, -1].mean() > 0.95  # scaled by range, not clipped to white


def test_tiny_image_is_upscaled(tmp_path):
    assert load_image(write_image(tmp_path / "tiny.png", 3, 2), SMALL).shape == (3, 32, 32)


@pytest.mark.parametrize("content,match", [
    (b"", "empty"),
    (b"just some words, not an image\n", "looks like plain text"),
    (b"RIFF\x24\x00\x00\x00WAVEfmt ", "looks like WAV audio"),
])
def test_wrong_or_empty_content(tmp_path, content, match):
    (tmp_path / "x.png").write_bytes(content)
    with pytest.raises(MediaError, match=match):
        load_image(tmp_path / "x.png")


def test_truncated_png(tmp_path):
    data = write_image(tmp_path / "full.png", 200, 200).read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="cut.png is truncated"):
        load_image(tmp_path / "cut.png")


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = png_with_declared_size(tmp_path / "bomb.png", 100_000, 100_000)
    assert path.stat().st_size < 200
    with pytest.raises(MediaError, match="megapixels") as e:
        load_image(path)
    # in our words and with our limit, not PIL's ("exceeds limit of 178956970 pixels, could be decompression bomb")
    assert "10000 megapixels; the limit is 50 megapixels" in str(e.value) and "decompression" not in str(e.value)


def test_a_jpeg_cut_short_is_called_truncated(tmp_path):
    data = write_image(tmp_path / "full.jpg", 200, 200).read_bytes()
    for cut in (len(data) // 2, len(data) - 3):
        (tmp_path / "cut.jpg").write_bytes(data[:cut])
        with pytest.raises(MediaError, match="cut.jpg is truncated: the file ends before") as e:
            load_image(tmp_path / "cut.jpg")
        assert "not processed" not in str(e.value)  # PIL's wording


def test_zero_size_and_oversize_file(tmp_path):
    with pytest.raises(MediaError):
        load_image(png_with_declared_size(tmp_path / "zero.png", 0, 10))
    path = write_image(tmp_path / "big.png", 64, 64)
    with pytest.raises(MediaError, match="limit is"):
        load_image(path, limits=dataclasses.replace(DEFAULT_LIMITS, max_file_bytes=100))
    with pytest.raises(MediaError, match="megapixels"):
        load_image(path, limits=dataclasses.replace(DEFAULT_LIMITS, max_image_pixels=1000))
