"""Scenes to files: one scene (:func:`write_scene`), a data set of n scenes with its manifest, read back."""

from __future__ import annotations

import json
import multiprocessing as mp
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ibllm.train.toyworld.captions import _CAPTION_TEMPLATES, caption_for, questions_for
from ibllm.train.toyworld.files import write_mp4, write_ply, write_png, write_wav
from ibllm.train.toyworld.formats import EXTENSIONS
from ibllm.train.toyworld.imu import render_imu
from ibllm.train.toyworld.latents import MODALITIES, SPLITS, Scene, sample_scene, split_of
from ibllm.train.toyworld.points import render_points
from ibllm.train.toyworld.render import _Renderer, render_depth, render_image, render_thermal, render_video
from ibllm.train.toyworld.sound import render_audio

try:
    from tqdm import tqdm
except ImportError:  # tqdm is a runtime requirement, but generation should never die for a progress bar
    tqdm = None


def write_scene(scene: Scene, out_dir: str | Path, modalities: Iterable[str] = MODALITIES,
                stem: str = "") -> dict[str, Path]:
    """Render ``scene`` into one file per modality in ``out_dir``; returns {modality: path}.

    Files are named ``{stem}_{modality}{ext}`` (``{modality}{ext}`` with no stem). The image, video, depth
    and thermal maps share one renderer, so asking for several of them costs little more than the slowest.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wanted = list(dict.fromkeys(modalities))
    unknown = sorted(set(wanted) - set(MODALITIES))
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; known: {MODALITIES}")
    renderer = _Renderer(scene) if {"image", "video", "depth", "thermal"} & set(wanted) else None
    paths: dict[str, Path] = {}
    for m in wanted:
        path = out / f"{stem + '_' if stem else ''}{m}{EXTENSIONS[m]}"
        if m == "image":
            write_png(path, render_image(scene, renderer))
        elif m == "video":
            write_mp4(path, render_video(scene, renderer))
        elif m == "depth":
            write_png(path, render_depth(scene, renderer))
        elif m == "thermal":
            write_png(path, render_thermal(scene, renderer))
        elif m == "point":
            write_ply(path, render_points(scene))
        elif m == "audio":
            write_wav(path, render_audio(scene))
        elif m == "imu":
            np.save(path, render_imu(scene), allow_pickle=False)
        elif m == "text":
            path.write_text(caption_for(scene, "text") + "\n")
        paths[m] = path
    return paths


def _split_seed(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), 0x70C])


def sample_scenes(n: int, seed: int, split: str) -> list[Scene]:
    """The n scenes of ``make_dataset(…, n, seed, split)`` (a prefix of any larger n with the same seed)."""
    rng = _split_seed(seed, split)
    return [sample_scene(rng, split) for _ in range(n)]


def manifest_record(scene: Scene, index: int, files: dict[str, Path], root: Path,
                    rng: np.random.Generator | None = None) -> dict[str, Any]:
    """One manifest line: latents, files relative to ``root``, captions, Q&A (2 phrasings per latent)."""
    rng = rng or np.random.default_rng([scene.seed, 99])
    return {
        "id": f"{split_of(scene)}-{index:06d}",
        "split": split_of(scene),
        "scene": scene.to_dict(),
        "files": {m: p.relative_to(root).as_posix() for m, p in files.items()},
        "caption": caption_for(scene, "text"),
        "captions": {m: caption_for(scene, m) for m in MODALITIES},
        "caption_variants": [caption_for(scene, "text", k) for k in range(len(_CAPTION_TEMPLATES))],
        # Tagged by latent: filter with CARRIES[modality], or call questions_for(modality, scene) directly.
        "qa": questions_for("text", scene, rng, per_latent=2),
    }


def _write_one(job: tuple[int, Scene], root: Path, split: str, modalities: tuple[str, ...]) -> dict[str, Any]:
    index, scene = job
    files = write_scene(scene, root / split / f"{index:06d}", modalities)
    return manifest_record(scene, index, files, root)


def make_dataset(out_dir: str | Path, n: int, seed: int, split: str = "train",
                 modalities: Iterable[str] = MODALITIES, workers: int = 1, progress: bool = True) -> Path:
    """Write n scenes of ``split`` under ``out_dir/split/NNNNNN/`` and ``out_dir/{split}.jsonl``; returns it.

    Deterministic in (n, seed, split): rerunning rewrites identical files. ``workers`` > 1 uses processes.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    mods = tuple(dict.fromkeys(modalities))
    scenes = sample_scenes(n, seed, split)
    job = partial(_write_one, root=root, split=split, modalities=mods)
    bar = _progress(total=n, desc=f"toyworld {split}", disable=not progress)
    records: list[dict[str, Any]] = []
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            for rec in pool.imap(job, enumerate(scenes), chunksize=4):
                records.append(rec)
                bar.update()
    else:
        for item in enumerate(scenes):
            records.append(job(item))
            bar.update()
    bar.close()
    manifest = root / f"{split}.jsonl"
    tmp = manifest.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(manifest)  # a crash mid-write never leaves a truncated manifest behind
    return manifest


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """Manifest lines with ``files`` made absolute and ``scene`` a :class:`Scene`."""
    root = Path(path).parent
    out = []
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        rec["files"] = {m: root / p for m, p in rec["files"].items()}
        rec["scene"] = Scene.from_dict(rec["scene"])
        out.append(rec)
    return out


def _progress(total: int, desc: str, disable: bool) -> Any:
    if tqdm is None:
        class _Null:
            def update(self, n: int = 1) -> None: ...
            def close(self) -> None: ...
        return _Null()
    return tqdm(total=total, desc=desc, unit="scene", disable=disable)
