"""Preprocessing time per file for every media kind, on generated media (figures only, nothing asserted).

    python bench/preprocess.py [--repeat 3]

Media are written to a temporary folder by the test-suite's generators (tests/media_samples.py, which need
PyAV from requirements-test.txt), then loaded with ``ibllm.media.load_media`` at ImageBind-Huge sizes. The
first load of each kind is reported separately: it includes imports (decord/FFmpeg) and the BPE vocabulary.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ibllm.media import load_media  # noqa: E402
from tests.media_samples import sphere_points, write_av, write_image, write_ply, write_sound  # noqa: E402


def make_media(d: Path) -> list[tuple[str, str, Path]]:
    """(kind, description, path) for every benchmarked file."""
    rng = np.random.default_rng(0)
    items = [
        ("image", "JPEG 4032x3024", write_image(d / "photo.jpg", 4032, 3024, quality=90)),
        ("image", "PNG 1920x1080 RGBA", write_image(d / "ui.png", 1920, 1080, mode="RGBA")),
        ("audio", "WAV 10 s 44.1 kHz stereo", write_sound(d / "clip.wav", 10.0, 44100, 2, "PCM_16")),
        ("audio", "FLAC 5 min 48 kHz stereo (windowed read)", write_sound(d / "long.flac", 300.0, 48000, 2)),
        ("audio", "MP3 60 s 44.1 kHz", write_sound(d / "song.mp3", 60.0, 44100, 2, "MPEG_LAYER_III")),
        ("audio", "M4A (AAC) 30 s", write_av(d / "voice.m4a", video=None, audio="aac", fmt="mp4", seconds=30.0)),
        ("video", "MP4 H.264 10 s 640x360 25 fps", write_av(d / "clip.mp4", w=640, h=360, fps=25, seconds=10.0)),
        ("video", "WebM VP8 5 s 1280x720 30 fps", write_av(d / "hd.webm", video="libvpx", w=1280, h=720, fps=30,
                                                         seconds=5.0)),
        ("point", "NPY 8192 points (pass-through)", d / "unit.npy"),
        ("point", "binary PLY 100k points", write_ply(d / "scan.ply", sphere_points(100_000), "binary_little_endian")),
        ("point", "XYZ text 200k points", d / "scan.xyz"),
        ("depth", "16-bit PNG 640x480", d / "depth.png"),
        ("thermal", "8-bit PNG 640x512", write_image(d / "thermal.png", 640, 512, mode="L")),
        ("imu", "NPY (6, 2000)", d / "imu.npy"),
        ("text", "TXT 40 words", d / "prompt.txt"),
    ]
    unit = sphere_points(8192, radius=1.0, centre=(0, 0, 0))
    np.save(d / "unit.npy", (unit / np.linalg.norm(unit, axis=1).max()).astype(np.float32))
    np.savetxt(d / "scan.xyz", sphere_points(200_000, seed=1), fmt="%.5f")
    Image.fromarray(rng.integers(500, 5000, (480, 640)).astype(np.uint16)).save(d / "depth.png")
    np.save(d / "imu.npy", rng.standard_normal((6, 2000)))
    (d / "prompt.txt").write_text(" ".join(["a small red cube rotating slowly on a wooden table"] * 4))
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        items = make_media(Path(tmp))
        print(f"generated {len(items)} files in {time.perf_counter() - t0:.1f} s\n")
        print(f"{'kind':<8} {'file':<44} {'size':>9} {'first':>8} {'median':>8}  output")
        seen: set[str] = set()
        for kind, desc, path in items:
            times = []
            for _ in range(args.repeat + (kind not in seen)):
                t = time.perf_counter()
                out = load_media(path, modality=kind)
                times.append(time.perf_counter() - t)
            first = times.pop(0) if kind not in seen else times[0]
            seen.add(kind)
            size = path.stat().st_size / 1e6
            print(f"{kind:<8} {desc:<44} {size:>7.2f}MB {first * 1e3:>6.0f}ms {statistics.median(times) * 1e3:>6.0f}ms"
                  f"  {tuple(out.shape)}")


if __name__ == "__main__":
    main()
