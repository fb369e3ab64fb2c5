"""The whole recipe of the embedded default, one resumable command: ``python -m ibllm.train run --out runs/toy``.

Stages (each writes its output under OUT and is skipped when that output is present):

====================  ==========================================================================================
data                  toy-world scenes, every modality, + the media loaders' tensors       -> OUT/data/
tokenizer             the toy SentencePiece vocabulary                                     -> OUT/model/
align_image_text      image and text towers, symmetric InfoNCE                             -> OUT/ckpt/
align_image_classes   the same, warm restart, plus every shape / motion as a caption of its own and video clips
align_<m>             m in audio, depth, thermal, imu, point: tower m <-> frozen image tower
embed                 image embeddings of the training scenes (+ held-out retrieval report) -> OUT/emb/
lm                    tiny LLaMA pre-trained as a language model of the toy world's text
stage1                image-caption: bind network, prefix queries, gates
stage2                instructions (images + text-only with an all-zero image): LoRA (peft), biases, norms
centre_towers         each tower of a modality that carries some latents only -> the centre of the images
                      that agree on those (align.train_toward_centroids); no language stage reads these towers
export                fp16 weights in the official layout, config, visual cache            -> OUT/model/
eval                  per-modality accuracy on held-out scenes, cache off / on            -> OUT/eval.{json,md}
====================  ==========================================================================================

Every training stage saves the whole network in the official key layout (``ImageBindLLM.to_official``,
safetensors, float32); a rerun loads the newest one strictly (``load_official``) and carries on from there.
Stage metrics and wall-clock seconds go to ``OUT/ckpt/<stage>.json`` and, together, ``OUT/report.json``.
"""

from __future__ import annotations

import dataclasses
import resource
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ibllm.cache import VisualCache
from ibllm.checkpoint import read_state_dict
from ibllm.config import ModelConfig, from_name
from ibllm.factory import load_default
from ibllm.llm.tokenizer import Tokenizer
from ibllm.model import ImageBindLLM
from ibllm.train import align, common, language
from ibllm.train.common import Dist
from ibllm.train.data import EXTRA, EXTRA_MODALITIES, build_data, load_tensor, records
from ibllm.train.evaluate import evaluate, markdown
from ibllm.train.language import init_llama
from ibllm.train.tokenizer import train_tokenizer

ENCODER_STAGES = ("align_image_text", "align_image_classes", "align_audio", "align_depth", "align_thermal",
                  "align_imu", "align_point")
LANGUAGE_STAGES = ("lm", "stage1", "stage2")
# Last, since it needs the image embeddings and no language stage reads the towers it changes.
CENTRE_STAGE = "centre_towers"
TRAINING_STAGES = (*ENCODER_STAGES, *LANGUAGE_STAGES, CENTRE_STAGE)


