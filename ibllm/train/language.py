"""The language side: LM pre-training of the tiny LLaMA, then the two ImageBind-LLM stages (REFERENCE.md section 6).

Text of a scene (toy-world records):

- caption: ``format_prompt("Generate caption of this image")`` + one of the caption templates;
- Q&A: ``format_prompt(question)`` + the answer, for every latent and "describe", any phrasing;
- reading: ``format_prompt(question, input=caption)`` + the answer (text-only instruction data: the answer is in
  the prompt, like the Alpaca part of the reference's stage-2 mix).

A sequence is ``encode(prompt, bos) + encode(answer) + [eos]`` (prompt and answer tokenised apart, exactly as
generation sees them: the prompt alone, then sampled ids).

- LM pre-training: all three kinds, no visual input, next-token loss on every token; whole LLaMA trainable.
- Stage 1: captions of training images; trainable = bind network, prefix queries, gates; loss on the caption.
- Stage 2: Q&A on training images plus reading samples with an all-zero image (the reference's treatment of
  text-only data); trainable = LLaMA norms, biases and LoRA (through peft); loss on the answer.

Only image embeddings ever reach the language side. In stage 2 a fraction of the visual examples
(``centroid_fraction``) are *centroid views*: the re-normalised mean of the embeddings of up to
``CENTROID_IMAGES`` training images that agree on what one other modality carries (``toyworld.CARRIES``: the
shape for a point cloud, the motion for an IMU trace), questioned as that modality would be. A tower aligned
contrastively to frozen image embeddings lands near the centre of the images it cannot tell apart (an IMU trace
knows the motion, not the colour), and a language side that has only read single images decodes those centres
poorly (held-out motion read off such centres: 75 %, against 88 % off single images). The centroids are
averages of image embeddings: no other modality's data reaches the language side. (Centroid captions in stage 1
as well cost text inputs 27 points without the cache; stage 2 alone did not.)
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ibllm.bind import fuse
from ibllm.cache import VisualCache
from ibllm.config import VisualCacheConfig
from ibllm.llm.llama import init_weights
from ibllm.llm.lora import from_peft, mark_stage2_trainable, to_peft
from ibllm.llm.prompt import format_prompt, render_chat
from ibllm.llm.tokenizer import Tokenizer
from ibllm.model import ImageBindLLM
from ibllm.train import toyworld as tw
from ibllm.train.common import SINGLE, Dist, count, train_loop

CAPTION_INSTRUCTION = "Generate caption of this image"
QA_LATENTS = (*tw.LATENTS, "describe")
IGNORE = -100


@dataclass(frozen=True)
class Example:
    prompt: list[int]
    answer: list[int]  # ends with eos
    feature: int  # row of the image-embedding table; -1 = the all-zero image; -2 = no visual input at all
    view: str = "image"  # "image": that row's embedding; a modality name: the centroid view of that row's scene
    mix: tuple[int, str] | None = None  # (row, view) of a second input fused with the first (bind.fuse)
    cached: bool = False  # the feature goes through the visual cache, as the chat serves it with the cache on


# How many earlier turns a stage-2 dialogue has before the question that is trained on (weights of 0, 1, 2, 3).
HISTORY_WEIGHTS = (0.4, 0.25, 0.2, 0.15)
# Of the questions about a view that lacks some latents, the share asking about one it does not carry (default).
CANNOT_TELL_FRACTION = 0.2
# Latents asked about, with "describe" drawn twice as often as any one latent (it names all of them at once).
ASK_WEIGHTS = {**{latent: 1.0 for latent in tw.LATENTS}, "describe": 2.0}


class TextMaker:
    """Draws tokenised examples of a set of scenes (prompt and answer ids are cached by string).

    Questions come from the training part of the question grammar (``toyworld.questions``); a Q&A example is a
    dialogue in the chat format the app serves (``llm.prompt.render_chat``): up to three earlier turns about
    other latents of the same inputs, answered in the model's own style, then the question trained on."""

    def __init__(self, tokenizer: Tokenizer, records: list[dict[str, Any]], seed: int = 0,
                 cannot_tell_fraction: float = CANNOT_TELL_FRACTION,
                 history_weights: tuple[float, ...] = HISTORY_WEIGHTS, word_dropout: float = 0.0,
                 word_insertion: float = 0.0, named_fraction: float = 0.0):
        self.word_insertion = word_insertion  # toyworld.insert_words on every question asked
        self.named_fraction = named_fraction  # the share of questions that name the input ("the sound")
        self.cannot_tell_fraction = cannot_tell_fraction
        self.word_dropout = word_dropout  # toyworld.drop_words on every question asked
        self.history_weights = torch.tensor(history_weights)
        self.tok = tokenizer
        self.scenes: list[tw.Scene] = [r["scene"] for r in records]
        self.captions: list[list[str]] = [r["caption_variants"] for r in records]
        self.gen = torch.Generator().manual_seed(seed)
        self.rng = np.random.default_rng(seed)

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one maker per stage; the cache dies with it
    def _prompt(self, instruction: str, context: str | None) -> tuple[int, ...]:
        return tuple(self.tok.encode(format_prompt(instruction, context), bos=True, eos=False))

    @functools.lru_cache(maxsize=65536)  # noqa: B019
    def _answer(self, text: str) -> tuple[int, ...]:
        return tuple(self.tok.encode(text, bos=False, eos=True))

    def _pick(self, n: int) -> int:
        return int(torch.randint(0, n, (1,), generator=self.gen))

    def _chance(self, p: float) -> bool:
        return float(torch.rand(1, generator=self.gen)) < p

    def caption(self, i: int, feature: int) -> Example:
        text = self.captions[i][self._pick(len(self.captions[i]))]
        return Example(list(self._prompt(CAPTION_INSTRUCTION, None)), list(self._answer(text)), feature)

    def _latent(self, carried: tuple[str, ...], avoid: set[str]) -> str:
        """A latent to ask about: mostly one the input carries (or "describe"), sometimes one it cannot."""
        missing = [n for n in tw.LATENTS if n not in carried and n not in avoid]
        if missing and self._chance(self.cannot_tell_fraction):
            return missing[self._pick(len(missing))]
        options = [n for n in (*carried, "describe") if n not in avoid] or [*carried, "describe"]
        weights = torch.tensor([ASK_WEIGHTS[n] for n in options])
        return options[int(torch.multinomial(weights, 1, generator=self.gen))]

    def _turn(self, scene: tw.Scene, carried: tuple[str, ...], avoid: set[str],
              modality: str | None = None) -> tuple[str, str, str]:
        latent = self._latent(carried, avoid)
        named = modality if modality is not None and self._chance(self.named_fraction) else None
        question = tw.draw(latent, self.rng, named=named)
        answer = tw.answer_for(scene, latent, carried, question)
        question = tw.drop_words(question, self.rng, self.word_dropout)
        return latent, tw.insert_words(question, latent, self.rng, self.word_insertion), answer

    def history_length(self) -> int:
        """How many earlier turns a dialogue has (``history_weights``). Drawn once per batch by the training loops,
        so the rows of a batch have similar lengths and little padding."""
        return int(torch.multinomial(self.history_weights, 1, generator=self.gen))

    def qa(self, i: int, feature: int, reading: bool = False, view: str = "image",
           mix: tuple[int, str] | None = None, n_history: int | None = None) -> Example:
        """A question about scene ``i`` as ``view`` (+ ``mix``), after ``n_history`` earlier turns (default: drawn;
        none when ``reading``)."""
        scene, carried = self.scene_as(i, view, mix)
        if reading:  # text-only instruction data: the caption is the Alpaca input, one turn
            _, question, answer = self._turn(scene, carried, set())
            context = self.captions[i][self._pick(len(self.captions[i]))]
            return Example(list(self._prompt(question, context)), list(self._answer(answer)), feature)
        if n_history is None:
            n_history = self.history_length()
        modality = self.named_modality(view, mix)
        asked: set[str] = set()
        history = []
        for _ in range(n_history):
            latent, question, answer = self._turn(scene, carried, asked, modality)
            asked.add(latent)
            history.append((question, answer))
        _, question, answer = self._turn(scene, carried, asked, modality)
        prompt = tuple(self.tok.encode(render_chat(question, history), bos=True, eos=False)) if history else \
            self._prompt(question, None)
        return Example(list(prompt), list(self._answer(answer)), feature, view, mix)

    def scene_as(self, i: int, view: str, mix: tuple[int, str] | None = None
                 ) -> tuple[tw.Scene, tuple[str, ...]]:
        """The scene the inputs show and the latents they carry: an image carries everything; a centroid view
        what its modality carries; a mix of two views with disjoint latents each latent from the view that
        carries it (the rest from the first)."""
        parts = [(self.scenes[i], "text" if view == "image" else view)]
        if mix is not None:
            parts.append((self.scenes[mix[0]], mix[1]))
        return tw.mixed_scene(parts)

    def named_modality(self, view: str, mix: tuple[int, str] | None) -> str | None:
        """What a dialogue's questions call the input when they name it (None: they never do): an image stands
        for a picture, a video or a text (each carries every latent, and the chat reads all three as image
        embeddings); a centroid view for its own modality; a mix for either of its two."""
        if self.named_fraction <= 0:
            return None
        options = ("image", "video", "text") if view == "image" else (view, *(() if mix is None else (mix[1],)))
        return options[self._pick(len(options))]

    def view(self, centroid_fraction: float) -> str:
        """The view of one visual example: a centroid view (one of CENTROID_VIEWS at random) with probability
        ``centroid_fraction``, else the image itself."""
        if centroid_fraction <= 0 or float(torch.rand(1, generator=self.gen)) >= centroid_fraction:
            return "image"
        return CENTROID_VIEWS[self._pick(len(CENTROID_VIEWS))]

    def mix_for(self, view: str, n: int) -> tuple[int, str] | None:
        """A second input for a centroid view, with probability MIX_FRACTION: an IMU trace of another scene
        with a view that carries no motion (a point cloud, sound, depth or thermal map), or None."""
        if view in ("image", "imu") or not self._chance(MIX_FRACTION):
            return None
        return self._pick(n), "imu"


