"""detect_modality / load_media: extension + content sniffing, dispatch, refusals"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from ibllm.kinds import KINDS, MEDIA_KINDS
from ibllm.media import MediaError, accepted_table, detect_modality, load_media
from ibllm.media.sniff import sniff_bytes
from tests.media_samples import write_av, write_image, write_ply, write_sound


def test_detection_by_extension_and_content(tmp_path):
    cases = {
        write_image(tmp_path / "a.jpg"): "image",
        write_image(tmp_path / "a.gif"): "image",
        write_sound(tmp_path / "a.flac"): "audio",
        write_av(tmp_path / "a.mp4", seconds=0.3): "video",
        write_av(tmp_path / "a.m4a", video=None, audio="aac", fmt="mp4", seconds=0.3): "audio",
        write_av(tmp_path / "voice.webm", video=None, audio="libopus", rate=48000, seconds=0.3): "audio",
        write_ply(tmp_path / "a.ply", np.random.default_rng(0).random((10, 3))): "point",
    }
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(tmp_path / "d.png")
    cases[tmp_path / "d.png"] = "depth"
    np.save(tmp_path / "p.npy", np.zeros((100, 6)))
    np.save(tmp_path / "i.npy", np.zeros((6, 500)))
    np.save(tmp_path / "d.npy", np.zeros((48, 64)))
    cases.update({tmp_path / "p.npy": "point", tmp_path / "i.npy": "imu", tmp_path / "d.npy": "depth"})
    (tmp_path / "q.txt").write_text("What is in this picture?\n")
    (tmp_path / "pts.txt").write_text("1 2 3\n4 5 6\n7 8 9\n")
    (tmp_path / "imu.csv").write_text("acc_x,acc_y,acc_z,gyr_x,gyr_y,gyr_z\n" + "1,2,3,4,5,6\n" * 3)
    (tmp_path / "noext").write_bytes((tmp_path / "a.jpg").read_bytes())
    cases.update({tmp_path / "q.txt": "text", tmp_path / "pts.txt": "point", tmp_path / "imu.csv": "imu",
                  tmp_path / "noext": "image"})
    for path, kind in cases.items():
        assert detect_modality(path) == kind, path.name


@pytest.mark.parametrize(("header", "kind"), [
    ("ax,ay,az,gx,gy,gz", "imu"), ("timestamp,accel_x,accel_y,accel_z,gyro_x,gyro_y,gyro_z", "imu"),
    ("t;wx;wy;wz;ax;ay;az", "imu"), ('"Acc X","Acc Y","Acc Z","Gyr X","Gyr Y","Gyr Z"', "imu"),
    ("x,y,z,r,g,b", "point"), ("x,y,z,nx,ny,nz", "point"), ("# x y z intensity", "point"),
])
def test_a_csv_header_decides_imu_or_point(tmp_path, header, kind):
    sep = ";" if ";" in header else ","
    (tmp_path / "t.csv").write_text(header + "\n" + (sep.join(["1"] * len(header.split(sep))) + "\n") * 20)
    assert detect_modality(tmp_path / "t.csv") == kind


def test_a_video_cut_before_its_index_stays_a_video(tmp_path):
    # Its index (moov) is written last: cut short, no track can be found, which is no reason to read it as sound
    # (it was: "has no audio track"); the video loader then says it is damaged.
    data = write_av(tmp_path / "full.mp4", seconds=1.0).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: data.index(b"moov") + 16])  # a few bytes of the index remain
    assert detect_modality(tmp_path / "cut.mp4") == "video"
    with pytest.raises(MediaError, match="damaged or truncated"):
        load_media(tmp_path / "cut.mp4")


def test_load_media_dispatches(tmp_path):
    write_image(tmp_path / "a.png")
    assert load_media(tmp_path / "a.png").shape == (3, 224, 224)
    assert load_media(tmp_path / "a.png", modality="thermal").shape == (1, 224, 224)
    assert load_media(tmp_path / "a.png", modality="depth").shape == (1, 224, 224)
    (tmp_path / "q.txt").write_text("a red car")
    x = load_media(tmp_path / "q.txt")
    assert x.shape == (77,) and x.dtype == torch.int64
    with pytest.raises(MediaError, match="unknown input type"):
        load_media(tmp_path / "a.png", modality="smell")


@pytest.mark.parametrize("name,content,match", [
    ("x.png", b"plain words\n", "named like an image file but its content looks like plain text"),
    ("x.wav", b"plain words\n", "named like an audio file"),
    ("x.ply", b"\x89PNG\r\n\x1a\n" + b"\0" * 32, "named like a 3D point cloud file"),
    ("x.wav", b"\x89PNG\r\n\x1a\n" + b"\0" * 32, "content looks like PNG image"),
    ("x.mp4", b"%PDF-1.7 ...", "PDF document"),
    ("x.dat", b"\x01\x02\x03\x04" * 10, "unrecognised file type"),
    ("x.jpg", b"", "empty"),
])
def test_wrong_content_is_refused(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(MediaError, match=match):
        load_media(tmp_path / name)


@pytest.mark.parametrize("name", ["model.pt", "weights.pth", "data.pkl", "x.pickle", "x.joblib"])
def test_pickles_are_never_opened(tmp_path, name):
    (tmp_path / name).write_bytes(pickle.dumps({"points": [1, 2, 3]}))
    with pytest.raises(MediaError, match="arbitrary code"):
        detect_modality(tmp_path / name)
    with pytest.raises(MediaError, match="arbitrary code"):
        load_media(tmp_path / name, modality="point")


def test_pickle_content_under_another_name(tmp_path):
    (tmp_path / "cloud").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(MediaError, match="arbitrary code"):
        detect_modality(tmp_path / "cloud")


def test_sniffing():
    assert sniff_bytes(b"\xff\xd8\xff\xe0") == "jpeg"
    assert sniff_bytes(b"ID3\x04") == "mp3"
    assert sniff_bytes(b"\x00\x00\x00\x20ftypisom") == "mp4"
    assert sniff_bytes(b"feelfree to write") == "text"  # 'free' at offset 4 is not an MP4 box
    assert sniff_bytes(b"# .PCD v0.7\nVERSION 0.7\nFIELDS x y z\n") == "pcd"


def test_accepted_table_covers_every_kind():
    assert set(KINDS) == set(MEDIA_KINDS) and all(k.extensions for k in KINDS.values())
    table = accepted_table()
    assert all(f"| {kind} |" in table for kind in MEDIA_KINDS)
