"""Encoder alignment the ImageBind way: image <-> text first, then every other modality <-> frozen image tower.

- Image <-> text: both towers from scratch, symmetric InfoNCE. The temperature is the text post-processor's
  learnable ``log_logit_scale`` (ImageBind's own: vision embeddings are unit vectors, text embeddings unit
  vectors times ``exp(log_logit_scale)``, so their dot products are the logits). Each scene's text is its
  ``text.txt`` through the text loader, or one of the other caption templates through the same tokenizer.
- Audio, depth, thermal, IMU, point cloud <-> image: the image tower is frozen, so the image embeddings of the
  training scenes are computed once; each tower learns with symmetric InfoNCE against them and its own
  learnable temperature (a training-only scalar; the post-processors keep their fixed ImageBind scales, which
  the LLM side never sees since every embedding is re-normalised).
- Positives are the natural pairs (the same scene rendered in both modalities), as in ImageBind. A modality that
  cannot tell scenes apart (audio knows shape and size only) is thereby pulled to the centre of the images it is
  compatible with: exactly the shared-space behaviour the LLM side relies on for zero-shot transfer.

The vision stem's two temporal kernel slices start equal ("inflated" from one 2D kernel). Images repeat their
frame, so both slices get identical gradients and stay equal: a 2-frame video clip then encodes as the image
of its two frames' average, which is how video would transfer with no video training at all. The class-caption
stage adds the paired scenes' clips (``videos``), which part the slices: two faint copies of a moving object
read as its shape instead of a shape of their own (held-out video shape 68-72 % before).

Retrieval accuracy (held-out scenes): for each input of a modality, the nearest held-out image embedding is
correct when it agrees on every latent the modality carries (``toyworld.CARRIES``); ``chance`` is the expected
accuracy of a random pick.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ibllm.encoders import ImageBind
from ibllm.media.text import tokenize_one
from ibllm.train import toyworld as tw
from ibllm.train.common import SINGLE, Dist, count, epoch_batches, train_loop

# Encoder branch of each toy-world modality (images and videos share the vision tower).
BRANCH = {"image": "vision", "video": "vision", "text": "text", "audio": "audio", "depth": "depth",
          "thermal": "thermal", "imu": "imu", "point": "point"}
BOUND_TO_IMAGE = ("audio", "depth", "thermal", "imu", "point")


def branch_parameters(ib: ImageBind, branch: str) -> list[tuple[str, nn.Parameter]]:
    """Every parameter of one encoder branch (stem, trunk, head, post-processor)."""
    roots = {"point": ("point_trunk.", "modality_heads.point.", "modality_postprocessors.point.")}.get(
        branch, tuple(f"modality_{part}.{branch}." for part in ("preprocessors", "trunks", "heads",
                                                                   "postprocessors")))
    return [(n, p) for n, p in ib.named_parameters() if n.startswith(roots)]


def set_trainable(ib: ImageBind, branches: tuple[str, ...]) -> list[tuple[str, nn.Parameter]]:
    for p in ib.parameters():
        p.requires_grad_(False)
    named = [np_ for b in branches for np_ in branch_parameters(ib, b)]
    for _, p in named:
        p.requires_grad_(True)
    return named


@torch.no_grad()
def inflate_vision_stem(ib: ImageBind) -> None:
    conv = ib.modality_preprocessors.vision.rgbt_stem.proj[1]
    w = conv.weight  # (D, 3, T, kh, kw)
    w.copy_(w[:, :, :1].expand_as(w))


def symmetric_infonce(logits: torch.Tensor) -> torch.Tensor:
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


@torch.no_grad()
def embed(ib: ImageBind, modality: str, x: torch.Tensor, batch: int = 128,
          device: torch.device | None = None) -> torch.Tensor:
    """Unit-length embeddings (N, E) of a stack of loader outputs, in eval mode."""
    was_training = ib.training
    ib.eval()
    device = device or next(ib.parameters()).device
    if modality == "video":
        batch = max(1, batch // max(1, x.shape[1]))
    out = []
    for start in range(0, len(x), batch):
        chunk = x[start:start + batch].to(device)
        out.append(F.normalize(ib(BRANCH[modality], chunk).float(), dim=-1).cpu())
    ib.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, ib.cfg.out_embed_dim)


# How often each latent is the one changed in a hard-negative caption: shape and motion are the visually subtle
# ones (a few pixels of silhouette, a faint trail), colour and size the ones a batch already separates.
HARD_NEGATIVE_WEIGHTS = {"shape": 3.0, "motion": 3.0, "count": 1.5, "position": 1.5, "size": 1.0, "colour": 0.5}
_VALUES = {"shape": tw.SHAPES, "colour": tuple(tw.COLOURS), "size": tw.SIZES, "position": tw.POSITIONS,
           "count": tw.COUNTS, "motion": tw.MOTIONS}


def minimally_different(scene: tw.Scene, gen: torch.Generator, among: tuple[str, ...] = tw.LATENTS) -> tw.Scene:
    """The scene with one latent of ``among`` changed (weighted by HARD_NEGATIVE_WEIGHTS; always a valid scene)."""
    names = [n for n in HARD_NEGATIVE_WEIGHTS if n in among and not (n == "position" and scene.count > 1)
             and not (n == "count" and scene.position != "centre")]
    weights = torch.tensor([HARD_NEGATIVE_WEIGHTS[n] for n in names])
    name = names[int(torch.multinomial(weights, 1, generator=gen))]
    others = [v for v in _VALUES[name] if v != getattr(scene, name)]
    return dataclasses.replace(scene, **{name: others[int(torch.randint(0, len(others), (1,), generator=gen))]})


# Caption granularity: the full caption, or what one of the other modalities would say about the scene
# (toyworld.caption_for(scene, kind): "A cube." for point, "A large cube." for audio, "An object, moving left." for
# IMU, shape/size/layout for depth). Probabilities per caption.
CAPTION_KINDS = {"text": 0.5, "point": 0.125, "audio": 0.125, "imu": 0.125, "depth": 0.125}


# Latents whose every value is also contrasted as a caption of its own, and the caption kind that names only it.
CLASS_LATENTS = ("shape", "motion")
CLASS_CAPTION_KIND = {"shape": "point", "motion": "imu"}


def _latent_codes(scenes: list[tw.Scene]) -> torch.Tensor:
    return torch.tensor([[_VALUES[n].index(getattr(s, n)) for n in tw.LATENTS] for s in scenes])


def consistency(caption_scenes: list[tw.Scene], kinds: list[str], image_scenes: list[tw.Scene]) -> torch.Tensor:
    """(C, B) bool: caption c (of kind kinds[c], about caption_scenes[c]) truly describes image b."""
    carried = torch.tensor([[n in tw.CARRIES[k] for n in tw.LATENTS] for k in kinds])
    same = _latent_codes(caption_scenes)[:, None, :] == _latent_codes(image_scenes)[None, :, :]
    return (same | ~carried[:, None, :]).all(dim=-1)


def shift_images(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Each image translated by up to ``max_shift`` pixels in x and y (edges replicated)."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


def trim_ids(ids: torch.Tensor) -> torch.Tensor:
    """Token ids cut after the batch's last end-of-text token (the highest id in each row, where the text tower
    reads its output). The tower's attention is causal, so this changes no embedding; it saves the padding."""
    return ids[:, :int(ids.argmax(dim=1).max()) + 1]


