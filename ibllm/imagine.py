"""Answers as pictures: the fused ImageBind feature drawn by Stable unCLIP (diffusers), as the official demo does.

Why it works: ImageBind's vision tower is OpenCLIP ViT-H/14, frozen, and Stable Diffusion 2.1 unCLIP "h"
(``stabilityai/stable-diffusion-2-1-unclip``) is conditioned on exactly those 1024-d image embeddings. Every other
modality was aligned to that tower, so a sound's or a point cloud's embedding can be drawn as if it were a photo's.

What reaches the pipeline (``unclip_embedding``): the direction of the fused, cache-mixed feature (the one the
language model reads), at the length of the embeddings the pipeline's own image normaliser was fitted on,
√(‖mean‖² + ‖std‖²) of ``image_normalizer``. The official demo instead rescales by the length of the
un-normalised fused embedding: for a photo that is OpenCLIP's length too, while other towers' lengths have no
meaning to the UNet. The question is the text prompt.

The pipeline is found (``locate``) in a local folder or the Hugging Face cache (``HF_HUB_OFFLINE=1``: the cache
only, and a missing pipeline is named with where to get it), and loaded on first use on the engine's device and
dtype (``Painter``), without the image encoder the pipeline carries for photo inputs (it is never used here:
1.3 GB in float16 saved). diffusers and transformers are optional (requirements-image.txt) and imported only then:
importing diffusers costs seconds, and the text chat never needs it. ``picture_status`` answers "can pictures be
drawn here, and if not why" without importing either.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download, try_to_load_from_cache
from safetensors import safe_open

from ibllm.config import PictureConfig
from ibllm.memory import GiB, available_bytes, dtype_name
from ibllm.types import PictureEvent, PictureTimings

log = logging.getLogger(__name__)

UNCLIP_REPO = "stabilityai/stable-diffusion-2-1-unclip"
UNCLIP_URL = f"https://huggingface.co/{UNCLIP_REPO}"
UNCLIP_DIM = 1024  # the "h" variant's image embedding: OpenCLIP ViT-H/14, ImageBind's vision space
OPTIONAL_PACKAGES = ("diffusers", "transformers")
INSTALL_HINT = "pip install -r requirements-image.txt"
# The folders ibllm loads (everything but the photo encoder and the single-file .ckpt copies of the weights).
NEEDED = ("model_index.json", "unet/*", "vae/*", "text_encoder/*", "tokenizer/*", "scheduler/*",
          "image_normalizer/*", "image_noising_scheduler/*")
LOADED = ("unet", "vae", "text_encoder", "image_normalizer")  # the parts with weights
# Beyond the weights: the UNet's and the VAE decoder's activations for one 768×768 picture, allocator slack.
WORKING_MARGIN = int(1.5 * GiB)
DOWNLOAD_HINT = (f"huggingface-cli download {UNCLIP_REPO} --exclude 'image_encoder/*' 'feature_extractor/*' "
                 "'*.ckpt'  (about 5 GB), or pass a local folder with --unclip")


class PictureError(RuntimeError):
    """A picture cannot be drawn (packages, weights, embedding size, inputs); the message says why and what to do."""


def missing_packages() -> list[str]:
    """The optional packages pictures need that are not installed (found without importing them)."""
    return [name for name in OPTIONAL_PACKAGES if importlib.util.find_spec(name) is None]


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("", "0", "false", "no", "off")


def default_source() -> str:
    """``IBLLM_UNCLIP`` (a folder or a hub repo id), else the official "h" pipeline."""
    return os.environ.get("IBLLM_UNCLIP", "").strip() or UNCLIP_REPO


def _is_repo_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~"))


def locate(source: str | os.PathLike | None = None, *, offline: bool | None = None) -> Path:
    """The pipeline's folder: ``source`` itself when it is a folder, else that hub repo in the Hugging Face cache
    (downloaded there first when online; the cache only when offline). PictureError says what is missing."""
    source = str(source or default_source())
    offline = is_offline() if offline is None else offline
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise PictureError(f"{path} is not a diffusers pipeline folder (no model_index.json); "
                               f"expected a copy of {UNCLIP_URL}")
        return path
    if not _is_repo_id(source):
        raise PictureError(f"unCLIP pipeline {source}: no such folder. Get it with: {DOWNLOAD_HINT}")
    try:
        return Path(snapshot_download(source, allow_patterns=list(NEEDED), local_files_only=offline))
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one readable message
        how = "is not in the Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else \
            f"could not be downloaded ({type(exc).__name__})"
        raise PictureError(f"the unCLIP pipeline {source} {how}. Get it with: {DOWNLOAD_HINT}") from exc


def _cached_normalizer_config(source: str) -> Path | None:
    """image_normalizer/config.json of ``source`` (a folder or a cached repo), without downloading anything."""
    path = Path(source).expanduser()
    if path.is_dir():
        found = path / "image_normalizer" / "config.json"
        return found if found.is_file() else None
    if not _is_repo_id(source):
        return None
    found = try_to_load_from_cache(source, "image_normalizer/config.json")
    return Path(found) if isinstance(found, str) else None


def pipeline_embedding_dim(config_file: str | os.PathLike) -> int:
    """The image embedding width a pipeline takes (its normaliser's ``embedding_dim``; diffusers' default 768)."""
    return int(json.loads(Path(config_file).read_text()).get("embedding_dim", 768))


@dataclass(frozen=True)
class PictureStatus:
    """Whether pictures can be drawn for this engine, and a line for people saying why or why not."""

    available: bool
    note: str


def picture_status(source: str | None, embed_dim: int, *, offline: bool | None = None) -> PictureStatus:
    """Cheap (no diffusers import, no download): the packages, the pipeline's presence and its embedding width."""
    source = str(source or default_source())
    offline = is_offline() if offline is None else offline
    missing = missing_packages()
    if missing:
        return PictureStatus(False, f"pictures need the optional packages {', '.join(missing)}: {INSTALL_HINT}")
    config = _cached_normalizer_config(source)
    dim = pipeline_embedding_dim(config) if config else UNCLIP_DIM if source == UNCLIP_REPO else None
    if dim is not None and dim != embed_dim:
        why = (f"this model's embedding space is {embed_dim}-d, but the unCLIP pipeline ({source}) takes {dim}-d "
               "image embeddings")
        if dim == UNCLIP_DIM:
            why += (" (OpenCLIP ViT-H/14's space): pictures need the official ImageBind weights (ImageBind-Huge), "
                    "whose vision tower is that model")
        return PictureStatus(False, why)
    if config is None:
        if offline or not _is_repo_id(source):
            return PictureStatus(False, f"the unCLIP pipeline {source} is not here"
                                        f"{' (HF_HUB_OFFLINE is set)' if offline else ''}. Get it with: "
                                        f"{DOWNLOAD_HINT}")
        return PictureStatus(True, f"{source} is downloaded into the Hugging Face cache on first use (about 5 GB)")
    return PictureStatus(True, f"unCLIP pipeline: {source}")