@dataclass(frozen=True)
class RunConfig:
    """Sizes and schedules of one run. ``full`` is the shipped default; ``smoke`` exercises every code path."""

    model: str = "toy"
    seed: int = 0
    n_train: int = 2000  # scenes with every modality (the other towers align on these)
    n_heldout: int = 120  # evaluation scenes, every modality; latent combinations never used for training
    n_extra: int = 14000  # more image + caption scenes: image<->text alignment, language stages, visual cache
    workers: int = 2  # data generation / loading processes
    weight_decay: float = 0.05
    # image <-> text
    it_steps: int = 2000
    it_batch: int = 64
    it_lr: float = 1e-3
    it_class_steps: int = 1500  # second image-text stage: warm restart with the shape / motion class captions
    # every other modality <-> frozen image tower
    bound_steps: dict[str, int] = field(default_factory=lambda: {
        "audio": 300, "depth": 200, "thermal": 200, "imu": 750, "point": 100})
    bound_batch: int = 64
    bound_lr: float = 1e-3
    # language
    lm_steps: int = 400
    lm_batch: int = 48
    lm_lr: float = 2e-3
    s1_steps: int = 600
    s1_batch: int = 48
    s1_lr: float = 2e-3
    s2_steps: int = 1000
    s2_batch: int = 48
    s2_lr: float = 1e-3
    text_only_fraction: float = 0.2
    cache_size: int = 8000  # visual-cache entries shipped (training images)
    centroid_fraction: float = 0.4  # stage-2 visual examples that are centroid views (language.Centroids)
    cannot_tell_fraction: float = 0.35  # questions about a centroid view that ask what it does not carry
    history_weights: tuple[float, ...] = language.HISTORY_WEIGHTS  # stage-2 dialogues with 0, 1, 2, 3 earlier turns
    # Stage-2 examples read through the shipped visual cache as the chat serves it (language.stage2): images /
    # centroid views and their mixes.
    cached_fraction: float = 0.0
    cached_fraction_partial: float = 0.35
    # The cache's mix weight written into the shipped config.json, i.e. what the app serves (stage 2 reads its
    # cached views at the preset's 0.5, the reference's default). 0.25 was chosen on two validation sets: with
    # the cache on, "can't tell" 80 -> 88 % and 79 -> 88 %, the judged suites within a point, but answers about
    # what the neighbours had supplied fell (size above all: held-out over every latent -1.3 / -2.3; README).
    served_cache_weight: float = 0.25
    word_dropout: float = 0.0  # stage 2: each frame word of a question left out with this probability
    word_insertion: float = 0.0  # stage 2: share of the questions naming their latent with other words put in
    named_fraction: float = 0.3  # stage 2: share of the questions that name the input ("the object in the picture")
    centre_steps: dict[str, int] = field(default_factory=lambda: {
        "audio": 150, "depth": 100, "thermal": 100, "imu": 300, "point": 60, "text": 300})
    centre_lr: float = 5e-4
    eval_n: int | None = None  # held-out scenes to evaluate (None: all)
    eval_max_new_tokens: int = 40

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, RunConfig] = {
    "full": RunConfig(),
    "smoke": RunConfig(
        n_train=8, n_heldout=3, n_extra=4, workers=1, it_steps=4, it_class_steps=2, it_batch=8,
        bound_steps={"audio": 2, "depth": 2, "thermal": 2, "imu": 2, "point": 2}, bound_batch=8,
        lm_steps=10, lm_batch=8, lm_lr=3e-3, s1_steps=3, s1_batch=8, s2_steps=3, s2_batch=8,
        centre_steps={"audio": 2, "depth": 2, "thermal": 2, "imu": 2, "point": 2, "text": 2},
        cached_fraction=0.5, cached_fraction_partial=0.5, word_dropout=0.2, word_insertion=0.3,
        named_fraction=0.5, eval_n=2, eval_max_new_tokens=4,
    ),
}


def _ckpt(out: Path, stage: str) -> Path:
    return out / "ckpt" / f"{stage}.safetensors"


def _emb(out: Path, name: str) -> Path:
    return out / "emb" / f"{name}.safetensors"


