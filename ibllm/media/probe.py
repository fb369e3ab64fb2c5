"""Durations, sample rates and Opus pre-skips read from container headers, without decoding anything.

decord's AudioReader decodes a whole file into memory when it is opened, so the audio loader must know how
long an MP4/M4A, Matroska/WebM or ADTS file is *before* handing it over. It is asked for the file's own sample
rate (so the one resampler of every format does the resampling), and that rate and Opus's pre-skip (which decord
does not drop) come from here too. These readers look only at structure
(box and element headers, ADTS frame headers); every read is bounded, and anything unexpected returns None
("unknown") rather than raising, so the caller can fall back on a file-size cap.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

_MAX_STEPS = 2_000_000  # element/frame headers visited at most (a hostile file cannot make us loop for long)


def _read_exact(fh: BinaryIO, n: int) -> bytes | None:
    data = fh.read(n)
    return data if len(data) == n else None


# ----------------------------------------------------------------------------------------------------------
# ISO base media (mp4, mov, m4a): moov/mvhd holds the movie duration in its own time scale.


def _boxes(fh: BinaryIO, start: int, end: int):
    pos = start
    for _ in range(10_000):
        if pos + 8 > end:
            return
        fh.seek(pos)
        head = _read_exact(fh, 8)
        if head is None:
            return
        size, kind = struct.unpack(">I4s", head)
        header = 8
        if size == 1:
            large = _read_exact(fh, 8)
            if large is None:
                return
            size, header = struct.unpack(">Q", large)[0], 16
        elif size == 0:
            size = end - pos
        if size < header:
            return
        yield kind, pos + header, min(pos + size, end)
        pos += size


def _children(fh: BinaryIO, start: int, end: int, kind: bytes):
    """(body start, body end) of each box of ``kind`` directly inside [start, end)."""
    for found, body, body_end in _boxes(fh, start, end):
        if found == kind:
            yield body, body_end


def mp4_duration(path: str | Path) -> float | None:
    with open(path, "rb") as fh:
        end = fh.seek(0, 2)
        for body, body_end in _children(fh, 0, end, b"moov"):
            for sbody, _ in _children(fh, body, body_end, b"mvhd"):
                fh.seek(sbody)
                vf = _read_exact(fh, 4)
                if vf is None:
                    return None
                if vf[0] == 1:
                    raw = _read_exact(fh, 28)
                    if raw is None:
                        return None
                    timescale, duration = struct.unpack(">IQ", raw[16:28])
                else:
                    raw = _read_exact(fh, 16)
                    if raw is None:
                        return None
                    timescale, duration = struct.unpack(">II", raw[8:16])
                if timescale == 0 or duration in (0, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF):
                    return None  # fragmented or live files leave it unset
                return duration / timescale
    return None


# ----------------------------------------------------------------------------------------------------------
# Matroska / WebM (EBML): Segment > Info > Duration (x TimecodeScale); browser recordings omit Duration, so
# the cluster timecodes are walked instead (stopping as soon as the limit is passed).

_SEGMENT, _INFO, _CLUSTER = 0x18538067, 0x1549A966, 0x1F43B675
_TIMECODE_SCALE, _DURATION, _CLUSTER_TIMECODE = 0x2AD7B1, 0x4489, 0xE7


def _vint(fh: BinaryIO, keep_marker: bool) -> tuple[int, int] | None:
    first = fh.read(1)
    if not first:
        return None
    b = first[0]
    length = 1
    while length <= 8 and not b & (0x80 >> (length - 1)):
        length += 1
    if length > 8:
        return None
    rest = _read_exact(fh, length - 1)
    if rest is None:
        return None
    value = b if keep_marker else b & (0xFF >> length)
    for r in rest:
        value = (value << 8) | r
    unknown = not keep_marker and value == (1 << (7 * length)) - 1
    return (-1 if unknown else value), length


def matroska_duration(path: str | Path, stop_after: float | None = None) -> float | None:
    scale = 1_000_000  # ns per timecode unit (Matroska default)
    last_cluster_time: float | None = None
    with open(path, "rb") as fh:
        file_end = fh.seek(0, 2)
        fh.seek(0)
        for _ in range(_MAX_STEPS):
            pos = fh.tell()
            if pos >= file_end:
                break
            ident = _vint(fh, keep_marker=True)
            size = _vint(fh, keep_marker=False)
            if ident is None or size is None:
                break
            eid, length = ident[0], size[0]
            body = fh.tell()
            if eid in (_SEGMENT, _CLUSTER):
                continue  # descend: the children follow immediately
            if length < 0:
                return last_cluster_time  # an unknown-size element we cannot skip
            if eid == _INFO:
                duration = None
                for _ in range(64):
                    if fh.tell() >= body + length:
                        break
                    sub, sub_len = _vint(fh, True), _vint(fh, False)
                    if sub is None or sub_len is None or sub_len[0] < 0 or sub_len[0] > 16:
                        fh.seek(body + length)
                        break
                    raw = _read_exact(fh, sub_len[0]) or b""
                    if sub[0] == _TIMECODE_SCALE and raw:
                        scale = int.from_bytes(raw, "big") or scale
                    elif sub[0] == _DURATION and len(raw) in (4, 8):
                        duration = struct.unpack(">f" if len(raw) == 4 else ">d", raw)[0]
                if duration is not None and duration > 0:
                    return duration * scale / 1e9
            elif eid == _CLUSTER_TIMECODE and 0 < length <= 8:
                last_cluster_time = int.from_bytes(fh.read(length), "big") * scale / 1e9
                if stop_after is not None and last_cluster_time > stop_after:
                    return last_cluster_time
            fh.seek(body + length)
    return last_cluster_time


# ----------------------------------------------------------------------------------------------------------
# ADTS (raw .aac): 1024 samples per raw data block; walk the frame headers.

_ADTS_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)


def adts_duration(path: str | Path, stop_after: float | None = None) -> float | None:
    seconds = 0.0
    with open(path, "rb") as fh:
        head = fh.read(10)
        start = 0
        if head[:3] == b"ID3" and len(head) == 10:  # an ID3v2 tag before the first frame
            start = 10 + ((head[6] & 0x7F) << 21 | (head[7] & 0x7F) << 14 | (head[8] & 0x7F) << 7 | (head[9] & 0x7F))
        fh.seek(start)
        for _ in range(_MAX_STEPS):
            h = fh.read(7)
            if len(h) < 7 or h[0] != 0xFF or (h[1] & 0xF6) != 0xF0:
                break
            rate_index = (h[2] >> 2) & 0xF
            frame_len = ((h[3] & 3) << 11) | (h[4] << 3) | (h[5] >> 5)
            if rate_index >= len(_ADTS_RATES) or frame_len < 7:
                break
            seconds += 1024 * ((h[6] & 3) + 1) / _ADTS_RATES[rate_index]
            if stop_after is not None and seconds > stop_after:
                return seconds
            fh.seek(frame_len - 7, 1)
    return seconds if seconds > 0 else None


# ----------------------------------------------------------------------------------------------------------
# Audio stream facts: the rate the decoder outputs and the samples it should have skipped.

_TRACKS, _TRACK_ENTRY, _AUDIO = 0x1654AE6B, 0xAE, 0xE1
_CODEC_ID, _CODEC_PRIVATE, _SAMPLING, _OUTPUT_SAMPLING = 0x86, 0x63A2, 0xB5, 0x78B5
OPUS_RATE = 48_000  # an Opus decoder always outputs 48 kHz, whatever rate the container or the header names


def _opus_pre_skip(head: bytes, big_endian: bool = False) -> int:
    """Pre-skip of an ``OpusHead`` (Ogg, Matroska: little endian at byte 10) or an MP4 ``dOps`` body (big endian
    at byte 2)."""
    if big_endian:
        return struct.unpack(">H", head[2:4])[0] if len(head) >= 4 else 0
    return struct.unpack("<H", head[10:12])[0] if head[:8] == b"OpusHead" and len(head) >= 12 else 0


def _matroska_audio(path: str | Path) -> tuple[int | None, int]:
    """(output sample rate, Opus pre-skip) of the first audio track of a Matroska/WebM file."""
    with open(path, "rb") as fh:
        file_end = fh.seek(0, 2)
        fh.seek(0)
        codec, rate, private = b"", None, b""
        for _ in range(100_000):
            if fh.tell() >= file_end:
                break
            ident, size = _vint(fh, keep_marker=True), _vint(fh, keep_marker=False)
            if ident is None or size is None:
                break
            eid, length = ident[0], size[0]
            if eid in (_SEGMENT, _TRACKS, _TRACK_ENTRY, _AUDIO):
                if eid == _TRACK_ENTRY and (codec.startswith(b"A_") or rate):
                    break  # the first audio track is complete
                if eid == _TRACK_ENTRY:
                    codec, rate, private = b"", None, b""
                continue  # descend
            if eid == _CLUSTER or length < 0:
                break  # the media data: every header is behind us
            if eid in (_CODEC_ID, _CODEC_PRIVATE, _SAMPLING, _OUTPUT_SAMPLING) and length <= 4096:
                raw = _read_exact(fh, length) or b""
                if eid == _CODEC_ID:
                    codec = raw.rstrip(b"\0")
                elif eid == _CODEC_PRIVATE:
                    private = raw
                elif len(raw) in (4, 8):  # SamplingFrequency; OutputSamplingFrequency (SBR) comes later and wins
                    rate = round(struct.unpack(">f" if len(raw) == 4 else ">d", raw)[0])
                continue
            fh.seek(fh.tell() + length)
    if codec == b"A_OPUS":
        return OPUS_RATE, _opus_pre_skip(private)
    return (rate if codec.startswith(b"A_") and rate and rate > 0 else None), 0


def _mp4_audio(path: str | Path) -> tuple[int | None, int]:
    """(sample rate, Opus pre-skip) of the first sound track of an MP4/M4A: the ``mdhd`` time scale, which
    muxers set to the output rate of a sound track; ``dOps`` for Opus."""
    with open(path, "rb") as fh:
        end = fh.seek(0, 2)
        for body, body_end in _children(fh, 0, end, b"moov"):
            for tbody, tend in _children(fh, body, body_end, b"trak"):
                for mbody, mend in _children(fh, tbody, tend, b"mdia"):
                    rate, sound, pre_skip = None, False, 0
                    for sub, sbody, send in _boxes(fh, mbody, mend):
                        fh.seek(sbody)
                        raw = fh.read(min(send - sbody, 64))
                        if sub == b"hdlr" and raw[8:12] == b"soun":
                            sound = True
                        elif sub == b"mdhd" and len(raw) >= 24:
                            rate = struct.unpack(">I", raw[20:24] if raw[0] == 1 else raw[12:16])[0]
                        elif sub == b"minf":
                            fh.seek(sbody)
                            blob = fh.read(min(send - sbody, 1 << 16))
                            at = blob.find(b"dOps")
                            if at >= 0:
                                rate, pre_skip = OPUS_RATE, _opus_pre_skip(blob[at + 4:at + 8], big_endian=True)
                    if sound:
                        return (rate if rate else None), pre_skip
    return None, 0


def _adts_rate(path: str | Path) -> int | None:
    with open(path, "rb") as fh:
        head = fh.read(10)
        start = 0
        if head[:3] == b"ID3" and len(head) == 10:
            start = 10 + ((head[6] & 0x7F) << 21 | (head[7] & 0x7F) << 14 | (head[8] & 0x7F) << 7 | (head[9] & 0x7F))
        fh.seek(start)
        h = fh.read(7)
    if len(h) < 7 or h[0] != 0xFF or (h[1] & 0xF6) != 0xF0:
        return None
    index = (h[2] >> 2) & 0xF
    return _ADTS_RATES[index] if index < len(_ADTS_RATES) else None


def audio_stream_info(path: str | Path, fmt: str) -> tuple[int | None, int]:
    """(sample rate the decoder outputs, samples at that rate to drop from the start) of an FFmpeg-decoded audio
    stream in a container of family ``fmt``. The rate is None when the header does not say (the caller then
    estimates it); the drop is Opus's pre-skip, 0 for every other codec."""
    try:
        if fmt == "mp4":
            return _mp4_audio(path)
        if fmt == "matroska":
            return _matroska_audio(path)
        if fmt == "adts":
            return _adts_rate(path), 0
    except (OSError, struct.error, ValueError, OverflowError):
        return None, 0
    return None, 0


def declared_duration(path: str | Path, fmt: str, stop_after: float | None = None) -> float | None:
    """Seconds of media in a container of family ``fmt`` ("mp4", "matroska", "adts"), or None if unknown."""
    try:
        if fmt == "mp4":
            return mp4_duration(path)
        if fmt == "matroska":
            return matroska_duration(path, stop_after)
        if fmt == "adts":
            return adts_duration(path, stop_after)
    except (OSError, struct.error, ValueError, OverflowError):
        return None
    return None


__all__ = ["declared_duration", "audio_stream_info", "OPUS_RATE", "mp4_duration", "matroska_duration", "adts_duration"]