def target_norm(mean: torch.Tensor, std: torch.Tensor) -> float:
    """The typical length of the embeddings a normaliser with this mean and std was fitted on:
    E‖x‖² = ‖mean‖² + ‖std‖² for x = mean + std·z, z ~ N(0, I)."""
    return math.sqrt(float(mean.float().pow(2).sum() + std.float().pow(2).sum()))


def unclip_embedding(feature: torch.Tensor, norm: float) -> torch.Tensor:
    """``feature`` (1, E) rescaled to length ``norm`` (float32; the direction unchanged)."""
    feature = feature.float()
    return feature / feature.norm(dim=-1, keepdim=True) * norm


@cache
def _embeds_only_pipeline() -> type:
    # diffusers is optional and slow to import: imported on the first picture only (see the module docstring).
    from diffusers import StableUnCLIPImg2ImgPipeline

    class EmbedsOnlyUnCLIP(StableUnCLIPImg2ImgPipeline):
        """StableUnCLIPImg2ImgPipeline without its photo encoder: conditioned on ``image_embeds`` only."""

        def _encode_image(self, image: Any, device: Any, batch_size: int, num_images_per_prompt: int,
                          do_classifier_free_guidance: bool, noise_level: Any, generator: Any,
                          image_embeds: torch.Tensor | None) -> torch.Tensor:
            # The parent reads the photo encoder's dtype before it looks at image_embeds; with no encoder loaded,
            # the embedding is noised and laid out here the same way: one row per picture, zeros for guidance.
            if image_embeds is None:
                raise ValueError("this pipeline is conditioned on image_embeds only (no image encoder is loaded)")
            embeds = self.noise_image_embeddings(image_embeds=image_embeds, noise_level=noise_level,
                                                 generator=generator)
            embeds = embeds.repeat_interleave(num_images_per_prompt, dim=0)
            if do_classifier_free_guidance:
                embeds = torch.cat([torch.zeros_like(embeds), embeds])
            return embeds

    return EmbedsOnlyUnCLIP