class Pipeline:
    def __init__(self, out: str | Path, run: RunConfig | None = None, *, dist: Dist | None = None,
                 show: bool = True, model_cfg: ModelConfig | None = None):
        self.out = Path(out)
        self.run = run or RunConfig()
        self.dist = dist or common.init_dist()
        self.show = show and self.dist.main
        self.cfg = model_cfg or from_name(self.run.model)
        self.data = self.out / "data"
        self.model_dir = self.out / "model"
        self.report: dict[str, Any] = {"run": self.run.to_dict(), "stages": {}}
        self.net = None

    # -- helpers ------------------------------------------------------------------------------------------------

    def log(self, msg: str) -> None:
        if self.show:
            print(msg, flush=True)

    def _stage_done(self, stage: str, metrics: dict[str, Any], start: tuple[float, float], save: bool = True) -> None:
        metrics = {**metrics, **elapsed(start)}
        seconds = metrics["seconds"]
        if self.dist.main:
            if save:
                common.save_official(self.net, _ckpt(self.out, stage))
            common.write_json(self.out / "ckpt" / f"{stage}.json", metrics)
        self.dist.barrier()
        self.report["stages"][stage] = metrics
        self.log(f"[{stage}] {seconds:.0f} s  " + "  ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
            if not isinstance(v, dict)))

    def _build_net(self) -> None:
        torch.manual_seed(self.run.seed)
        self.net = ImageBindLLM(self.cfg)
        init_llama(self.net, self.run.seed)
        for p in self.net.parameters():
            p.requires_grad_(False)
        latest = None
        for stage in TRAINING_STAGES:
            if _ckpt(self.out, stage).is_file():
                latest = stage
                report = self.out / "ckpt" / f"{stage}.json"
                if report.is_file():
                    self.report["stages"][stage] = {**common.read_json(report), "resumed": True}
        if latest is not None:
            self.net.load_official(read_state_dict(_ckpt(self.out, latest)), what=str(_ckpt(self.out, latest)))
            self.log(f"resuming after stage {latest}")
        self.net.to(self.dist.device)
        self.done = set(TRAINING_STAGES[:TRAINING_STAGES.index(latest) + 1]) if latest else set()

    def _gen(self, stage: str) -> torch.Generator:
        return common.seed_everything(self.run.seed * 1000 + TRAINING_STAGES.index(stage) + 1)

    # -- stages -------------------------------------------------------------------------------------------------

    def stage_data(self) -> None:
        t0 = clock()
        if self.dist.main:
            sizes = build_data(self.data, self.run.n_train, self.run.n_heldout, self.run.seed, self.cfg.imagebind,
                               n_extra=self.run.n_extra, workers=self.run.workers, progress=self.show)
        self.dist.barrier()
        if not self.dist.main:
            sizes = {"train": self.run.n_train, "heldout": self.run.n_heldout, "extra": self.run.n_extra}
        self.report["stages"]["data"] = {**sizes, **elapsed(t0)}

    def stage_tokenizer(self) -> Path:
        path = self.model_dir / "tokenizer.model"
        if not path.is_file() and self.dist.main:
            t0 = clock()
            train_tokenizer(path, vocab_size=self.cfg.llama.vocab_size)
            self.report["stages"]["tokenizer"] = {**elapsed(t0)}
        self.dist.barrier()
        return path

    def stage_align(self) -> None:
        ib = self.net.image_bind
        dev = self.dist.device
        # Image <-> text, then a warm restart that also contrasts every shape / motion as a caption of its own
        # and trains on the paired scenes' video clips.
        for stage, steps, classes in (("align_image_text", self.run.it_steps, ()),
                                      ("align_image_classes", self.run.it_class_steps, align.CLASS_LATENTS)):
            if stage in self.done or not steps:
                continue
            t0 = clock()
            recs = self.image_records()
            metrics = align.train_image_text(
                ib, self.image_text_tensor("image", half=True), self.image_text_tensor("text"),
                [r["scene"] for r in recs], steps=steps, batch=self.run.it_batch, lr=self.run.it_lr,
                weight_decay=self.run.weight_decay, gen=self._gen(stage), class_latents=classes,
                videos=load_tensor(self.data, "train", "video", half=True) if classes else None, dist=self.dist,
                show=self.show)
            metrics["retrieval"] = self._retrieval(("text",))
            metrics["probe"] = self._probe(("image", "text"))
            self._stage_done(stage, metrics, t0)
        image_emb = None
        for m in align.BOUND_TO_IMAGE:
            stage = f"align_{m}"
            if stage in self.done:
                continue
            t0 = clock()
            if image_emb is None:  # the paired scenes only: the extra ones have no other modality
                image_emb = align.embed(ib, "image", load_tensor(self.data, "train", "image"), device=dev)
            metrics = align.train_bound_to_image(
                ib, m, load_tensor(self.data, "train", m), image_emb, steps=self.run.bound_steps[m],
                batch=self.run.bound_batch, lr=self.run.bound_lr, weight_decay=self.run.weight_decay,
                gen=self._gen(stage), dist=self.dist, show=self.show)
            metrics["retrieval"] = self._retrieval((m,))
            metrics["probe"] = self._probe((m,))
            self._stage_done(stage, metrics, t0)

    def image_records(self) -> list[dict[str, Any]]:
        """Every training scene with an image and a caption: the paired set, then the extra one."""
        recs = records(self.data, "train")
        if self.run.n_extra:
            recs += records(self.data / EXTRA, "train")
        return recs

    def image_text_tensor(self, modality: str, half: bool = False) -> torch.Tensor:
        x = load_tensor(self.data, "train", modality, half=half)
        if self.run.n_extra:
            x = torch.cat([x, load_tensor(self.data / EXTRA, "train", modality, half=half)])
        return x

    def _probe(self, modalities: tuple[str, ...]) -> dict[str, Any]:
        """Linear probes fit on the paired training images, read on held-out inputs (align.latent_probe)."""
        ib = self.net.image_bind
        train = [r["scene"] for r in records(self.data, "train")]
        heldout = [r["scene"] for r in records(self.data, "heldout")]
        bank = align.embed(ib, "image", load_tensor(self.data, "train", "image"), device=self.dist.device)
        out = {}
        for m in modalities:
            q = align.embed(ib, m, load_tensor(self.data, "heldout", m), device=self.dist.device)
            out[m] = align.latent_probe(bank, train, q, heldout, m)
            self.log(f"  probe {m} (held-out): " + ", ".join(f"{k} {v:.2f}" for k, v in out[m].items()))
        return out

    def _retrieval(self, modalities: tuple[str, ...]) -> dict[str, Any]:
        ib = self.net.image_bind
        scenes = [r["scene"] for r in records(self.data, "heldout")]
        image_emb = align.embed(ib, "image", load_tensor(self.data, "heldout", "image"), device=self.dist.device)
        out = {}
        for m in modalities:
            q = align.embed(ib, m, load_tensor(self.data, "heldout", m), device=self.dist.device)
            out[m] = align.retrieval_accuracy(q, image_emb, scenes, m)
            self.log(f"  retrieval {m}->image (held-out): top-1 {out[m]['top1']:.3f} (chance {out[m]['chance']:.3f})")
        return out

    def stage_embed(self) -> torch.Tensor:
        path = _emb(self.out, "train_image")
        if path.is_file():
            return align.load_embeddings(path)
        t0 = clock()
        emb = align.embed(self.net.image_bind, "image", self.image_text_tensor("image", half=True),
                          device=self.dist.device)
        retrieval = self._retrieval(("text", "video", "audio", "depth", "thermal", "imu", "point"))
        if self.dist.main:
            align.save_embeddings(path, emb)
            common.write_json(self.out / "emb" / "retrieval.json", retrieval)
        self.dist.barrier()
        self.report["stages"]["embed"] = {"retrieval": retrieval, **elapsed(t0)}
        return emb

    def stage_language(self, image_emb: torch.Tensor, tokenizer_path: Path) -> None:
        tok = Tokenizer(tokenizer_path)
        recs = self.image_records()  # rows match the image-embedding table
        r = self.run
        common_kw = {"weight_decay": r.weight_decay, "dist": self.dist, "show": self.show}
        if "lm" not in self.done:
            t0 = clock()
            metrics = language.pretrain_lm(self.net, tok, recs, steps=r.lm_steps, batch=r.lm_batch, lr=r.lm_lr,
                                           seed=r.seed, **common_kw)
            self._stage_done("lm", metrics, t0)
        if "stage1" not in self.done:
            t0 = clock()
            metrics = language.stage1(self.net, tok, recs, image_emb, steps=r.s1_steps, batch=r.s1_batch,
                                      lr=r.s1_lr, seed=r.seed, **common_kw)
            self._stage_done("stage1", metrics, t0)
        if "stage2" not in self.done:
            t0 = clock()
            cache = None
            if r.cached_fraction or r.cached_fraction_partial:  # the same rows stage_export ships
                cache = language.ServedCache(VisualCache.build(image_emb[:r.cache_size]), self.cfg.visual_cache)
            metrics = language.stage2(self.net, tok, recs, image_emb, steps=r.s2_steps, batch=r.s2_batch,
                                      lr=r.s2_lr, seed=r.seed, text_only_fraction=r.text_only_fraction,
                                      centroid_fraction=r.centroid_fraction,
                                      cannot_tell_fraction=r.cannot_tell_fraction,
                                      history_weights=tuple(r.history_weights), word_dropout=r.word_dropout,
                                      word_insertion=r.word_insertion, named_fraction=r.named_fraction,
                                      cache=cache,
                                      cached_fraction=r.cached_fraction,
                                      cached_fraction_partial=r.cached_fraction_partial, **common_kw)
            self._stage_done("stage2", metrics, t0)

    def stage_centre(self, image_emb: torch.Tensor) -> None:
        if CENTRE_STAGE in self.done:
            return
        t0 = clock()
        ib = self.net.image_bind
        bank_scenes = [r["scene"] for r in self.image_records()]  # rows match image_emb
        train = [r["scene"] for r in records(self.data, "train")]
        metrics: dict[str, Any] = {}
        moved = [m for m, steps in self.run.centre_steps.items() if steps > 0]
        for m in moved:
            steps = self.run.centre_steps[m]
            # A caption is pulled onto the centre of the images of its exact scene (it names every latent): the
            # language side learnt image embeddings only, and text's own region of the space (its "modality
            # gap") reads worse. Every captioned scene trains it, the extra ones too.
            x, scenes = ((self.image_text_tensor(m), bank_scenes) if m in EXTRA_MODALITIES else
                         (load_tensor(self.data, "train", m), train))
            targets = align.centroid_targets(scenes, bank_scenes, image_emb, m)
            metrics[m] = align.train_toward_centroids(
                ib, m, x, targets, steps=steps, batch=self.run.bound_batch,
                lr=self.run.centre_lr, weight_decay=self.run.weight_decay, gen=self._gen(CENTRE_STAGE),
                dist=self.dist, show=self.show)
        towers = [metrics[m] for m in moved]
        if towers:  # a run may move no tower (centre_steps {}: a continuation of the language side only)
            metrics["loss_first"] = sum(t["loss_first"] for t in towers) / len(towers)  # mean over the towers
            metrics["loss_last"] = sum(t["loss_last"] for t in towers) / len(towers)
            metrics["trainable"] = sum(t["trainable"] for t in towers)
            metrics["retrieval"] = self._retrieval(tuple(moved))
        self._stage_done(CENTRE_STAGE, metrics, t0)

    def stage_export(self, image_emb: torch.Tensor) -> Path:
        """OUT/model: config.json, model.safetensors (fp16, official layout), tokenizer.model, cache/."""
        weights = self.model_dir / "model.safetensors"
        if weights.is_file() or not self.dist.main:
            self.dist.barrier()
            return self.model_dir
        t0 = clock()
        # The first cache_size training images (the paired scenes, then extra ones): the shipped assets stay
        # under 50 MB, and top-10 retrieval needs far fewer than the 16k images the language side trained on.
        n = min(self.run.cache_size, len(image_emb))
        build_cache(self.model_dir / "cache", image_emb[:n], self.image_records()[:n])
        served = replace(self.cfg.visual_cache, weight=self.run.served_cache_weight)
        replace(self.cfg, visual_cache=served).save(self.model_dir / "config.json")
        common.save_official(self.net, weights, dtype=torch.float16)
        self.report["stages"]["export"] = {**elapsed(t0),
                                           "bytes": asset_bytes(self.model_dir)}
        self.dist.barrier()
        return self.model_dir

    def stage_eval(self) -> dict[str, Any]:
        path = self.out / "eval.json"
        if path.is_file():
            return common.read_json(path)
        t0 = clock()
        engine = load_default(self.model_dir)
        results = evaluate(engine, self.data, n=self.run.eval_n, max_new_tokens=self.run.eval_max_new_tokens,
                           show=self.show)
        results.update(elapsed(t0))
        table = markdown(results)
        common.write_json(path, results)
        (self.out / "eval.md").write_text(table)
        self.report["stages"]["eval"] = {"seconds": results["seconds"], "cpu_seconds": results["cpu_seconds"]}
        self.log(table)
        return results

    # -- all ----------------------------------------------------------------------------------------------------

    def run_all(self, evaluate: bool = True) -> dict[str, Any]:
        start = time.perf_counter()
        self.stage_data()
        tokenizer_path = self.stage_tokenizer()
        self._build_net()
        self.stage_align()
        image_emb = self.stage_embed()
        self.stage_language(image_emb, tokenizer_path)
        self.stage_centre(image_emb)
        self.stage_export(image_emb)
        if evaluate and self.dist.main:
            self.stage_eval()
        self.report["total_seconds_this_invocation"] = round(time.perf_counter() - start, 1)
        if self.dist.main:
            common.write_json(self.out / "report.json", self.report)
            self.log(timing_table(self.report))
        return self.report


