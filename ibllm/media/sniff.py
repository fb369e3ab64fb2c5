"""Content sniffing: what a file really is, from its first bytes, whatever its name says.

Decoders (PIL, libsndfile, FFmpeg inside decord) are only ever handed a file whose magic bytes match a
container they are meant to read, so a text file named ``x.png`` or a PNG named ``x.wav`` is refused with a
clear message instead of reaching C code that was never meant to see it.
"""

from __future__ import annotations

from pathlib import Path

HEAD_BYTES = 4096

# Container family -> a human name used in messages.
FORMAT_NAMES = {
    "png": "PNG image", "jpeg": "JPEG image", "gif": "GIF image", "webp": "WebP image", "bmp": "BMP image",
    "tiff": "TIFF image", "aiff": "AIFF audio",
    "wav": "WAV audio", "flac": "FLAC audio", "ogg": "Ogg audio", "mp3": "MP3 audio", "adts": "AAC (ADTS) audio",
    "mp4": "MP4/MOV/M4A container", "matroska": "Matroska/WebM container", "avi": "AVI video",
    "npy": "NumPy .npy array", "npz": "NumPy .npz archive", "ply": "PLY point cloud", "pcd": "PCD point cloud",
    "zip": "ZIP archive (e.g. a PyTorch .pt file)", "pickle": "Python pickle", "gzip": "gzip archive",
    "pdf": "PDF document", "elf": "executable program", "html": "HTML page",
    "stl": "binary STL mesh", "text": "plain text", "binary": "unrecognised binary data", "empty": "empty file",
}


def read_head(path: str | Path, n: int = HEAD_BYTES) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(n)


def _is_mp3_frame(h: bytes) -> bool:
    # MPEG audio frame sync: 11 set bits, a valid version, a non-zero layer, and not a "bad" bitrate/rate index.
    if len(h) < 4 or h[0] != 0xFF or (h[1] & 0xE0) != 0xE0:
        return False
    version, layer = (h[1] >> 3) & 3, (h[1] >> 1) & 3
    bitrate, rate = h[2] >> 4, (h[2] >> 2) & 3
    return version != 1 and layer != 0 and bitrate not in (0, 15) and rate != 3


def _is_adts_frame(h: bytes) -> bool:
    # ADTS (raw AAC): 12 set bits, layer 00; a frame length of at least the header.
    if len(h) < 7 or h[0] != 0xFF or (h[1] & 0xF6) != 0xF0:
        return False
    frame_len = ((h[3] & 3) << 11) | (h[4] << 3) | (h[5] >> 5)
    return frame_len >= 7 and ((h[2] >> 2) & 0xF) < 13


_CONTROL = bytes(c for c in range(32) if c not in b"\t\n\r\f\v\x1b")


def _looks_like_text(h: bytes) -> bool:
    """UTF-8 or a single-byte code page (Latin-1, Windows-1252): no NUL and hardly any control bytes, which
    compressed and binary data are full of (random bytes: one in eight)."""
    return b"\x00" not in h and len(h.translate(None, _CONTROL)) >= len(h) * 0.99


# Byte-order marks of text saved as UTF-32 or UTF-16 (Windows' "Unicode"), longest first: UTF-32 LE's begins
# with UTF-16 LE's. Each maps to the codec of the units after it.
_BOMS = ((b"\xff\xfe\x00\x00", "utf-32-le"), (b"\x00\x00\xfe\xff", "utf-32-be"), (b"\xff\xfe", "utf-16-le"),
         (b"\xfe\xff", "utf-16-be"))


def bom_codec(h: bytes) -> tuple[bytes, str] | None:
    """(byte-order mark, codec) of text that starts with a UTF-32 or UTF-16 mark, else None."""
    return next(((bom, codec) for bom, codec in _BOMS if h.startswith(bom)), None)


def _is_unicode_text(h: bytes) -> bool:
    """Text saved as UTF-16 or UTF-32 with its byte-order mark (FF FE would read as an MPEG sync): nearly every
    character printable or a line break, which random code units are not (~80 % of them)."""
    found = bom_codec(h)
    if found is None or len(h) < 2 * len(found[0]):
        return False
    bom, codec = found
    unit = len(bom)
    text = h[unit:len(h) - len(h) % unit].decode(codec, errors="ignore")  # a unit cut by the head boundary is dropped
    ordinary = sum(c.isprintable() or c in "\t\n\r" for c in text)
    return bool(text.strip()) and ordinary >= 0.98 * len(text)


def sniff_bytes(h: bytes) -> str:
    """The container family of a file from its first bytes (see FORMAT_NAMES); "binary" when unknown."""
    if not h:
        return "empty"
    if h.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if h.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if h[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if h[:4] == b"RIFF" and h[8:12] == b"WEBP":
        return "webp"
    if h[:4] in (b"RIFF", b"RIFX", b"RF64") and h[8:12] == b"WAVE":
        return "wav"
    if h[:4] == b"FORM" and h[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if h[:4] == b"RIFF" and h[8:12] == b"AVI ":
        return "avi"
    if h[:2] == b"BM" and len(h) >= 26 and int.from_bytes(h[14:18], "little") in (12, 40, 52, 56, 64, 108, 124):
        return "bmp"
    if h[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if h.startswith(b"fLaC"):
        return "flac"
    if h.startswith(b"OggS"):
        return "ogg"
    if _is_unicode_text(h):
        return "text"
    if h.startswith(b"ID3") or _is_mp3_frame(h):
        return "mp3"
    if _is_adts_frame(h):
        return "adts"
    if h[0] == 0 and h[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"):
        return "mp4"
    if h.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"
    if h.startswith(b"\x93NUMPY"):
        return "npy"
    if h.startswith(b"PK\x03\x04"):
        return "npz" if b".npy" in h[:200] else "zip"
    if h.startswith(b"\x1f\x8b"):
        return "gzip"
    if h[:1] == b"\x80" and len(h) > 1 and 2 <= h[1] <= 5:
        return "pickle"
    if h.startswith(b"%PDF"):
        return "pdf"
    if h.startswith(b"\x7fELF") or h.startswith(b"MZ"):
        return "elf"
    if h[:4] in (b"ply\n", b"ply\r"):
        return "ply"
    if _is_pcd_header(h):  # before the text test: a binary PCD has a text header and binary data
        return "pcd"
    if _looks_like_text(h):
        lower = h[:512].lstrip().lower()
        if lower.startswith((b"<!doctype html", b"<html")):
            return "html"
        return "text"
    return "binary"


def _is_pcd_header(h: bytes) -> bool:
    for line in h.splitlines()[:20]:
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        return line.split()[0].upper() in (b"VERSION", b"FIELDS")
    return False


def sniff(path: str | Path) -> str:
    head = read_head(path)
    fmt = sniff_bytes(head)
    if fmt == "binary" and len(head) >= 84:  # a binary STL has no magic: its size gives it away
        count = int.from_bytes(head[80:84], "little")
        if Path(path).stat().st_size == 84 + 50 * count:
            return "stl"
    return fmt


def describe(fmt: str) -> str:
    return FORMAT_NAMES.get(fmt, fmt)


__all__ = ["sniff", "sniff_bytes", "read_head", "describe", "FORMAT_NAMES", "HEAD_BYTES"]