def weights_bytes(folder: str | os.PathLike, dtype: torch.dtype) -> int:
    """What the pipeline's weights take in ``dtype`` (from the safetensors headers: nothing is read but them).
    Variant files (``*.fp16.safetensors``) are not what diffusers loads by default, so they are not counted."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    for part in LOADED:
        for path in sorted((Path(folder) / part).glob("*.safetensors")):
            if path.name.count(".") > 1:
                continue
            with safe_open(str(path), framework="pt") as f:
                total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) * itemsize  # noqa: SIM118 - not a dict
    return total


def check_memory(folder: str | os.PathLike, device: torch.device, dtype: torch.dtype) -> None:
    """PictureError before anything is allocated when the pipeline cannot fit beside what is already loaded (a
    process killed for memory would take the text chat down with it)."""
    need = weights_bytes(folder, dtype) + WORKING_MARGIN
    have = available_bytes(device)
    if need > have:
        raise PictureError(f"the unCLIP pipeline needs about {need / GiB:.1f} GB in {dtype_name(dtype)} "
                           f"(weights + {WORKING_MARGIN / GiB:.1f} GB working room), the {device.type.upper()} has "
                           f"{have / GiB:.1f} GB available beside the chat model")


def load_pipeline(folder: str | os.PathLike, device: torch.device | str, dtype: torch.dtype) -> Any:
    """The pipeline of ``folder`` on ``device`` in ``dtype``, without its photo encoder (PictureError on failure,
    including not enough memory, checked first)."""
    missing = missing_packages()
    if missing:
        raise PictureError(f"pictures need the optional packages {', '.join(missing)}: {INSTALL_HINT}")
    check_memory(folder, torch.device(device), dtype)
    try:
        pipe = _embeds_only_pipeline().from_pretrained(str(folder), image_encoder=None, feature_extractor=None,
                                                       dtype=dtype, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - a broken or partial folder: say which, keep serving text
        raise PictureError(f"could not load the unCLIP pipeline from {folder}: {type(exc).__name__}: {exc}") from exc
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _Stopped(Exception):
    """Raised from the step callback to end a picture the caller no longer wants."""


class _Line:
    """First come, first served: one picture at a time per pipeline; the others learn their place in line."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._tickets: deque[object] = deque()

    def join(self) -> object:
        ticket = object()
        with self._cond:
            self._tickets.append(ticket)
        return ticket

    def ahead(self, ticket: object, timeout: float) -> int:
        """How many are ahead of ``ticket`` (0: its turn), after waiting up to ``timeout`` s for that to change."""
        with self._cond:
            ahead = self._tickets.index(ticket)
            if ahead:
                self._cond.wait(timeout)
                ahead = self._tickets.index(ticket)
            return ahead

    def __len__(self) -> int:
        with self._cond:
            return len(self._tickets)

    def leave(self, ticket: object) -> None:
        with self._cond:
            self._tickets.remove(ticket)
            self._cond.notify_all()


