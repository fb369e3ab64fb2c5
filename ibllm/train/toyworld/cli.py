"""The toy world: seeded scenes described by a few latents, rendered consistently into every modality.

``python -m ibllm.train.toyworld`` (the line above is its ``--help`` description): write a data set under
``--out``, or time the renderers with ``--bench N``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from ibllm.train.toyworld.dataset import make_dataset, sample_scenes, write_scene
from ibllm.train.toyworld.latents import MODALITIES, SPLITS


def benchmark(n: int = 20, seed: int = 0, out_dir: str | Path | None = None) -> dict[str, float]:
    """Scenes per second for each modality alone (one process), writing real files to a temporary folder."""
    scenes = sample_scenes(n, seed, "train")
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        no_video = tuple(m for m in MODALITIES if m != "video")
        for m in (*MODALITIES, "all-but-video", "all"):
            mods = {"all": MODALITIES, "all-but-video": no_video}.get(m, (m,))
            start = time.perf_counter()
            for i, scene in enumerate(scenes):
                write_scene(scene, Path(tmp) / m / str(i), mods)
            rates[m] = n / (time.perf_counter() - start)
    return rates


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ibllm.train.toyworld", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="output folder (manifest: OUT/<split>.jsonl)")
    parser.add_argument("--n", type=int, default=100, help="scenes per split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=(*SPLITS, "both"), default="both")
    parser.add_argument("--modalities", default=",".join(MODALITIES), help="comma-separated subset of "
                        + ",".join(MODALITIES))
    parser.add_argument("--workers", type=int, default=1, help="processes (the cores are shared: be modest)")
    parser.add_argument("--bench", type=int, metavar="N", default=0,
                        help="instead of writing a data set, time N scenes per modality and print scenes/s")
    args = parser.parse_args(argv)
    if args.bench:
        for m, rate in benchmark(args.bench).items():
            print(f"{m:14s} {rate:8.1f} scenes/s")
        return 0
    if args.out is None:
        parser.error("--out is required")
    mods = tuple(m.strip() for m in args.modalities.split(",") if m.strip())
    for split in SPLITS if args.split == "both" else (args.split,):
        path = make_dataset(args.out, args.n, args.seed, split, mods, workers=args.workers)
        print(f"wrote {path}", file=sys.stderr)
    return 0
