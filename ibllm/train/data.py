"""Stage 0: the toy world's files, and the tensors the media loaders make of them, cached on disk.

Training and held-out scenes get all eight modalities (video has no tower of its own: it goes through the
vision tower, which sees training clips next to images in its second stage, ``align.train_image_text``). Every
file is read once through ``ibllm.media.load_media`` (the loaders the chat uses) and the stacked results are
stored as one safetensors file per split and modality (``tensors/{split}_{modality}.safetensors``, key ``x``), so
epochs never decode a PNG or a WAV again. A video keeps its first clip only, (1, 3, 2, S, S): the toy world's
videos are 2 s and square, so the loader's 5 clips x 3 crops are 15 copies of one. Floating-point inputs are
stored in float16 (they are normalised images, spectrograms and sensor traces; half precision is far below their
noise), point clouds in float32 (the encoder's grouping is done in float32), token ids as int64.
"""

from __future__ import annotations

import multiprocessing as mp
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ibllm.media import load_media
from ibllm.train import toyworld as tw
from ibllm.train.common import progress as bar_of

SPLITS = ("train", "heldout")
SPLIT_MODALITIES = tw.MODALITIES


def tensor_path(root: Path, split: str, modality: str) -> Path:
    return Path(root) / "tensors" / f"{split}_{modality}.safetensors"


def _manifest_ok(path: Path, n: int, modalities: tuple[str, ...]) -> bool:
    """``n`` scenes, each with a file of every wanted modality (an older data set may lack some)."""
    if not path.is_file():
        return False
    recs = tw.read_manifest(path)
    return len(recs) == n and all(m in recs[0]["files"] for m in modalities)


def _load_scene(files: dict[str, str], modalities: tuple[str, ...], cfg: Any) -> dict[str, Any]:
    """One scene's files through the media loaders. Returns numpy arrays: tensors sent back from a worker
    process would travel as shared-memory file descriptors, and thousands of them exhaust the descriptor table."""
    torch.set_num_threads(1)
    out = {}
    for m in modalities:
        x = load_media(files[m], m, cfg)
        if m == "video":
            x = x[:1]
        if x.is_floating_point():
            x = x.float() if m == "point" else x.half()
        out[m] = x.numpy()
    return out


def cache_tensors(root: Path, split: str, modalities: tuple[str, ...], image_cfg: Any, *, workers: int = 1,
                  progress: bool = True) -> None:
    """Load every file of ``split`` through the media loaders and store one stacked tensor per modality."""
    missing = [m for m in modalities if not tensor_path(root, split, m).is_file()]
    if not missing:
        return
    records = tw.read_manifest(Path(root) / f"{split}.jsonl")
    jobs = [{m: str(r["files"][m]) for m in missing} for r in records]
    load = partial(_load_scene, modalities=tuple(missing), cfg=image_cfg)
    per_modality: dict[str, list[torch.Tensor]] = {m: [] for m in missing}
    bar = bar_of(len(jobs), f"load {split} ({', '.join(missing)})", disable=not progress, unit="scene")
    if workers > 1 and len(jobs) > 4 * workers:
        with mp.get_context("spawn").Pool(workers) as pool:
            for loaded in pool.imap(load, jobs, chunksize=8):
                for m, x in loaded.items():
                    per_modality[m].append(torch.from_numpy(x))
                bar.update()
    else:
        threads = torch.get_num_threads()
        for job in jobs:
            for m, x in load(job).items():
                per_modality[m].append(torch.from_numpy(x))
            bar.update()
        torch.set_num_threads(threads)
    bar.close()
    for m, xs in per_modality.items():
        path = tensor_path(root, split, m)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"x": torch.stack(xs).contiguous()}, str(tmp))
        tmp.replace(path)


EXTRA = "extra"  # sub-folder of image + caption scenes (the ``train`` split of another seed)
EXTRA_MODALITIES = ("image", "text")


def build_data(root: str | Path, n_train: int, n_heldout: int, seed: int, image_cfg: Any, *, n_extra: int = 0,
               workers: int = 1, progress: bool = True) -> dict[str, int]:
    """Write (or reuse) the train, held-out and extra image-caption scenes under ``root``, with cached tensors.

    ``n_extra`` more training scenes with only an image and a caption (``root/extra``, drawn with ``seed + 1``):
    the image tower is the one that needs many examples (a ViT from scratch memorises 2000 images instead of
    learning shapes and motion cues), and images are all the language side sees.
    """
    root = Path(root)
    sizes = {}
    for where, split, n, s, mods in ((root, "train", n_train, seed, SPLIT_MODALITIES),
                                     (root, "heldout", n_heldout, seed, SPLIT_MODALITIES),
                                     (root / EXTRA, "train", n_extra, seed + 1, EXTRA_MODALITIES)):
        if n == 0:
            continue
        manifest = where / f"{split}.jsonl"
        if not _manifest_ok(manifest, n, mods):
            for m in mods:  # stale tensors of a different data set
                tensor_path(where, split, m).unlink(missing_ok=True)
            tw.make_dataset(where, n, s, split, mods, workers=workers, progress=progress)
        cache_tensors(where, split, mods, image_cfg, workers=workers, progress=progress)
        sizes[split if where == root else EXTRA] = n
    return sizes


def load_tensor(root: str | Path, split: str, modality: str, half: bool = False) -> torch.Tensor:
    """The cached loader outputs of one split and modality, (N, ...); floats come back as float32 (``half``:
    as stored, to be converted batch by batch)."""
    x = load_file(str(tensor_path(Path(root), split, modality)))["x"]
    return x.float() if x.is_floating_point() and not half else x


def records(root: str | Path, split: str) -> list[dict[str, Any]]:
    return tw.read_manifest(Path(root) / f"{split}.jsonl")
