"""Audio loader: soundfile and FFmpeg formats at odd rates/channels, long files, and malformed input."""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pytest
import soundfile as sf
import torch

from ibllm.config import ImageBindConfig
from ibllm.media import DEFAULT_LIMITS, MediaError, detect_modality, load_media
from ibllm.media.audio import clip_ranges, load_audio, load_waveform_16k
from ibllm.media.probe import adts_duration, declared_duration, matroska_duration
from tests.media_samples import encode_mono, write_av, write_image, write_sound, xcorr_lag

SHAPE = (3, 1, 128, 204)


@pytest.mark.parametrize("ext,rate,channels,subtype", [
    ("wav", 8000, 1, "PCM_16"), ("wav", 44100, 2, "FLOAT"), ("flac", 22050, 3, "PCM_24"),
    ("ogg", 48000, 2, "VORBIS"), ("mp3", 11025, 1, "MPEG_LAYER_III"),
])
def test_soundfile_formats(tmp_path, ext, rate, channels, subtype):
    x = load_audio(write_sound(tmp_path / f"a.{ext}", 1.3, rate, channels, subtype))
    assert x.shape == SHAPE and x.dtype == torch.float32 and torch.isfinite(x).all()
    # 1.3 s < 2 s: every clip is the whole file; frames beyond it are zero before normalisation.
    assert torch.allclose(x[0, 0, :, 150:], torch.tensor(4.268 / 9.138))


@pytest.mark.parametrize("name,kw", [
    ("a.m4a", {"video": None, "audio": "aac", "fmt": "mp4"}),
    ("a.aac", {"video": None, "audio": "aac", "fmt": "adts"}),
    ("a.webm", {"video": None, "audio": "libopus", "rate": 48000}),
    ("soundtrack.mp4", {"audio": "aac"}),
    ("a.opus", {"video": None, "audio": "libopus", "rate": 48000, "fmt": "ogg"}),  # Ogg: read by soundfile
])
def test_ffmpeg_written_formats(tmp_path, name, kw):
    x = load_audio(write_av(tmp_path / name, seconds=1.0, **kw))
    assert x.shape == SHAPE and torch.isfinite(x).all()
    assert x.std() > 0.1  # a real tone, not silence


def test_config_sizes_are_used(tmp_path):
    cfg = ImageBindConfig(audio_mel_bins=64, audio_target_len=100)
    assert load_audio(write_sound(tmp_path / "a.wav", 3.0), cfg).shape == (3, 1, 64, 100)


def test_silence_and_very_short_audio(tmp_path):
    sf.write(tmp_path / "silent.wav", np.zeros(16000, np.float32), 16000)
    assert torch.isfinite(load_audio(tmp_path / "silent.wav")).all()
    sf.write(tmp_path / "blip.wav", np.ones(100, np.float32) * 0.1, 16000)  # 6 ms: shorter than one frame
    assert load_audio(tmp_path / "blip.wav").shape == SHAPE


def test_clip_positions_follow_the_reference():
    # The pinned pytorchvideo's sampler: starts i * (d - 2) / (clips - 1): 3.5 s -> 0, 0.75, 1.5 s.
    assert clip_ranges(56000) == [(0, 32000), (12000, 44000), (24000, 56000)]
    assert clip_ranges(30 * 16000) == [(0, 32000), (224000, 256000), (448000, 480000)]  # 0-2, 14-16, 28-30 s
    assert clip_ranges(16000) == [(0, 32000)] * 3  # shorter than a clip: every clip starts at 0
    assert clip_ranges(56000, clips=1) == [(0, 32000)]


@pytest.mark.parametrize("seconds", [2.0, 2.7, 5.0, 11.3, 30.0, 95.5])
def test_first_clip_starts_at_zero_and_last_ends_at_the_end(seconds):
    n = int(seconds * 16000)
    for clips in (2, 3, 5):
        ranges = clip_ranges(n, clips=clips)
        assert ranges[0][0] == 0 and len(ranges) == clips
        assert abs(ranges[-1][1] - n) <= 1  # int() of exact fractions: at most one sample short
        starts = [a for a, _ in ranges]
        assert all(b - a == 32000 for a, b in ranges) and starts == sorted(starts)