class CaptionIds:
    """CLIP ids of toy-world captions, tokenised once per distinct string (the text loader's tokenizer)."""

    def __init__(self, context: int):
        self.context = context
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, text: str) -> torch.Tensor:
        ids = self._cache.get(text)
        if ids is None:
            ids = self._cache[text] = tokenize_one(text, self.context)
        return ids


def train_image_text(ib: ImageBind, images: torch.Tensor, text_ids: torch.Tensor, scenes: list[tw.Scene], *,
                     steps: int, batch: int, lr: float, weight_decay: float, gen: torch.Generator,
                     hard_negatives: bool = True, partial_captions: bool = True, max_shift: int = 4,
                     class_latents: tuple[str, ...] = (), videos: torch.Tensor | None = None,
                     dist: Dist = SINGLE, show: bool = True) -> dict[str, float]:
    """Image and text towers from scratch with symmetric InfoNCE; returns loss figures.

    ``images`` (N, 3, S, S) and ``text_ids`` (N, L) are the loaders' outputs of each scene's ``image.png`` and
    ``text.txt``. On top of plain CLIP training:

    - captions of mixed granularity (``partial_captions``): half the time the full caption (the text file, or
      another template), otherwise what one of the other modalities carries ("A cube.", "An object, moving
      left."). A caption is a positive for every image in the batch it truly describes (multi-positive InfoNCE
      with uniform targets), which also stops identical captions of different scenes from being negatives.
    - hard negatives (``hard_negatives``, NegCLIP): every image is also contrasted with its caption with one latent
      changed; a random batch rarely holds two scenes that differ only in shape or motion.
    - small random translations of the images (``max_shift`` pixels; far below the gap between positions).
    - optionally (``class_latents``; the pipeline's second image-text stage) every value of the subtle latents as
      a caption of its own ("A cube.", "A sphere.", ...; "An object, moving left.", ...): each image is also
      contrasted with all of them, CLIP's zero-shot classification used as a training signal. Full captions let
      the towers get far on colour, size and layout before shape and motion pull their weight: after 2000 plain
      steps a linear probe read held-out shape 0.68 and motion 0.18 (chance) off the image embeddings, after
      1500 more with the class captions 0.85 and 0.93.
    - optionally (``videos``: (V, 1, 3, 2, S, S) video-loader clips of the first V scenes) the clip of every
      batch scene that has one joins the batch as one more picture of its scene (same captions, same class
      captions), and is pulled onto its scene's image embedding (cosine distance to the detached image
      embedding). The stem's two temporal slices then part, and a clip of a moving object (two faint copies of
      it, one per frame) stops reading as a different shape: the language side, which only ever sees images,
      gets video embeddings where it expects them.
    """
    named = set_trainable(ib, ("vision", "text"))
    inflate_vision_stem(ib)
    ib.train()
    batches = epoch_batches(len(images), batch, steps, gen)
    device = dist.device
    captions = CaptionIds(text_ids.shape[1])
    kinds_all = list(CAPTION_KINDS) if partial_captions else ["text"]
    kind_p = torch.tensor([CAPTION_KINDS[k] for k in kinds_all])
    templates = 3

    def loss_fn(step: int) -> torch.Tensor:
        idx = dist.shard(next(batches))
        batch_scenes = [scenes[i] for i in idx.tolist()]
        kinds = [kinds_all[int(k)] for k in torch.multinomial(kind_p, len(idx), True, generator=gen)]
        pick = torch.randint(0, templates, (len(idx),), generator=gen).tolist()
        use_file = (torch.rand(len(idx), generator=gen) < 0.5).tolist()
        rows = []
        for j, (i, scene, kind) in enumerate(zip(idx.tolist(), batch_scenes, kinds, strict=True)):
            if kind == "text" and use_file[j]:
                rows.append(text_ids[i])  # the file through the text loader
            else:
                rows.append(captions(tw.caption_for(scene, kind, pick[j])))
        caption_scenes, caption_kinds = list(batch_scenes), list(kinds)
        if hard_negatives:
            for j, (scene, kind) in enumerate(zip(batch_scenes, kinds, strict=True)):
                other = minimally_different(scene, gen, tw.CARRIES[kind])
                rows.append(captions(tw.caption_for(other, kind, pick[j])))
                caption_scenes.append(other)
                caption_kinds.append(kind)
        ids = trim_ids(torch.stack(rows))
        x = shift_images(images[idx].float(), max_shift, gen)
        img = ib("vision", x.to(device))
        n = len(idx)
        loss = img.new_zeros(())
        if videos is not None and bool((has_clip := idx < len(videos)).any()):
            clip = ib("vision", videos[idx[has_clip]].float().to(device))
            loss = loss + (1 - (clip * img[has_clip.to(device)].detach()).sum(-1)).mean()
            img = torch.cat([img, clip])
            batch_scenes += [batch_scenes[j] for j in has_clip.nonzero().flatten().tolist()]
        match = consistency(caption_scenes, caption_kinds, batch_scenes).float().to(device)  # (C, B + clips)
        txt = ib("text", ids.to(device))  # unit vectors times the learnt exp(log_logit_scale)
        logits = img @ txt.t()  # (B + clips, C): the hard negatives only add columns
        image_to_text = -(F.log_softmax(logits, dim=1) * (match.t() / match.t().sum(1, keepdim=True))).sum(1)
        text_to_image = -(F.log_softmax(logits[:, :n].t(), dim=1) * (match[:n] / match[:n].sum(1, keepdim=True))
                          ).sum(1)
        loss = loss + 0.5 * (image_to_text.mean() + text_to_image.mean())
        template = pick[0]
        for latent in class_latents:
            values = _VALUES[latent]
            kind = CLASS_CAPTION_KIND[latent]
            names = trim_ids(torch.stack([captions(tw.caption_for(dataclasses.replace(scenes[0], **{latent: v}),
                                                                  kind, template)) for v in values]))
            truth = torch.tensor([values.index(getattr(sc, latent)) for sc in batch_scenes], device=device)
            loss = loss + F.cross_entropy(img @ ib("text", names.to(device)).t(), truth) / len(class_latents)
        return loss

    log = train_loop("align image<->text", steps, named, loss_fn, lr=lr, weight_decay=weight_decay, dist=dist,
                     show=show)
    ib.eval()
    scale = float(ib.modality_postprocessors.text[1].log_logit_scale.detach().exp())
    return {**log.summary(), "trainable": count(named), "temperature": 1.0 / scale}


