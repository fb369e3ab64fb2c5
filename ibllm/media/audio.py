"""Audio file (or a video's soundtrack) -> (3, 1, 128, 204) float32 log-mel clips for the audio encoder.

Sizes come from the config: ``cfg.audio_mel_bins`` mel bins, ``cfg.audio_target_len`` frames.

Pipeline (REFERENCE.md section 2; ``load_and_transform_audio_data`` of the reference):
1. decode to float32, channels first; resample the whole waveform to 16 kHz with
   ``torchaudio.functional.resample`` (its defaults: windowed sinc, Hann, 6 zero crossings, roll-off 0.99);
2. duration ``d = samples / 16000``; clip ``i`` of ``clips`` starts at ``i * max(d - 2, 0) / max(clips - 1, 1)``
   seconds (exact fractions of the float duration: the first clip starts at 0 and the last one ends at the end
   of the file, as the constant-clips sampler of the pytorchvideo commit the reference pins, 28fe037) and covers
   ``[int(start * 16000), int((start + 2) * 16000))``;
3. per clip, in order, subtract the clip's mean (over all channels) **in place on a view of the shared
   waveform**: when clips overlap (audio shorter than 6 s) later clips see samples already shifted by earlier
   clips' means. The released weights' demo did this and the parity fixture depends on it;
4. Kaldi fbank of channel 0 (htk_compat, 16 kHz, no energy, Hanning, dither 0, 25 ms / 10 ms), transposed to
   (mel, frames), zero-padded on the right or cut to the target length, then ``(x + 4.268) / 9.138``.
   Clips shorter than 2 s (short files) are padded this way, as in the reference; a clip shorter than one
   25 ms frame is first zero-padded to one frame.

Decoders: wav/flac/ogg/opus/mp3 through soundfile (libsndfile); m4a/mp4/mov, aac (ADTS), webm/mkv and avi
soundtracks through ``decord.AudioReader`` (FFmpeg), at the file's own sample rate and then resampled by the same
``torchaudio`` resampler as every other format (decord's own resampler delays the signal by its filter: 17 samples
for 44.1 kHz AAC). Differences on the FFmpeg path, measured: decord's multi-channel output contains uninitialised
samples (garbage values that change from run to run), so it is asked for FFmpeg's mono downmix
(``(L + R) / sqrt(2)`` for stereo, i.e. +3 dB over channel 0 of a centred source: +0.076 after normalisation);
it keeps Opus's pre-skip (312 samples from libopus), which is dropped here (the rate and the pre-skip are read
from the container header, ``probe.py``); and it decodes the whole file when opened, so the duration is read
from the header first. A raw ADTS ``.aac`` stream does not say how many priming samples its encoder put first
(1024 for FFmpeg's), so they stay, as with any FFmpeg-based decoder; M4A's edit list removes them.

Long files: up to ``FULL_DECODE_SECONDS`` the whole file is decoded (the reference path, bit for bit). Longer
soundfile-decoded files are never decoded whole: only the three 2-s windows plus a filter margin are read
(soundfile seeks), resampled, and cut at the same sample positions as the whole-file path (equal up to float
rounding; clips of such files never overlap, so step 3 is unaffected). Files over
``limits.max_audio_seconds`` are refused before decoding.
"""

from __future__ import annotations

import math
from pathlib import Path

import decord
import numpy as np
import soundfile as sf
import torch
import torchaudio

from ibllm.config import ImageBindConfig
from ibllm.media.clips import clip_starts
from ibllm.media.errors import MediaError
from ibllm.media.image import normalize_
from ibllm.media.limits import DEFAULT_LIMITS, Limits
from ibllm.media.probe import audio_stream_info, declared_duration
from ibllm.media.validate import (
    AUDIO_FORMATS,
    SOUNDFILE_FORMATS,
    check_file,
    check_finite,
    human_bytes,
    human_duration,
    require_format,
)