# Of the centroid views that carry no motion, the share mixed with an IMU view of another scene.
MIX_FRACTION = 0.25


# Modalities whose centroid views the language side reads in training (those that carry some latents only).
CENTROID_VIEWS = tuple(m for m, carried in tw.CARRIES.items() if carried != tw.LATENTS)
CENTROID_IMAGES = 32


class Centroids:
    """Centroid views of training scenes: the re-normalised mean embedding of up to ``CENTROID_IMAGES`` random
    training images that agree with the scene on every latent a modality carries."""

    def __init__(self, scenes: list[tw.Scene], image_emb: torch.Tensor, gen: torch.Generator):
        self.scenes, self.emb, self.gen = scenes, image_emb, gen
        self.groups: dict[tuple[str, tuple[Any, ...]], torch.Tensor] = {}
        for view in CENTROID_VIEWS:
            rows: dict[tuple[Any, ...], list[int]] = {}
            for i, s in enumerate(scenes):
                rows.setdefault(self._key(s, view), []).append(i)
            self.groups.update({(view, k): torch.tensor(v) for k, v in rows.items()})

    @staticmethod
    def _key(scene: tw.Scene, view: str) -> tuple[Any, ...]:
        return tuple(getattr(scene, n) for n in tw.CARRIES[view])

    def __call__(self, i: int, view: str) -> torch.Tensor:
        rows = self.groups[(view, self._key(self.scenes[i], view))]
        if len(rows) > CENTROID_IMAGES:
            rows = rows[torch.randperm(len(rows), generator=self.gen)[:CENTROID_IMAGES]]
        return F.normalize(self.emb[rows].float().mean(0), dim=-1)