def train_bound_to_image(ib: ImageBind, modality: str, x: torch.Tensor, image_emb: torch.Tensor, *, steps: int,
                         batch: int, lr: float, weight_decay: float, gen: torch.Generator, dist: Dist = SINGLE,
                         show: bool = True) -> dict[str, float]:
    """One tower against fixed image embeddings with symmetric InfoNCE and a learnable temperature."""
    branch = BRANCH[modality]
    named = set_trainable(ib, (branch,))
    log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), device=dist.device))
    ib.train()
    batches = epoch_batches(len(x), batch, steps, gen)
    device = dist.device

    def loss_fn(step: int) -> torch.Tensor:
        idx = dist.shard(next(batches))
        inputs = x[idx].to(device)
        if modality == "point":  # a random first FPS centre: different groups each epoch (augmentation)
            start = torch.randint(0, inputs.shape[1], (len(idx),), generator=gen).to(device)
            emb = ib(branch, inputs, fps_start=start)
        else:
            emb = ib(branch, inputs)
        logits = log_scale.exp().clamp(max=100.0) * F.normalize(emb, dim=-1) @ image_emb[idx].to(device).t()
        return symmetric_infonce(logits)

    log = train_loop(f"align {modality}<->image", steps, [*named, ("log_scale", log_scale)], loss_fn, lr=lr,
                     weight_decay=weight_decay, dist=dist, show=show)
    ib.eval()
    for p in ib.parameters():
        p.requires_grad_(False)
    temperature = float(1 / log_scale.detach().exp().clamp(max=100))
    return {**log.summary(), "trainable": count(named), "temperature": temperature}