SAMPLE_RATE = 16_000
CLIPS = 3
CLIP_SECONDS = 2
FBANK_MEAN, FBANK_STD = -4.268, 9.138
FULL_DECODE_SECONDS = 60.0
_WINDOW_SAMPLES = 400  # one 25 ms Kaldi frame at 16 kHz
# torchaudio.functional.resample defaults, needed to size the margins of the windowed reads.
_LOWPASS_WIDTH, _ROLLOFF = 6, 0.99
# Sample rates a recording may have: telephone-band and below down to 1 kHz, hi-res studio rates up to 768 kHz.
MIN_RATE, MAX_RATE = 1_000, 768_000
# torchaudio's sinc kernel has about (16000 / g) x (rate / g) taps for g = gcd(rate, 16000): 0.3 M at 44.1 kHz,
# 706 M (2.8 GB) at 44,101 Hz. Above this many taps the rate is rounded first (resampling_rate).
_MAX_KERNEL_TAPS = 4_000_000


def clip_ranges(num_samples: int, clips: int = CLIPS, clip_seconds: int = CLIP_SECONDS,
                sample_rate: int = SAMPLE_RATE) -> list[tuple[int, int]]:
    """Sample ranges [a, b) of the clips, computed exactly as the reference's constant-clips sampler."""
    return [(int(start * sample_rate), int((start + clip_seconds) * sample_rate))
            for start in clip_starts(num_samples / sample_rate, clips, clip_seconds)]


def _fbank(clip: torch.Tensor, mel_bins: int, target_len: int) -> torch.Tensor:
    """(C, n) mean-subtracted clip -> (1, mel_bins, target_len) normalised log-mel."""
    if clip.shape[1] < _WINDOW_SAMPLES:
        clip = torch.nn.functional.pad(clip, (0, _WINDOW_SAMPLES - clip.shape[1]))
    fbank = torchaudio.compliance.kaldi.fbank(
        clip, htk_compat=True, sample_frequency=SAMPLE_RATE, use_energy=False, window_type="hanning",
        num_mel_bins=mel_bins, dither=0.0, frame_length=25, frame_shift=10,
    ).transpose(0, 1)
    frames = fbank.shape[1]
    if frames < target_len:
        fbank = torch.nn.functional.pad(fbank, (0, target_len - frames), mode="constant", value=0.0)
    else:
        fbank = fbank[:, :target_len]
    return normalize_(fbank.unsqueeze(0), (FBANK_MEAN,), (FBANK_STD,))


def waveform_to_clips(waveform: torch.Tensor, cfg: ImageBindConfig | None = None, clips: int = CLIPS,
                      clip_seconds: int = CLIP_SECONDS) -> torch.Tensor:
    """(C, n) 16 kHz float32 waveform -> (clips, 1, mel, T). Modifies ``waveform`` in place (see step 3)."""
    cfg = cfg or ImageBindConfig()
    out = []
    for a, b in clip_ranges(waveform.shape[1], clips, clip_seconds):
        clip = waveform[:, a:b]
        clip -= clip.mean()  # in place on the shared waveform, as the reference
        out.append(_fbank(clip, cfg.audio_mel_bins, cfg.audio_target_len))
    return torch.stack(out)