def reuse_towers(out: str | Path, model_dir: str | Path, run: RunConfig | None = None) -> Path:
    """Start a run at its language stages with the ImageBind towers of an earlier run's model (e.g. assets/toy).

    Writes ``OUT/ckpt/<last encoder stage>.safetensors``: the network exactly as a from-scratch run builds it
    (same seed), with every ``image_bind`` weight replaced by the model's, so the resumed pipeline goes on with
    ``embed``, ``lm``, ``stage1``, ``stage2``, export and evaluation. The towers come as the model stores them
    (fp16-rounded). ``OUT/ckpt/towers.json`` records where they came from."""
    return _reuse(out, model_dir, run, ENCODER_STAGES[-1])


def reuse_model(out: str | Path, model_dir: str | Path, run: RunConfig | None = None) -> Path:
    """Start a run at its centring stage with every weight and the tokenizer of an earlier run's model.

    For a change to the centring alone: the language side never reads the towers that stage moves, so it need not
    be trained again. ``centre_steps`` of the run then says which towers move further (e.g. only the text tower:
    the model's other towers were centred already). Writes ``OUT/ckpt/<last language stage>.safetensors`` and
    copies ``tokenizer.model`` into ``OUT/model``; ``OUT/ckpt/towers.json`` records where they came from."""
    return _reuse_whole(out, model_dir, run, LANGUAGE_STAGES[-1])