def train_toward_centroids(ib: ImageBind, modality: str, x: torch.Tensor, targets: torch.Tensor, *, steps: int,
                           batch: int, lr: float, weight_decay: float, gen: torch.Generator, dist: Dist = SINGLE,
                           show: bool = True) -> dict[str, float]:
    """Pull one tower's embeddings onto fixed unit targets (cosine loss): for a modality that carries only some
    latents, the centre of the training images that agree with its scene on those (``centroid_targets``).

    InfoNCE against the paired image leaves an IMU trace's embedding wherever its batches happened to push what the
    trace cannot know (the colour); the language side was taught that the centre of the images an input cannot
    tell apart means "that latent is not in this input" (stage 2's centroid views). This puts the towers there."""
    branch = BRANCH[modality]
    named = set_trainable(ib, (branch,))
    ib.train()
    batches = epoch_batches(len(x), batch, steps, gen)
    device = dist.device

    def loss_fn(step: int) -> torch.Tensor:
        idx = dist.shard(next(batches))
        emb = F.normalize(ib(branch, x[idx].to(device)), dim=-1)
        return 1 - (emb * targets[idx].to(device)).sum(-1).mean()

    log = train_loop(f"centre {modality}", steps, named, loss_fn, lr=lr, weight_decay=weight_decay, dist=dist,
                     show=show)
    ib.eval()
    for p in ib.parameters():
        p.requires_grad_(False)
    return {**log.summary(), "trainable": count(named)}


