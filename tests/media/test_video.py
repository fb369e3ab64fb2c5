"""Video loader: containers, portrait, very short clips, frame choice, and malformed input."""

from __future__ import annotations

import dataclasses

import decord
import numpy as np
import pytest
import torch

from ibllm.config import ImageBindConfig
from ibllm.media import DEFAULT_LIMITS, MediaError
from ibllm.media.video import clip_windows, decode_clip_frames, load_video, select_frames
from tests.media_samples import write_av

SMALL = ImageBindConfig(image_size=32)


@pytest.mark.parametrize("name,codec", [("a.mp4", "libx264"), ("a.webm", "libvpx"), ("a.avi", "mpeg4"),
                                        ("a.mov", "libx264"), ("a.mkv", "libx264")])
def test_containers(tmp_path, name, codec):
    x = load_video(write_av(tmp_path / name, video=codec, seconds=2.5), SMALL)
    assert x.shape == (15, 3, 2, 32, 32) and x.dtype == torch.float32 and torch.isfinite(x).all()


def test_a_browser_recording_is_read_like_the_same_video_in_a_file(tmp_path):
    """A live recording (a browser's MediaRecorder WebM: no duration, frame count or rate, which decord needs) gives
    the frames the same video gives from an ordinary file."""
    kwargs = dict(video="libvpx", fmt="webm", seconds=4.4, fps=10)
    live = write_av(tmp_path / "live.webm", streamed=True, **kwargs)
    stored = write_av(tmp_path / "stored.webm", **kwargs)
    with pytest.raises(Exception, match="broken metadata"):
        decord.VideoReader(str(live))
    got, expected = decode_clip_frames(live), decode_clip_frames(stored)
    assert [c.shape for c in got] == [c.shape for c in expected] == [(2, 64, 96, 3)] * 5
    for a, b in zip(got, expected, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 2  # the same frames (two RGB conversions)
    assert not np.array_equal(got[0], got[-1])  # and the clips differ: the bars move


def test_a_video_narrower_than_decords_row_alignment_is_decoded_all_the_same(tmp_path):
    """decord 0.6 opens a 16x16 video but cannot copy its frames out (rows padded to 32 pixels); PyAV decodes it,
    the same frames decord gives for the same picture at a width it handles."""
    small = write_av(tmp_path / "small.mp4", w=16, h=16, seconds=6.0)
    with pytest.raises(Exception, match="size must exactly match"):
        decord.VideoReader(str(small)).get_batch([0, 1])
    clips = decode_clip_frames(small)
    assert [c.shape for c in clips] == [(2, 16, 16, 3)] * 5
    assert len({c.tobytes() for c in clips}) > 1  # the bars move: real, different frames
    x = load_video(small, SMALL)
    assert x.shape == (15, 3, 2, 32, 32) and torch.isfinite(x).all()


def test_default_size_and_clip_count(tmp_path):
    path = write_av(tmp_path / "a.mp4", seconds=1.0)
    assert load_video(path).shape == (15, 3, 2, 224, 224)
    assert load_video(path, SMALL, clips=2).shape == (6, 3, 2, 32, 32)


def test_frame_choice_matches_the_reference():
    # 25 fps, 3 s, 2 clips: [0, 2) -> frames 0..49, [1, 3) -> frames 25..74 (first and last of each).
    starts = np.arange(75) * 0.04
    assert select_frames(starts, 3.0, 2, clips=2) == [[0, 49], [25, 74]]
    assert select_frames(np.array([0.0]), 0.04, 2) == [[0, 0]] * 5  # a single frame serves every clip


@pytest.mark.parametrize("seconds,fps", [(1.5, 10), (2.0, 25), (7.3, 30), (20.0, 25), (61.0, 24)])
def test_first_clip_starts_at_zero_and_last_ends_with_the_last_frame(seconds, fps):
    n = int(round(seconds * fps))
    starts = np.arange(n) / fps
    windows = clip_windows(seconds)
    assert windows[0][0] == 0 and windows[-1][1] == pytest.approx(max(seconds, 2.0))
    chosen = select_frames(starts, seconds, 2)
    assert chosen[0][0] == 0 and chosen[-1][-1] == n - 1  # the very last frame is seen (20 s: not 16.4 s)


def test_the_last_clip_of_a_real_file_is_its_end(tmp_path):
    frames = decode_clip_frames(write_av(tmp_path / "a.mp4", fps=10, seconds=6.0))
    # The sample's red bar grows by 7 px per frame: the last clip's last frame is the file's last (frame 59).
    last = frames[-1][-1]
    red = (last[..., 0] > 150) & (last[..., 1] < 100)
    assert red.any(axis=0).sum() == pytest.approx((59 * 7) % 96, abs=2)


def test_short_videos(tmp_path):
    half = write_av(tmp_path / "half.mp4", fps=10, seconds=0.5)
    frames = decode_clip_frames(half)
    assert len(frames) == 5 and all(f.shape == (2, 64, 96, 3) for f in frames)
    one = write_av(tmp_path / "one.mp4", fps=10, seconds=0.1)
    assert load_video(one, SMALL).shape == (15, 3, 2, 32, 32)


def test_portrait_crops_run_top_to_bottom(tmp_path):
    # The sample video is blue in its top third and green in its bottom third.
    x = load_video(write_av(tmp_path / "p.mp4", w=64, h=128, seconds=1.0), SMALL, clips=1)
    top, bottom = x[0], x[2]
    assert top[2].mean() > bottom[2].mean() and bottom[1].mean() > top[1].mean()
    landscape = load_video(write_av(tmp_path / "l.mp4", w=128, h=64, seconds=1.0), SMALL, clips=1)
    assert landscape.shape == (3, 3, 2, 32, 32)


def test_limits(tmp_path):
    path = write_av(tmp_path / "a.mp4", seconds=3.0)
    with pytest.raises(MediaError, match=r"3\.0 s long; the limit for video is 2\.0 s"):
        load_video(path, limits=dataclasses.replace(DEFAULT_LIMITS, max_video_seconds=2.0))
    with pytest.raises(MediaError, match="megapixels"):
        load_video(path, limits=dataclasses.replace(DEFAULT_LIMITS, max_video_pixels=1000))
    with pytest.raises(MediaError, match="limit is"):
        load_video(path, limits=dataclasses.replace(DEFAULT_LIMITS, max_file_bytes=100))


def test_malformed(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(MediaError, match="empty"):
        load_video(tmp_path / "empty.mp4")
    (tmp_path / "text.mp4").write_text("definitely not a video\n")
    with pytest.raises(MediaError, match="plain text"):
        load_video(tmp_path / "text.mp4")
    # Cut anywhere (inside the index at the front, or anywhere in the frames after it), a file is refused as
    # damaged: a cut after the index once loaded the frames before it, which ones depending on the byte.
    data = write_av(tmp_path / "full.mp4", seconds=2.0, options={"movflags": "faststart"}).read_bytes()
    for tenth in range(1, 10):
        (tmp_path / "cut.mp4").write_bytes(data[: tenth * len(data) // 10])
        with pytest.raises(MediaError, match="damaged or truncated"):
            load_video(tmp_path / "cut.mp4")
    # Matroska stores no frame count but a duration: cut near its end, the last packet shows the shortfall.
    data = write_av(tmp_path / "full.mkv", seconds=2.0).read_bytes()
    for tenth in (8, 9):
        (tmp_path / "cut.mkv").write_bytes(data[: tenth * len(data) // 10])
        with pytest.raises(MediaError, match=r"ends early: its header says 2\.0 s"):
            load_video(tmp_path / "cut.mkv")
    with pytest.raises(MediaError, match="no video track"):
        load_video(write_av(tmp_path / "a.m4a", video=None, audio="aac", fmt="mp4", seconds=1.0))