class Painter:
    """One engine's unCLIP pipeline: located and loaded on the first picture, on the engine's device and dtype,
    then kept; pictures are drawn one at a time, in order of arrival (``PictureEvent.queue_position``)."""

    def __init__(self, source: str | None, device: torch.device, dtype: torch.dtype, embed_dim: int):
        self.source = str(source or default_source())
        self.device, self.dtype, self.embed_dim = torch.device(device), dtype, embed_dim
        self._pipe: Any = None
        self._load_lock = threading.Lock()
        self._line = _Line()
        self.seconds_per_step: float | None = None  # measured on the last picture (the UI shows it)

    def status(self) -> PictureStatus:
        return picture_status(self.source, self.embed_dim)

    @property
    def loaded(self) -> bool:
        return self._pipe is not None

    @property
    def in_line(self) -> int:
        """Pictures being drawn or waiting to be."""
        return len(self._line)

    def pipeline(self) -> Any:
        """The loaded pipeline (loading it on the first call)."""
        with self._load_lock:
            if self._pipe is None:
                folder = locate(self.source)
                pipe = load_pipeline(folder, self.device, self.dtype)
                dim = pipe.image_normalizer.config.embedding_dim
                if dim != self.embed_dim:
                    raise PictureError(f"the unCLIP pipeline in {folder} takes {dim}-d image embeddings, this "
                                       f"model's are {self.embed_dim}-d")
                log.info("unCLIP pipeline loaded from %s on %s (%s)", folder, self.device, self.dtype)
                self._pipe = pipe
            return self._pipe

    def embedding(self, feature: torch.Tensor) -> torch.Tensor:
        """What ``paint`` hands the pipeline for a unit ``feature`` (1, E): the normaliser's typical length, on the
        pipeline's device and dtype."""
        normalizer = self.pipeline().image_normalizer
        norm = target_norm(normalizer.mean.detach(), normalizer.std.detach())
        return unclip_embedding(feature, norm).to(device=self.device, dtype=self.dtype)

    def paint(self, feature: torch.Tensor, prompt: str, options: PictureConfig, *,
              should_stop: Callable[[], bool] | None = None,
              timings: PictureTimings | None = None) -> Iterator[PictureEvent]:
        """Draw ``feature`` (1, E) with ``prompt``: events while waiting / loading / per step, the picture last.

        PictureError for settings out of range or a pipeline that cannot be had; the text chat is not affected."""
        options.check()
        stop = should_stop or (lambda: False)
        timings = timings or PictureTimings()
        seed = options.seed if options.seed is not None else secrets.randbelow(2**31)
        ticket = self._line.join()
        try:
            t0 = time.perf_counter()
            shown = -1
            while (ahead := self._line.ahead(ticket, timeout=0.25)) and not stop():
                if ahead != shown:
                    shown = ahead
                    yield PictureEvent(queue_position=ahead, steps=options.steps, seed=seed, timings=replace(timings))
            if stop():
                return
            timings.queued = time.perf_counter() - t0
            if not self.loaded:
                yield PictureEvent(loading=True, steps=options.steps, seed=seed, timings=replace(timings))
                t0 = time.perf_counter()
                self.pipeline()
                timings.load = time.perf_counter() - t0
            pipe = self.pipeline()
            options.check(pipe.image_noising_scheduler.config.num_train_timesteps - 1)
            yield from self._run(pipe, self.embedding(feature), prompt, options, seed, stop, timings)
        finally:
            self._line.leave(ticket)

    def _run(self, pipe: Any, embeds: torch.Tensor, prompt: str, options: PictureConfig, seed: int,
             stop: Callable[[], bool], timings: PictureTimings) -> Iterator[PictureEvent]:
        # The pipeline runs on a worker thread and reports each step through its callback, so that this generator
        # can stream progress; a stop is raised inside the callback, which ends the pipeline at the next step.
        events: queue.Queue[Any] = queue.Queue()
        abandoned = threading.Event()
        started = time.perf_counter()

        def on_step(step: int, _t: Any, _latents: Any) -> None:
            events.put(step + 1)
            if stop() or abandoned.is_set():
                raise _Stopped

        def work() -> None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
            try:
                images = pipe(prompt=prompt, image_embeds=embeds, num_inference_steps=options.steps,
                              guidance_scale=float(options.guidance), noise_level=options.noise_level,
                              generator=generator, callback=on_step, callback_steps=1).images
                events.put(images[0])
            except _Stopped:
                events.put(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, who reports it
                events.put(exc)

        worker = threading.Thread(target=work, name="ibllm-picture", daemon=True)
        worker.start()
        last_step = started
        try:
            while True:
                item = events.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise PictureError(f"the unCLIP pipeline failed: {type(item).__name__}: {item}") from item
                if isinstance(item, int):
                    last_step = time.perf_counter()
                    timings.steps, timings.denoise = item, last_step - started
                    yield PictureEvent(step=item, steps=options.steps, seed=seed, timings=replace(timings))
                    continue
                timings.decode = time.perf_counter() - last_step
                self.seconds_per_step = timings.seconds_per_step or self.seconds_per_step
                yield PictureEvent(step=options.steps, steps=options.steps, seed=seed, image=item, done=True,
                                   timings=timings)
                return
        finally:
            abandoned.set()
            worker.join()  # the pipeline holds the line until it has really stopped