@dataclass(frozen=True)
class ServedCache:
    """The visual cache as the chat applies it with the cache on: the cache the model ships (rows = the first
    training images, ``pipeline.build_cache``) with the model's own top-k, temperature and weight."""

    cache: VisualCache
    options: VisualCacheConfig

    def __call__(self, features: torch.Tensor, exclude: list[int]) -> torch.Tensor:
        o = self.options
        return self.cache.mix(features, min(o.top_k, len(self.cache)), o.temperature, o.weight, exclude)

    def exclude(self, e: Example) -> int:
        """The cache row an example's feature may not retrieve: a cached training image is its own nearest
        neighbour, which no input the chat sees has (-1: none)."""
        return e.feature if e.view == "image" and e.mix is None and 0 <= e.feature < len(self.cache) else -1


def collate(examples: list[Example], pad_id: int, loss_on_prompt: bool = False,
            max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, targets) of shape (B, T); targets[t] is the id to predict at position t (IGNORE where no loss)."""
    seqs = [e.prompt + e.answer for e in examples]
    t = max(len(s) for s in seqs)
    if max_len is not None:
        t = min(t, max_len)
    tokens = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), t), IGNORE, dtype=torch.long)
    for row, (e, s) in enumerate(zip(examples, seqs, strict=True)):
        s = s[:t]
        tokens[row, :len(s)] = torch.tensor(s)
        first = 1 if loss_on_prompt else len(e.prompt)  # predict token j from position j-1
        for j in range(max(first, 1), len(s)):
            targets[row, j - 1] = s[j]
    return tokens, targets


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)


def _features(examples: list[Example], image_emb: torch.Tensor, blank: torch.Tensor,
              centroids: Centroids | None = None, cache: ServedCache | None = None) -> torch.Tensor:
    def one(i: int, view: str) -> torch.Tensor:
        return image_emb[i] if view == "image" else centroids(i, view)

    def row(e: Example) -> torch.Tensor:
        if e.feature < 0:
            return blank[0]
        if e.mix is None:
            return one(e.feature, e.view)
        return fuse([one(e.feature, e.view)[None], one(*e.mix)[None]], [1.0, 1.0])[0]  # as the chat fuses inputs

    feats = torch.stack([row(e).float() for e in examples])
    cached = [j for j, e in enumerate(examples) if e.cached]
    if cached:
        feats[cached] = cache(feats[cached], [cache.exclude(examples[j]) for j in cached])
    return feats


def _visual_answer_loss(net: ImageBindLLM, examples: list[Example], pad_id: int, image_emb: torch.Tensor,
                        blank: torch.Tensor, device: torch.device, centroids: Centroids | None = None,
                        cache: ServedCache | None = None) -> torch.Tensor:
    """Stages 1 and 2: next-token loss on the answers, with each example's visual feature injected."""
    tokens, targets = collate(examples, pad_id)
    feats = _features(examples, image_emb, blank, centroids, cache).to(device)
    logits = net.llama(tokens.to(device), 0, net.injection(feats), use_cache=False)
    return lm_loss(logits, targets.to(device))


