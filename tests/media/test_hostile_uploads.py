"""Uploads that a fuzzing pass over every loader found handled badly (a raw numpy/torch error, gigabytes of memory
or minutes of CPU for a small file, a NaN embedding): each is now refused with a MediaError that says why, or read
as what it is."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from ibllm.media import MediaError
from ibllm.media.audio import load_audio, load_waveform_16k, resampling_rate
from ibllm.media.bpe import default_tokenizer
from ibllm.media.depth import load_depth
from ibllm.media.image import load_image
from ibllm.media.point import load_point
from ibllm.media.sniff import sniff
from ibllm.media.text import read_text_file
from ibllm.media.video import load_video
from tests.media_samples import sphere_points, write_av


def test_a_thin_strip_is_refused_before_it_is_scaled(tmp_path: Path) -> None:
    # Scaled to a 224-pixel short side first, a 1 x 200,000 strip would be 224 x 44.8 million pixels (~40 GB).
    Image.fromarray(np.zeros((1, 200_000, 3), np.uint8)).save(tmp_path / "strip.png")
    with pytest.raises(MediaError, match="too thin"):
        load_image(tmp_path / "strip.png")
    np.save(tmp_path / "strip.npy", np.random.default_rng(0).random((2, 20_000)).astype(np.float16))
    with pytest.raises(MediaError, match="too thin"):
        load_depth(tmp_path / "strip.npy")
    Image.fromarray(np.zeros((40, 2000, 3), np.uint8)).save(tmp_path / "panorama.png")  # 1:50 is still a picture
    assert load_image(tmp_path / "panorama.png").shape == (3, 224, 224)


def test_a_thin_video_is_refused(tmp_path: Path) -> None:
    write_av(tmp_path / "thin.mp4", w=2048, h=16, seconds=0.5)
    with pytest.raises(MediaError, match="too thin"):
        load_video(tmp_path / "thin.mp4")


def test_a_sample_rate_with_few_common_factors_is_resampled_as_its_nearest_hundred(tmp_path: Path) -> None:
    # torchaudio's kernel for 44,101 -> 16,000 Hz has 706 million taps (2.8 GB); 44,100's has 0.3 million.
    assert resampling_rate(44_101) == 44_100 and resampling_rate(16_001) == 16_000
    assert all(resampling_rate(r) == r for r in (8000, 11025, 22050, 44100, 48000, 96000, 192000, 384000))
    samples = np.random.default_rng(0).uniform(-0.5, 0.5, (3 * 44_100, 1)).astype(np.float32)
    sf.write(tmp_path / "odd.wav", samples, 44_101)
    sf.write(tmp_path / "even.wav", samples, 44_100)
    assert torch.equal(load_audio(tmp_path / "odd.wav"), load_audio(tmp_path / "even.wav"))


@pytest.mark.parametrize("rate", [2_147_483_647, 900_000, 500])
def test_an_implausible_sample_rate_is_refused(tmp_path: Path, rate: int) -> None:
    pcm = np.zeros(16_000, "<i2").tobytes()
    header = b"RIFF" + struct.pack("<I", 36 + len(pcm)) + b"WAVEfmt " + struct.pack(
        "<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) + b"data" + struct.pack("<I", len(pcm))
    (tmp_path / "rate.wav").write_bytes(header + pcm)
    with pytest.raises(MediaError, match="sample rate"):
        load_waveform_16k(tmp_path / "rate.wav")


def test_points_too_close_together_to_scale_are_refused_not_nan(tmp_path: Path) -> None:
    np.save(tmp_path / "tiny.npy", np.r_[np.zeros((50, 3)), np.full((50, 3), 1e-300)])
    with pytest.raises(MediaError, match="too close together"):
        load_point(tmp_path / "tiny.npy")
    np.save(tmp_path / "small.npy", sphere_points(100, radius=1e-6))  # small but representable: a shape
    assert torch.isfinite(load_point(tmp_path / "small.npy")).all()


def test_no_points_at_all(tmp_path: Path) -> None:
    np.save(tmp_path / "none.npy", np.zeros((0, 3), np.float32))
    (tmp_path / "none.ply").write_bytes(b"ply\nformat ascii 1.0\nelement vertex 0\nproperty float x\n"
                                        b"property float y\nproperty float z\nend_header\n")
    (tmp_path / "none.pcd").write_bytes(b"VERSION .7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\n"
                                        b"WIDTH 0\nHEIGHT 1\nPOINTS 0\nDATA ascii\n")
    for name in ("none.npy", "none.ply", "none.pcd"):
        with pytest.raises(MediaError, match="0 point"):
            load_point(tmp_path / name)


def test_a_property_named_twice_is_a_clear_refusal(tmp_path: Path) -> None:
    head = b"ply\nformat binary_little_endian 1.0\nelement vertex 4\nproperty float x\nproperty float x\n" \
           b"property float y\nproperty float z\nend_header\n"
    (tmp_path / "twice.ply").write_bytes(head + np.zeros(16, "<f4").tobytes())
    (tmp_path / "twice.pcd").write_bytes(b"VERSION .7\nFIELDS x x y z\nSIZE 4 4 4 4\nTYPE F F F F\n"
                                         b"COUNT 1 1 1 1\nWIDTH 4\nHEIGHT 1\nPOINTS 4\nDATA binary\n"
                                         + np.zeros(16, "<f4").tobytes())
    for name in ("twice.ply", "twice.pcd"):
        with pytest.raises(MediaError, match="more than once"):
            load_point(tmp_path / name)


def _faces_first_ply(faces: list[list[int]], xyz: np.ndarray, declared: int | None = None,
                     padding: bytes = b"") -> bytes:
    head = (f"ply\nformat binary_little_endian 1.0\nelement face {declared or len(faces)}\n"
            "property list uchar int vertex_indices\n"
            f"element vertex {len(xyz)}\nproperty float x\nproperty float y\nproperty float z\nend_header\n")
    body = b"".join(struct.pack(f"<B{len(f)}i", len(f), *f) for f in faces)
    return head.encode() + body + padding + xyz.astype("<f4").tobytes()


def test_faces_before_the_vertices_are_skipped_whatever_their_lengths(tmp_path: Path) -> None:
    xyz = sphere_points(300)
    reference = load_point(_write(tmp_path / "plain.ply", _faces_first_ply([], xyz)))
    triangles = [[i, i + 1, i + 2] for i in range(200)]
    mixed = [[i, i + 1, i + 2] if i % 3 else [i, i + 1, i + 2, i + 3] for i in range(200)]
    for name, faces in (("triangles.ply", triangles), ("mixed.ply", mixed)):
        got = load_point(_write(tmp_path / name, _faces_first_ply(faces, xyz)))
        assert torch.equal(got, reference), name


def test_a_face_count_the_file_cannot_hold_is_refused_at_once(tmp_path: Path) -> None:
    # From the header alone (2e9 items of at least 5 bytes), not by walking 3 MB item by item (4 s of CPU).
    data = _faces_first_ply([], sphere_points(10), declared=2_000_000_000, padding=b"\x00" * (3 << 20))
    with pytest.raises(MediaError, match="items need"):
        load_point(_write(tmp_path / "faces.ply", data))


def test_ascii_clouds_are_parsed_without_a_list_of_every_token(tmp_path: Path) -> None:
    xyz = sphere_points(500)
    body = "".join(f"{x} {y} {z} 0.5\n" for x, y, z in xyz)
    (tmp_path / "a.ply").write_text("ply\nformat ascii 1.0\nelement vertex 500\nproperty float x\nproperty float y\n"
                                    "property float z\nproperty float w\nend_header\n" + body)
    (tmp_path / "a.pcd").write_text("VERSION .7\nFIELDS x y z w\nSIZE 4 4 4 4\nTYPE F F F F\nCOUNT 1 1 1 1\n"
                                    "WIDTH 500\nHEIGHT 1\nPOINTS 500\nDATA ascii\n" + body)
    np.save(tmp_path / "a.npy", xyz)
    reference = load_point(tmp_path / "a.npy")
    for name in ("a.ply", "a.pcd"):
        assert torch.allclose(load_point(tmp_path / name), reference, atol=1e-6), name
    header, first, rest = (tmp_path / "a.ply").read_text().split("end_header\n")[0], body.split("\n", 1)[0], \
        body.split("\n", 1)[1]
    (tmp_path / "bad.ply").write_text(header + "end_header\n" + first.replace(first.split()[0], "zz") + "\n" + rest)
    with pytest.raises(MediaError, match="malformed"):
        load_point(tmp_path / "bad.ply")


def test_a_table_with_too_many_rows_is_refused_before_it_is_split(tmp_path: Path) -> None:
    import dataclasses

    from ibllm.media import DEFAULT_LIMITS
    from ibllm.media.point import read_points

    (tmp_path / "rows.xyz").write_bytes(b"1 2 3\n" + b"xy\n" * 5000)
    with pytest.raises(MediaError, match="rows"):
        read_points(tmp_path / "rows.xyz", dataclasses.replace(DEFAULT_LIMITS, max_points=1000))
    (tmp_path / "many.obj").write_bytes(b"v 1 2 3\n" * 2000)
    with pytest.raises(MediaError, match="points"):
        read_points(tmp_path / "many.obj", dataclasses.replace(DEFAULT_LIMITS, max_points=1000))


def test_one_enormous_word_costs_no_more_than_the_tokens_kept() -> None:
    tok = default_tokenizer()
    word = "".join(np.random.default_rng(0).choice(list("abcdefghijklmnopqrstuvwxyz"), 99_000))
    assert len(tok.encode(word, max_tokens=75)) == 75  # the whole word merged at once took 80 s
    text = "A small blue pyramid on the right, moving up. " * 50
    assert tok.encode(text, max_tokens=75) == tok.encode(text)[:75]


def test_utf16_utf32_and_single_byte_code_page_text_are_text(tmp_path: Path) -> None:
    said = "A small blue pyramid on the right, moving up — café."
    (tmp_path / "u16.txt").write_bytes(said.encode("utf-16"))
    (tmp_path / "u16be.txt").write_bytes(b"\xfe\xff" + said.encode("utf-16-be"))
    # UTF-32 LE's mark begins with UTF-16 LE's: it was read as UTF-16 and refused as binary
    (tmp_path / "u32.txt").write_bytes(said.encode("utf-32"))
    (tmp_path / "u32be.txt").write_bytes(b"\x00\x00\xfe\xff" + said.encode("utf-32-be"))
    (tmp_path / "cp1252.txt").write_bytes(said.encode("cp1252"))
    for name in ("u16.txt", "u16be.txt", "u32.txt", "u32be.txt", "cp1252.txt"):
        assert sniff(tmp_path / name) == "text"
        assert read_text_file(tmp_path / name) == said


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