def continue_stage2(out: str | Path, model_dir: str | Path, run: RunConfig | None = None) -> Path:
    """Start a run at stage 2 with every weight and the tokenizer of an earlier run's model: stage 2 goes on
    from that model's own LoRA, biases and norms (``s2_steps`` more, e.g. with another question mix), then the
    centring (``centre_steps``; ``{}`` moves no tower), export and evaluation. Writes
    ``OUT/ckpt/stage1.safetensors`` (the model, stage 2 included) and copies ``tokenizer.model``."""
    return _reuse_whole(out, model_dir, run, LANGUAGE_STAGES[-2])


def _reuse_whole(out: str | Path, model_dir: str | Path, run: RunConfig | None, stage: str) -> Path:
    model_dir = Path(model_dir)
    path = _reuse(out, model_dir, run, stage)
    (Path(out) / "model").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_dir / "tokenizer.model", Path(out) / "model" / "tokenizer.model")
    return path


def _reuse(out: str | Path, model_dir: str | Path, run: RunConfig | None, stage: str) -> Path:
    out, model_dir = Path(out), Path(model_dir)
    run = run or RunConfig()
    cfg = ModelConfig.load(model_dir / "config.json")
    torch.manual_seed(run.seed)  # as Pipeline._build_net
    net = ImageBindLLM(cfg)
    init_llama(net, run.seed)
    shipped = ImageBindLLM(cfg)
    shipped.load_official(read_state_dict(model_dir / "model.safetensors"), what=str(model_dir))
    part = net.image_bind if stage in ENCODER_STAGES else net
    source = shipped.image_bind if stage in ENCODER_STAGES else shipped
    part.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in source.state_dict().items()})
    path = common.save_official(net, _ckpt(out, stage))
    common.write_json(out / "ckpt" / "towers.json", {"from": str(model_dir), "stage": stage})
    return path


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children (data workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def clock() -> tuple[float, float]:
    return time.perf_counter(), cpu_seconds()


def elapsed(start: tuple[float, float]) -> dict[str, float]:
    """Wall-clock and CPU seconds since ``clock()``: on a shared machine the CPU time is the honest cost."""
    return {"seconds": round(time.perf_counter() - start[0], 1), "cpu_seconds": round(cpu_seconds() - start[1], 1)}


def build_cache(directory: Path, image_emb: torch.Tensor, recs: list[dict[str, Any]], thumb: int = 40) -> None:
    """The visual cache: the training images' embeddings, their captions and small JPEG thumbnails."""
    thumbs_dir = directory / "thumbs"
    thumbs_dir.mkdir(parents=True, exist_ok=True)
    thumbs = []
    for i, r in enumerate(recs):
        name = f"{i:05d}.jpg"
        with Image.open(r["files"]["image"]) as im:
            im.convert("RGB").resize((thumb, thumb), Image.BICUBIC).save(thumbs_dir / name, quality=75)
        thumbs.append(f"thumbs/{name}")
    cache = VisualCache.build(image_emb, ids=[r["id"] for r in recs], captions=[r["caption"] for r in recs],
                              thumbnails=thumbs)
    cache.save(directory)


def asset_bytes(directory: Path) -> dict[str, int]:
    sizes = {p.name: p.stat().st_size for p in directory.iterdir() if p.is_file()}
    cache = directory / "cache"
    if cache.is_dir():
        sizes["cache/"] = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    sizes["total"] = sum(sizes.values())
    return sizes


def timing_table(report: dict[str, Any]) -> str:
    lines = ["| stage | wall s | CPU s | notes |", "|---|---|---|---|"]
    for stage, m in report["stages"].items():
        note = "resumed (time of the original run)" if m.get("resumed") else ""
        if "loss_first" in m:
            note = f"loss {m['loss_first']:.3f} -> {m['loss_last']:.3f}" + (f"; {note}" if note else "")
        lines.append(f"| {stage} | {m.get('seconds', 0):.0f} | {m.get('cpu_seconds', 0):.0f} | {note} |")
    total = sum(m.get("seconds", 0) for m in report["stages"].values())
    cpu = sum(m.get("cpu_seconds", 0) for m in report["stages"].values())
    lines.append(f"| **total** | {total:.0f} ({total / 60:.1f} min) | {cpu:.0f} ({cpu / 60:.1f} min) | |")
    return "\n".join(lines)


def ship(model_dir: str | Path, to: str | Path) -> dict[str, int]:
    """Copy a run's ``model/`` (config.json, model.safetensors, tokenizer.model, cache/) into ``to``."""
    src, dst = Path(model_dir), Path(to)
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        if not (src / name).is_file():
            raise FileNotFoundError(f"{src / name} is missing: run the pipeline to the end first")
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        shutil.copy2(src / name, dst / name)
    if (dst / "cache").exists():
        shutil.rmtree(dst / "cache")
    if (src / "cache").is_dir():
        shutil.copytree(src / "cache", dst / "cache")
    return asset_bytes(dst)