def init_llama(net: ImageBindLLM, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    init_weights(net.llama, gen)


def pretrain_lm(net: ImageBindLLM, tok: Tokenizer, records: list[dict[str, Any]], *, steps: int, batch: int,
                lr: float, weight_decay: float, seed: int, dist: Dist = SINGLE, show: bool = True) -> dict[str, float]:
    """The tiny LLaMA as a plain language model of the toy world's text (captions, Q&A, reading)."""
    llama = net.llama
    llama.clear_cache()
    for p in net.parameters():
        p.requires_grad_(False)
    named = [(n, p) for n, p in llama.named_parameters() if ".lora_" not in n and not n.endswith(".gate.scale")]
    for _, p in named:
        p.requires_grad_(True)
    maker = TextMaker(tok, records, seed)
    n = len(records)
    llama.train()

    def loss_fn(step: int) -> torch.Tensor:
        examples = []
        turns = maker.history_length()
        for _ in range(batch):
            i = maker._pick(n)
            kind = maker._pick(3)
            examples.append(maker.caption(i, -2) if kind == 0 else
                            maker.qa(i, -2, reading=kind == 2, view="image" if kind == 2 else maker.view(0.25),
                                     n_history=turns))
        examples = examples[dist.rank::dist.world]
        tokens, targets = collate(examples, tok.eos_id, loss_on_prompt=True)
        logits = llama(tokens.to(dist.device), 0, None, use_cache=False)
        return lm_loss(logits, targets.to(dist.device))

    log = train_loop("LM pre-training", steps, named, loss_fn, lr=lr, weight_decay=weight_decay, dist=dist,
                     show=show, min_lr_frac=0.1)
    llama.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return {**log.summary(), "trainable": count(named)}


def stage1(net: ImageBindLLM, tok: Tokenizer, records: list[dict[str, Any]], image_emb: torch.Tensor, *,
           steps: int, batch: int, lr: float, weight_decay: float, seed: int, dist: Dist = SINGLE,
           show: bool = True) -> dict[str, float]:
    """Image-caption training of the bind network, prefix queries and gates; everything else frozen."""
    net.llama.clear_cache()
    for p in net.parameters():
        p.requires_grad_(False)
    named = [(f"bind.{n}", p) for n, p in net.bind.named_parameters()]
    named += [(f"prefix_query.{n}", p) for n, p in net.prefix_query.named_parameters()]
    named += [(n, p) for n, p in net.llama.named_parameters() if n.endswith(".attention.gate.scale")]
    for _, p in named:
        p.requires_grad_(True)
    maker = TextMaker(tok, records, seed + 1)
    blank = net.blank_feature()
    net.eval()  # no dropout anywhere; only the parameters above change
    n = len(records)

    def loss_fn(step: int) -> torch.Tensor:
        examples = [maker.caption(i, i) for i in (maker._pick(n) for _ in range(batch))][dist.rank::dist.world]
        return _visual_answer_loss(net, examples, tok.eos_id, image_emb, blank, dist.device)

    log = train_loop("stage 1 (image-caption)", steps, named, loss_fn, lr=lr, weight_decay=weight_decay,
                     dist=dist, show=show)
    for p in net.parameters():
        p.requires_grad_(False)
    gates = torch.stack([layer.attention.gate.scale.detach().flatten() for layer in net.llama.layers]).tanh()
    return {**log.summary(), "trainable": count(named), "mean_abs_tanh_gate": float(gates.abs().mean())}


def stage2(net: ImageBindLLM, tok: Tokenizer, records: list[dict[str, Any]], image_emb: torch.Tensor, *,
           steps: int, batch: int, lr: float, weight_decay: float, seed: int, text_only_fraction: float = 0.2,
           centroid_fraction: float = 0.0, cannot_tell_fraction: float = CANNOT_TELL_FRACTION,
           history_weights: tuple[float, ...] = HISTORY_WEIGHTS, word_dropout: float = 0.0,
           word_insertion: float = 0.0, named_fraction: float = 0.0, cache: ServedCache | None = None,
           cached_fraction: float = 0.0, cached_fraction_partial: float = 0.0, dist: Dist = SINGLE,
           show: bool = True) -> dict[str, float]:
    """Instruction tuning: LoRA (peft) + biases + norms of LLaMA; bind network, prefix queries and gates frozen.

    With ``cache``, a share of the visual examples is read through it exactly as the chat serves the cache on
    (``cached_fraction`` of the images, ``cached_fraction_partial`` of the centroid views and their mixes): the mix
    pulls a point cloud's or a sound's feature toward particular images, colour and place included, and a
    language side that has only read unmixed features then names a colour it cannot know. ``word_dropout``:
    frame words of the questions left out at random (``toyworld.drop_words``); ``word_insertion``: the share of
    questions naming their latent that get other words strewn in (``toyworld.insert_words``); ``named_fraction``:
    the share of questions that name the input as people do ("What colour is the object in the picture?", "What
    shape does the sound show?"), each dialogue calling its input by one modality's nouns."""
    net.llama.clear_cache()
    for p in net.parameters():
        p.requires_grad_(False)
    peft_model = to_peft(net.llama)
    mark_stage2_trainable(peft_model)
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    maker = TextMaker(tok, records, seed + 2, cannot_tell_fraction, history_weights, word_dropout, word_insertion,
                      named_fraction)
    gen = torch.Generator().manual_seed(seed + 12)
    centroids = Centroids(maker.scenes, image_emb, gen)
    blank = net.blank_feature()
    net.eval()
    n = len(records)

    def loss_fn(step: int) -> torch.Tensor:
        examples = []
        turns = maker.history_length()
        for _ in range(batch):
            i = maker._pick(n)
            reading = float(torch.rand(1, generator=maker.gen)) < text_only_fraction
            view = "image" if reading else maker.view(centroid_fraction)
            example = maker.qa(i, -1 if reading else i, reading=reading, view=view, mix=maker.mix_for(view, n),
                               n_history=turns)
            share = cached_fraction if view == "image" else cached_fraction_partial
            if cache is not None and not reading and maker._chance(share):
                example = dataclasses.replace(example, cached=True)
            examples.append(example)
        examples = examples[dist.rank::dist.world]
        return _visual_answer_loss(net, examples, tok.eos_id, image_emb, blank, dist.device, centroids, cache)

    log = train_loop("stage 2 (instructions, LoRA)", steps, named, loss_fn, lr=lr, weight_decay=weight_decay,
                     dist=dist, show=show)
    net.llama = from_peft(peft_model)
    for p in net.parameters():
        p.requires_grad_(False)
    return {**log.summary(), "trainable": count(named)}