def resampling_rate(rate: int) -> int:
    """The rate the resampler takes a recording to have: its own, or for a rate that shares few factors with
    16 kHz (44,101 Hz) the nearest multiple of 100 Hz, whose kernel is small (g >= 100). Every common rate is
    its own; a rounded one is off by at most 50 Hz (0.1 % of pitch at 44.1 kHz)."""
    g = math.gcd(rate, SAMPLE_RATE)
    if (SAMPLE_RATE // g) * (rate // g) <= _MAX_KERNEL_TAPS:
        return rate
    return max(100, round(rate / 100) * 100)


def check_rate(name: str, rate: int) -> None:
    if not MIN_RATE <= rate <= MAX_RATE:
        raise MediaError(f"{name} declares a sample rate of {rate:,} Hz; accepted are {MIN_RATE:,} to "
                         f"{MAX_RATE:,} Hz. Convert it (e.g. to 16 or 44.1 kHz WAV) and upload it again.")


def resample(waveform: torch.Tensor, orig_rate: int) -> torch.Tensor:
    if orig_rate == SAMPLE_RATE:
        return waveform
    return torchaudio.functional.resample(waveform, orig_freq=resampling_rate(orig_rate), new_freq=SAMPLE_RATE)


# ----------------------------------------------------------------------------------------------------------
# soundfile (wav, flac, ogg, mp3)


def _sf_info(path: str | Path, limits: Limits) -> sf._SoundFileInfo:
    name = Path(path).name
    try:
        info = sf.info(str(path))
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError on bad input
        raise MediaError(f"{name} could not be read as audio (damaged or truncated?){_detail(exc)}") from None
    if info.channels <= 0:
        raise MediaError(f"{name} has no audio channels")
    check_rate(name, info.samplerate)
    if info.frames <= 0:
        raise MediaError(f"{name} contains no audio samples that could be read (an empty recording, or a damaged "
                         "or truncated file?)")
    short = _wav_shortfall(path)
    if short is not None:
        declared, held = (human_duration(frames / info.samplerate) for frames in short)
        raise MediaError(f"{name} ends early: its header declares {declared} of sound, the file holds {held} "
                         "(damaged or truncated? upload the complete file)")
    _check_duration(name, info.frames / info.samplerate, limits)
    return info


def _wav_shortfall(path: str | Path) -> tuple[int, int] | None:
    """(frames the ``data`` chunk of a RIFF WAV declares, frames the file holds after it) where the file ends
    more than a frame early: an interrupted download or copy, which libsndfile would read as a shorter
    recording. None for a complete file, another format, or a size left open (0, 0xFFFFFFFF or near 2 GiB, as
    a live recorder writes it)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        size = f.seek(0, 2)
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos, block = 12, 1
    while pos + 8 <= len(head):
        tag, length = head[pos:pos + 4], int.from_bytes(head[pos + 4:pos + 8], "little")
        if tag == b"fmt " and pos + 22 <= len(head):
            block = max(1, int.from_bytes(head[pos + 20:pos + 22], "little"))
        if tag == b"data":
            held = size - (pos + 8)
            if length == 0 or length >= 0x7FFF0000 or held >= length - block:
                return None
            return length // block, held // block
        pos += 8 + length + (length & 1)
    return None


def _detail(exc: Exception) -> str:
    """libsndfile's reason, where it says something true: for a damaged MP3 it says the file "does not exist or
    is not a regular file (possibly a pipe?)", which it does and is not."""
    text = str(exc)
    return "" if not text or "does not exist" in text else f": {text}"


def _check_duration(name: str, seconds: float, limits: Limits) -> None:
    if seconds > limits.max_audio_seconds:
        raise MediaError(f"{name} is {human_duration(seconds)} long; the limit for audio is "
                         f"{human_duration(limits.max_audio_seconds)}. Trim it and upload again.")


def _read_frames(snd: sf.SoundFile, start: int, stop: int) -> np.ndarray:
    """Frames [start, stop) as (n, C) float32; seeks when the format allows it, else reads through."""
    if snd.seekable():
        snd.seek(start)
    else:
        skip = start
        while skip > 0:
            got = len(snd.read(min(skip, 1 << 16), dtype="float32", always_2d=True))
            if got == 0:
                break
            skip -= got
    return snd.read(stop - start, dtype="float32", always_2d=True)


def _soundfile_windows(path: str | Path, info: sf._SoundFileInfo, clips: int, clip_seconds: int) -> list[torch.Tensor]:
    """Only the clip windows of a long file, resampled, at the whole-file path's sample positions."""
    sr, n = resampling_rate(info.samplerate), info.frames  # the rate resample() takes the samples to have
    g = math.gcd(sr, SAMPLE_RATE)
    orig, new = sr // g, SAMPLE_RATE // g
    width = math.ceil(_LOWPASS_WIDTH * orig / (_ROLLOFF * min(orig, new)))
    margin_blocks = width // orig + 2  # each resampled sample reads input within one block + width
    out_len = -(-n * SAMPLE_RATE // sr) if sr != SAMPLE_RATE else n
    windows = []
    with sf.SoundFile(str(path)) as snd:
        for a, b in clip_ranges(out_len, clips, clip_seconds):
            if sr == SAMPLE_RATE:
                data = _read_frames(snd, a, b)
                windows.append(torch.from_numpy(np.ascontiguousarray(data.T)))
                continue
            first_block = max(a // new - margin_blocks, 0)
            last_block = min((b - 1) // new + margin_blocks + 1, -(-n // orig))
            start, stop = first_block * orig, min(last_block * orig, n)
            data = torch.from_numpy(np.ascontiguousarray(_read_frames(snd, start, stop).T))
            res = resample(data, sr)
            offset = first_block * new
            windows.append(res[:, a - offset : b - offset].contiguous())
    return windows


# ----------------------------------------------------------------------------------------------------------
# decord (FFmpeg): m4a/mp4/mov, aac, webm/mkv, avi soundtracks


def _decord_audio(path: str | Path, fmt: str, limits: Limits) -> torch.Tensor:
    """Mono samples at 16 kHz: decoded at the file's own rate, then the resampler of every other format."""
    name = Path(path).name
    seconds = declared_duration(path, fmt, stop_after=limits.max_audio_seconds)
    if seconds is None and fmt == "avi":
        seconds = _video_duration(path)
    if seconds is not None:
        _check_duration(name, seconds, limits)
    size = Path(path).stat().st_size
    if seconds is None and size > limits.max_undeclared_audio_bytes:
        raise MediaError(
            f"{name}: its container does not state the duration, and at {human_bytes(size)} it may be too long "
            f"to decode safely (limit for such files: {human_bytes(limits.max_undeclared_audio_bytes)}). "
            "Convert it to WAV, FLAC, MP3 or M4A and upload it again."
        )
    rate, pre_skip = audio_stream_info(path, fmt)
    try:
        # sample_rate=-1: the file's own rate. decord's resampler (FFmpeg's swresample) would delay the signal
        # by its filter length (17 samples for 44.1 kHz AAC) against the same recording decoded by soundfile.
        reader = decord.AudioReader(str(path), ctx=decord.cpu(0), sample_rate=-1, mono=True)
        samples = reader[:]
    except Exception as exc:
        msg = str(exc)
        if "audio stream" in msg.lower():
            raise MediaError(f"{name} has no audio track") from None
        raise MediaError(f"{name} could not be decoded as audio (damaged or truncated?)") from None
    arr = samples.asnumpy() if hasattr(samples, "asnumpy") else np.asarray(samples)
    arr = np.ascontiguousarray(arr, dtype=np.float32).reshape(1, -1)[:, pre_skip:]  # decord keeps Opus's pre-skip
    if arr.shape[1] == 0:
        raise MediaError(f"{name} contains no audio samples")
    rate = _output_rate(rate, arr.shape[1], seconds)
    if rate is None:
        raise MediaError(f"{name}: its container does not state the audio sample rate. Convert it to WAV, FLAC, "
                         "MP3 or M4A and upload it again.")
    check_rate(name, rate)
    if arr.shape[1] / rate > limits.max_audio_seconds + 1:  # the header understated it
        _check_duration(name, arr.shape[1] / rate, limits)
    check_finite(arr, name, "the decoded audio")
    return resample(torch.from_numpy(arr), rate)


_COMMON_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)


def _output_rate(declared: int | None, samples: int, seconds: float | None) -> int | None:
    """The rate the decoder produced. AAC with implicit SBR (HE-AAC) decodes at twice the rate its header names,
    which the sample count over the declared duration shows; without a declared rate the count and duration
    give the nearest common rate."""
    if seconds is None or seconds <= 0.5:
        return declared
    measured = samples / seconds
    if declared is None:
        return min(_COMMON_RATES, key=lambda r: abs(r - measured))
    return 2 * declared if abs(measured - 2 * declared) < abs(measured - declared) else declared


def _video_duration(path: str | Path) -> float | None:
    try:
        vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        n = len(vr)
        return float(vr.get_frame_timestamp(n - 1)[1]) if n else None
    except Exception:
        return None


# ----------------------------------------------------------------------------------------------------------


def load_audio(path: str | Path, cfg: ImageBindConfig | None = None, limits: Limits = DEFAULT_LIMITS, *,
               clips: int = CLIPS, clip_seconds: int = CLIP_SECONDS,
               full_decode_seconds: float = FULL_DECODE_SECONDS) -> torch.Tensor:
    """Audio file (or video soundtrack) -> (clips, 1, mel, T) float32 (see the module docstring)."""
    out = _load_audio(path, cfg or ImageBindConfig(), limits, clips, clip_seconds, full_decode_seconds)
    if not torch.isfinite(out).all():  # finite float samples whose energy overflows (a damaged float WAV)
        raise MediaError(f"{Path(path).name}: the audio samples are out of range (damaged file?)")
    return out


def _load_audio(path: str | Path, cfg: ImageBindConfig, limits: Limits, clips: int, clip_seconds: int,
                full_decode_seconds: float) -> torch.Tensor:
    name = Path(path).name
    check_file(path, limits)
    fmt = require_format(path, AUDIO_FORMATS, "audio")
    if fmt not in SOUNDFILE_FORMATS:
        return waveform_to_clips(_decord_audio(path, fmt, limits), cfg, clips, clip_seconds)
    info = _sf_info(path, limits)
    try:
        if info.frames / info.samplerate > full_decode_seconds:
            windows = _soundfile_windows(path, info, clips, clip_seconds)
            for w in windows:
                check_finite(w.numpy(), name, "the audio")
            out = []
            for w in windows:
                w -= w.mean()
                out.append(_fbank(w, cfg.audio_mel_bins, cfg.audio_target_len))
            return torch.stack(out)
        # The frame count in a header can be understated (VBR MP3 without a Xing header): cap the read so a
        # lying header cannot make us decode hours.
        cap = int((full_decode_seconds + 5) * info.samplerate)
        data, sr = sf.read(str(path), frames=cap, dtype="float32", always_2d=True)
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError(f"{name} could not be decoded as audio (damaged or truncated?){_detail(exc)}") from None
    if data.shape[0] == 0:
        raise MediaError(f"{name} contains no audio samples")
    check_finite(data, name, "the audio")
    waveform = resample(torch.from_numpy(np.ascontiguousarray(data.T)), sr)
    return waveform_to_clips(waveform, cfg, clips, clip_seconds)


def load_waveform_16k(path: str | Path, limits: Limits = DEFAULT_LIMITS) -> torch.Tensor:
    """(C, n) 16 kHz float32 waveform of a whole file, any accepted format (FFmpeg-decoded ones are mono):
    what the clips are cut from (diagnostics, parity, alignment checks)."""
    check_file(path, limits)
    fmt = require_format(path, AUDIO_FORMATS, "audio")
    if fmt not in SOUNDFILE_FORMATS:
        return _decord_audio(path, fmt, limits)
    _sf_info(path, limits)
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return resample(torch.from_numpy(np.ascontiguousarray(data.T)), sr)


__all__ = ["load_audio", "load_waveform_16k", "waveform_to_clips", "clip_ranges", "resample", "SAMPLE_RATE"]