def centroid_targets(scenes: list[tw.Scene], bank_scenes: list[tw.Scene], bank: torch.Tensor,
                     modality: str) -> torch.Tensor:
    """Per scene, the re-normalised mean of the ``bank`` image embeddings whose scenes agree with it on every
    latent ``modality`` carries (every such image, no subsampling)."""
    carried = tw.CARRIES[modality]
    groups: dict[tuple[object, ...], list[int]] = {}
    for i, s in enumerate(bank_scenes):
        groups.setdefault(tuple(getattr(s, n) for n in carried), []).append(i)
    means = {k: F.normalize(bank[v].float().mean(0), dim=-1) for k, v in groups.items()}
    return torch.stack([means[tuple(getattr(s, n) for n in carried)] for s in scenes])


def retrieval_accuracy(query: torch.Tensor, image_emb: torch.Tensor, scenes: list[tw.Scene],
                       modality: str) -> dict[str, float]:
    """Top-1 held-out image for each query; correct when it agrees on every latent ``modality`` carries."""
    carried = tw.CARRIES[modality]
    keys = [tuple(getattr(s, n) for n in carried) for s in scenes]
    best = (query @ image_emb.t()).argmax(dim=1).tolist()
    hits = sum(keys[i] == keys[j] for i, j in enumerate(best))
    chance = sum(sum(k == other for other in keys) for k in keys) / (len(keys) ** 2)
    return {"top1": hits / len(keys), "chance": chance, "n": len(keys)}


def latent_probe(train_emb: torch.Tensor, train_scenes: list[tw.Scene], query: torch.Tensor,
                 query_scenes: list[tw.Scene], modality: str, steps: int = 300) -> dict[str, float]:
    """Per latent carried by ``modality``: accuracy of a linear classifier fit on training *image* embeddings,
    applied to held-out ``query`` embeddings. What a small head on the shared space can read off each input."""
    out = {}
    with torch.enable_grad():
        for name in tw.CARRIES[modality]:
            values = _VALUES[name]
            y = torch.tensor([values.index(getattr(s, name)) for s in train_scenes])
            head = nn.Linear(train_emb.shape[1], len(values))
            opt = torch.optim.Adam(head.parameters(), 1e-2)
            for _ in range(steps):
                loss = F.cross_entropy(head(10 * train_emb), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            truth = torch.tensor([values.index(getattr(s, name)) for s in query_scenes])
            with torch.no_grad():
                out[name] = float((head(10 * query).argmax(1) == truth).float().mean())
    return out


def save_embeddings(path: Path, emb: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"x": emb.contiguous()}, str(tmp))
    tmp.replace(path)


def load_embeddings(path: Path) -> torch.Tensor:
    return load_file(str(path))["x"]