def test_the_last_clip_hears_the_end_of_a_long_file(tmp_path):
    # 70 s of silence with a tone only in the last two seconds (the windowed path of long files): only the
    # last clip hears it.
    rate = 16000
    x = np.zeros(70 * rate, np.float32)
    x[-2 * rate:] = 0.5 * np.sin(2 * np.pi * 440 * np.arange(2 * rate) / rate)
    sf.write(tmp_path / "late.wav", x, rate)
    clips = load_audio(tmp_path / "late.wav")
    assert torch.equal(clips[0], clips[1])  # silence, twice
    assert (clips[2] - clips[0]).abs().max() > 1.0


@pytest.mark.parametrize("codec,rate,fmt,name", [
    ("aac", 44100, "mp4", "speech.m4a"), ("aac", 48000, "mp4", "speech.mp4"),
    ("libopus", 48000, "webm", "speech.webm"), ("libopus", 48000, "matroska", "speech.mkv"),
    ("libopus", 48000, "ogg", "speech.opus"),
])
def test_ffmpeg_decoded_audio_is_aligned_with_the_same_samples_as_wav(tmp_path, codec, rate, fmt, name):
    rng = np.random.default_rng(5)
    # Band-limited noise with a few bursts: a cross-correlation with one clear peak.
    samples = np.convolve(rng.standard_normal(rate * 3), np.ones(6) / 6, mode="same").astype(np.float32) * 0.3
    samples[rate // 2 : rate] *= 3
    sf.write(tmp_path / "speech.wav", samples, rate, subtype="FLOAT")
    reference = load_waveform_16k(tmp_path / "speech.wav")[0].numpy()
    decoded = load_waveform_16k(encode_mono(tmp_path / name, samples, rate, codec, fmt))[0].numpy()
    assert xcorr_lag(decoded, reference) == 0
    assert abs(len(decoded) - len(reference)) < 0.05 * len(reference)


def test_long_file_windows_equal_whole_file(tmp_path):
    path = write_sound(tmp_path / "long.wav", 10.0, 44100, 2, "PCM_16")
    windowed = load_audio(path, full_decode_seconds=5.0)  # reads only three windows
    whole = load_audio(path)
    torch.testing.assert_close(windowed, whole, atol=1e-5, rtol=0)


def test_duration_limit(tmp_path):
    limits = dataclasses.replace(DEFAULT_LIMITS, max_audio_seconds=1.0)
    with pytest.raises(MediaError, match=r"3\.0 s long; the limit for audio is 1\.0 s"):
        load_audio(write_sound(tmp_path / "a.flac", 3.0), limits=limits)
    with pytest.raises(MediaError, match="limit for audio"):
        load_audio(write_av(tmp_path / "a.m4a", video=None, audio="aac", fmt="mp4", seconds=3.0), limits=limits)


def test_container_durations(tmp_path):
    assert declared_duration(write_av(tmp_path / "a.m4a", video=None, audio="aac", fmt="mp4", seconds=2.0),
                             "mp4") == pytest.approx(2.0, abs=0.1)
    assert adts_duration(write_av(tmp_path / "a.aac", video=None, audio="aac", fmt="adts", seconds=2.0)) == \
        pytest.approx(2.0, abs=0.1)
    webm = write_av(tmp_path / "a.webm", video=None, audio="libopus", rate=48000, seconds=12.0).read_bytes()
    assert matroska_duration(tmp_path / "a.webm") == pytest.approx(12.0, abs=0.1)
    # Without the Duration element (as browser recordings) the cluster timecodes (every 5 s) bound it,
    # and the walk stops as soon as the limit is passed.
    (tmp_path / "nodur.webm").write_bytes(webm.replace(b"\x44\x89\x88", b"\x4f\xff\x88", 1))
    assert 9.0 < matroska_duration(tmp_path / "nodur.webm") <= 12.0
    assert 3.0 < matroska_duration(tmp_path / "nodur.webm", stop_after=3.0) < 6.0


def test_undeclared_duration_falls_back_on_size(tmp_path):
    webm = write_av(tmp_path / "a.webm", video=None, audio="libopus", rate=48000, seconds=1.0).read_bytes()
    (tmp_path / "nodur.webm").write_bytes(webm.replace(b"\x1f\x43\xb6\x75", b"\x1f\x43\xb6\x70")
                                          .replace(b"\x44\x89\x88", b"\x4f\xff\x88", 1))
    limits = dataclasses.replace(DEFAULT_LIMITS, max_undeclared_audio_bytes=100)
    with pytest.raises(MediaError, match="does not state the duration"):
        load_audio(tmp_path / "nodur.webm", limits=limits)


def test_empty_truncated_and_wrong_content(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(MediaError, match="empty"):
        load_audio(tmp_path / "empty.wav")
    data = write_sound(tmp_path / "full.wav", 1.0).read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[:30])
    with pytest.raises(MediaError, match="could not be read as audio"):
        load_audio(tmp_path / "cut.wav")
    # Cut inside the samples, libsndfile reads a shorter recording; the header's size shows the cut.
    for tenth in (3, 6, 9):
        (tmp_path / "cut.wav").write_bytes(data[: tenth * len(data) // 10])
        with pytest.raises(MediaError, match=r"ends early: its header declares 1\.0 s of sound"):
            load_audio(tmp_path / "cut.wav")
    # A live recorder leaves the size open (0xFFFFFFFF): read to the end of the file, not refused.
    at = data.index(b"data") + 4
    (tmp_path / "live.wav").write_bytes(data[:at] + b"\xff\xff\xff\xff" + data[at + 4 : len(data) // 2])
    assert load_audio(tmp_path / "live.wav").shape == load_audio(tmp_path / "full.wav").shape
    write_image(tmp_path / "img.png")
    (tmp_path / "png.wav").write_bytes((tmp_path / "img.png").read_bytes())
    with pytest.raises(MediaError, match="looks like PNG image"):
        load_audio(tmp_path / "png.wav")
    (tmp_path / "t.mp3").write_text("not audio at all\n")
    with pytest.raises(MediaError, match="plain text"):
        load_audio(tmp_path / "t.mp3")


def test_no_samples_and_no_channels(tmp_path):
    sf.write(tmp_path / "nothing.wav", np.zeros((0, 1), np.float32), 16000)
    with pytest.raises(MediaError, match="no audio samples"):
        load_audio(tmp_path / "nothing.wav")
    fmt = struct.pack("<HHIIHH", 1, 0, 16000, 0, 0, 16)  # PCM, 0 channels
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", 4) + b"\0" * 4
    (tmp_path / "zero_ch.wav").write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    with pytest.raises(MediaError):
        load_audio(tmp_path / "zero_ch.wav")


def test_video_without_soundtrack(tmp_path):
    with pytest.raises(MediaError, match="no audio track"):
        load_audio(write_av(tmp_path / "silent.mp4", seconds=0.5))


def test_oversize_file(tmp_path):
    with pytest.raises(MediaError, match="limit is"):
        load_audio(write_sound(tmp_path / "a.wav", 1.0), limits=dataclasses.replace(DEFAULT_LIMITS,
                                                                                     max_file_bytes=1000))


def test_aiff_reads_as_the_same_samples_in_wav(tmp_path):
    """AIFF (a Mac's or a DAW's export) goes through libsndfile like WAV: the same recording, the same input."""
    aiff = write_sound(tmp_path / "take.aiff", 2.5, 44100, 2, "PCM_16")
    wav = write_sound(tmp_path / "take.wav", 2.5, 44100, 2, "PCM_16")
    assert detect_modality(aiff) == "audio"
    torch.testing.assert_close(load_media(aiff), load_audio(wav))
