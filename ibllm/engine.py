"""ChatEngine: the engine behind the UI, the CLI and the API.

One chat turn: files -> media loaders -> encoders (once per file content) -> fuse (weights) -> visual cache ->
bind network -> gated LLaMA -> streamed text deltas. Nothing here knows about Gradio.

Everything up to the bind network runs on the caller's thread; the language model runs in the engine's
``Scheduler`` (ibllm/serving.py), where concurrent chats share ``max_batch`` decode slots and one batched step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ibllm.bind import fuse
from ibllm.cache import VisualCache
from ibllm.config import GenerationConfig, ModelConfig, PictureConfig, VisualCacheConfig
from ibllm.imagine import Painter, PictureError, PictureStatus
from ibllm.kinds import KINDS
from ibllm.llm.batching import DecodeBatch
from ibllm.llm.gemv import library as gemv_library
from ibllm.llm.gemv import status as gemv_status
from ibllm.llm.gemv import use_gemv
from ibllm.llm.packed import packed_bytes, packed_nbytes
from ibllm.llm.prompt import build_chat_prompt
from ibllm.llm.stream import TextStreamer
from ibllm.llm.tokenizer import Tokenizer
from ibllm.media import detect_modality, load_media
from ibllm.media.digest import file_digest
from ibllm.media.errors import MediaError
from ibllm.media.limits import DEFAULT_LIMITS
from ibllm.media.validate import check_file
from ibllm.memory import WORKING_MARGIN, available_bytes
from ibllm.model import ImageBindLLM
from ibllm.serving import Queued, Scheduler, TokenStream
from ibllm.threads import in_passing_thread
from ibllm.types import (
    NEEDS_INPUT,
    Attachment,
    ChatEvent,
    ModelInfo,
    Neighbour,
    PictureEvent,
    PictureTimings,
    Timings,
    Turn,
)

# Leave at least this many positions for the answer when fitting a long conversation into the context.
MIN_ANSWER_TOKENS = 16
NO_PICTURE_INPUT = "a picture is drawn from the inputs: attach at least one file (with a weight above 0)"

log = logging.getLogger(__name__)


class EmbeddingMemo:
    """(content hash, modality) -> embedding, least recently used dropped first. Shared by all sessions: the
    key is the file's content, so one user's upload can only ever be reused for the very same bytes."""

    def __init__(self, capacity: int = 512):
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> torch.Tensor | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple[str, str], value: torch.Tensor) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def items(self) -> list[tuple[tuple[str, str], torch.Tensor]]:
        """A snapshot of the entries, oldest first (fine-tuning keeps them on disk between runs)."""
        with self._lock:
            return list(self._items.items())

    def __len__(self) -> int:
        return len(self._items)


def _model_times(timings: Timings, stream: TokenStream) -> None:
    """Queue, prefill and decode time of the tokens read so far, from when the model made them (not when they were
    read: a consumer that pulls late does not make the model look slow)."""
    made = stream.token_times
    n = timings.new_tokens
    timings.queued = stream.admitted - stream.submitted
    timings.prefill = made[0] - stream.admitted
    timings.decode = made[n - 1] - made[0]


class ChatEngine:
    """The loaded model plus everything a chat needs: tokenizer, visual cache, the memo of encoded inputs, and the
    scheduler that decodes every chat in flight together.

    Four things here have "cache" in their name, each one job: ``visual_cache`` (the paper's retrieval cache of
    image features), ``embeddings`` (the memo of encoder outputs per file content), the KV cache of the decode
    slots (``scheduler.batch.cache``), and ``VisualCacheConfig`` (how a request uses the visual cache).

    ``max_batch``: decode slots, i.e. answers generated at the same time (more wait in line, FIFO). ``compile``:
    compile the batched one-token step (``DecodeBatch.compile``; warmed up here, eager where it fails).
    ``unclip``: where the Stable unCLIP pipeline for picture answers is (a folder or a hub repo id; default
    ``IBLLM_UNCLIP`` or the official one, see ``ibllm.imagine``); nothing is loaded until the first picture.
    """

    def __init__(self, net: ImageBindLLM, tokenizer: Tokenizer, *, visual_cache: VisualCache | None = None,
                 info: ModelInfo | None = None, max_batch: int = 4, compile: bool = False,
                 unclip: str | None = None):
        self.net = net.eval()
        self.cfg: ModelConfig = net.cfg
        self.tokenizer = tokenizer
        self.visual_cache = visual_cache
        param = next(net.llama.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.info = info or ModelInfo(name=self.cfg.name, weights="(unspecified)", device=str(self.device),
                                      dtype=str(self.dtype).replace("torch.", ""), is_default=False, trained=True)
        self.embeddings = EmbeddingMemo()
        self._blank: torch.Tensor | None = None
        # CPU weights: the decode step's products of a few rows through ibllm's kernel (llm.gemv), ~1.7-3x torch's
        # rate (float32 one and 8 rows on a 2-core EPYC; half precision ~2x on a Xeon); built now (seconds, once per
        # machine). Where it is unavailable, float32 weights may get MKL's packed copy for B-row steps instead.
        if self.device.type == "cpu" and (use_gemv(net) or any(getattr(m, "cpu_int8", False)
                                                               for m in net.modules())) \
                and gemv_library() is not None:
            self.info = replace(self.info, decode=f"small products through {gemv_status()}")
            log.info("decode: %s", self.info.decode)
        batch = DecodeBatch(net.llama, max_batch, vocab_limit=tokenizer.vocab_size,
                            pack=self._room_to_pack(net.llama, max_batch))
        if batch.packed_rows:
            log.info("float32 weights packed for %d-row decode steps (%.2f GB more)", batch.packed_rows,
                     packed_nbytes(net.llama) / 1e9)
        if compile:
            batch.compile()
        self.scheduler = Scheduler(batch)
        self.painter = Painter(unclip, self.device, self.dtype, self.cfg.imagebind.out_embed_dim)

    def _room_to_pack(self, llama: torch.nn.Module, slots: int) -> bool:
        """Whether the decode slots may pack float32 CPU weights for B rows (``llm.packed``): a copy of the weights,
        so only where it fits beside everything else with the working margin to spare."""
        need = packed_bytes(llama) if slots > 1 else 0
        if need == 0:
            return False
        room = available_bytes(self.device) - WORKING_MARGIN
        if need > room:
            log.info("not packing the weights for batched decoding: %.1f GB needed, %.1f GB free", need / 1e9,
                     max(room, 0) / 1e9)
            return False
        return True

    def close(self) -> None:
        """Stop the decode thread (answers still in flight end with an error)."""
        self.scheduler.close()

    # -- inputs -------------------------------------------------------------------------------------------------

    def detect(self, path: str | Path) -> str:
        """The modality of a file (MediaError for anything unusable)."""
        return detect_modality(path)

    @torch.no_grad()
    def embed(self, attachment: Attachment) -> torch.Tensor:
        """The encoder's embedding (E,) of one attachment, computed once per file content."""
        modality = attachment.modality
        if modality not in KINDS:
            raise MediaError(f"unknown modality {modality!r}; accepted: {', '.join(KINDS)}")
        if not Path(attachment.path).is_file():
            raise MediaError(f"{Path(attachment.path).name}: file not found (was it removed or never uploaded?)")
        check_file(attachment.path, DEFAULT_LIMITS)  # before hashing: a 30 GB file is refused, not read
        try:
            key = (file_digest(attachment.path), modality)
        except OSError as exc:  # a special file behind a link (/proc/self/mem), a read error
            raise MediaError(f"{Path(attachment.path).name} could not be read ({exc.strerror or exc})") from None
        cached = self.embeddings.get(key)
        if cached is not None:
            return cached
        # Decoded and encoded in a thread that ends with it: a web server's worker thread that ran torch's
        # parallel regions itself would keep an OpenMP pool alive and slow the decode loop's (ibllm/threads.py).
        emb = in_passing_thread(self._encode, attachment.path, modality)
        self.embeddings.put(key, emb)
        return emb

    @torch.no_grad()
    def _encode(self, path: str, modality: str) -> torch.Tensor:
        x = load_media(path, modality, self.cfg.imagebind)
        x = x.unsqueeze(0).to(self.device)
        if x.is_floating_point() and modality != "point":
            x = x.to(self.dtype)
        return self.net.image_bind(KINDS[modality].branch, x)[0].float().cpu()

    def _blank_feature(self) -> torch.Tensor:
        if self._blank is None:  # the same for every text-only turn: computed once
            self._blank = self.net.blank_feature().cpu()
        return self._blank

    def fused_feature(self, attachments: Sequence[Attachment]) -> torch.Tensor | None:
        """Weighted fusion of the attachments' embeddings (1, E); None when nothing has a positive weight."""
        return in_passing_thread(self._fuse, attachments)  # torch work outside the decode loop: ibllm/threads.py

    def _fuse(self, attachments: Sequence[Attachment]) -> torch.Tensor | None:
        kept = [a for a in attachments if a.weight > 0]
        if not kept:
            return None
        return fuse([self.embed(a)[None] for a in kept], [a.weight for a in kept])

    def _retrieve(self, feature: torch.Tensor, options: VisualCacheConfig) -> tuple[torch.Tensor, list[Neighbour]]:
        if self.visual_cache is None or not options.enabled or options.top_k <= 0 or options.weight <= 0:
            return feature, []
        k = min(int(options.top_k), self.visual_cache.index.ntotal)
        mixed, found = self.visual_cache.mix_with_neighbours(feature, k, options.temperature, options.weight)
        neighbours = [
            Neighbour(index=int(found.rows[0, j]), similarity=float(found.sims[0, j]),
                      caption=found.captions[0][j] if found.captions else None,
                      thumbnail=found.thumbnails[0][j] if found.thumbnails else None)
            for j in range(found.rows.shape[1])
        ]
        return mixed, neighbours

    def neighbours(self, attachments: Sequence[Attachment],
                   visual_cache: VisualCacheConfig | None = None) -> list[Neighbour]:
        """What the visual cache retrieves for these inputs (for the UI's inspector), even where it is switched off."""
        return in_passing_thread(self._neighbours, attachments, replace(visual_cache or self.cfg.visual_cache,
                                                                       enabled=True))

    def _neighbours(self, attachments: Sequence[Attachment], visual_cache: VisualCacheConfig) -> list[Neighbour]:
        feature = self.fused_feature(attachments)
        return [] if feature is None else self._retrieve(feature, visual_cache)[1]

    # -- chat -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _visual_term(self, attachments: Sequence[Attachment], visual_cache: VisualCacheConfig,
                     timings: Timings) -> tuple[torch.Tensor, list[Neighbour]]:
        """A turn's inputs encoded, fused, mixed with the cache and bound: the per-layer injection and the
        neighbours retrieved (``timings`` gets encode / cache / bind). Run in one passing thread per turn."""
        t0 = time.perf_counter()
        feature = self.fused_feature(attachments)
        timings.encode = time.perf_counter() - t0
        neighbours: list[Neighbour] = []
        if feature is None:
            feature = self._blank_feature()
        else:
            t0 = time.perf_counter()
            feature, neighbours = self._retrieve(feature, visual_cache)
            timings.cache = time.perf_counter() - t0
        t0 = time.perf_counter()
        injection = self.net.injection(feature.to(self.device))
        timings.bind = time.perf_counter() - t0
        return injection, neighbours


    def chat(self, message: str, *, history: Sequence[Turn] = (), attachments: Sequence[Attachment] = (),
             visual_cache: VisualCacheConfig | None = None, generation: GenerationConfig | None = None,
             should_stop: Callable[[], bool] | None = None) -> Iterator[ChatEvent]:
        """Stream the answer to ``message``: ChatEvents with text deltas, then a final one with ``done=True``.

        ``visual_cache`` / ``generation`` default to the model's own settings (``self.cfg``)."""
        visual_cache = visual_cache or self.cfg.visual_cache
        generation = generation or self.cfg.generation
        timings = Timings()
        if self.info.is_default and not any(a.weight > 0 for a in attachments):
            # The default model knows only its toy world's inputs: asked with none, it described a scene it made up
            # ("hi, what can you do?" -> "A large white cylinder..."). Say what it can do instead.
            yield ChatEvent(delta=NEEDS_INPUT, text=NEEDS_INPUT)
            yield ChatEvent(text=NEEDS_INPUT, done=True, timings=timings)
            return

        injection, neighbours = in_passing_thread(self._visual_term, attachments, visual_cache, timings)
        max_new = max(1, min(int(generation.max_new_tokens), self.cfg.llama.max_seq_len - MIN_ANSWER_TOKENS))
        prompt = build_chat_prompt(message, history, self.tokenizer,
                                   max(self.cfg.llama.max_seq_len - max_new, MIN_ANSWER_TOKENS))
        timings.prompt_tokens = len(prompt.ids)
        notes = list(prompt.notes)
        stream = self.scheduler.submit(prompt.ids, injection, replace(generation, max_new_tokens=max_new),
                                       eos_id=self.tokenizer.eos_id, should_stop=should_stop)
        streamer = TextStreamer(self.tokenizer.decode)
        pending = ""  # text of tokens read but not yet handed out
        try:
            for item in stream:
                if isinstance(item, Queued):
                    yield ChatEvent(queue_position=item.position, timings=replace(timings), neighbours=neighbours)
                    continue
                if should_stop is not None and should_stop():
                    break  # tokens the decode thread made before it saw the stop are not shown
                timings.new_tokens += 1
                _model_times(timings, stream)
                pending += streamer.put(item)
                # One event per pull, not per token: a consumer slower than the model (a web page through Gradio)
                # gets in one event every token made since its last one, instead of falling further behind.
                if pending and not stream.ready():
                    yield ChatEvent(delta=pending, text=streamer.text, timings=replace(timings),  # a snapshot
                                    neighbours=neighbours)
                    pending = ""
        finally:
            stream.close()  # a stop, an error or a closed generator (client gone) frees the slot at once
        if not timings.new_tokens and stream.admitted is not None:  # no token at all (immediate eos or stop)
            timings.queued = stream.admitted - stream.submitted
            timings.prefill = time.perf_counter() - stream.admitted
        tail = pending + streamer.flush()
        yield ChatEvent(delta=tail, text=streamer.text, done=True, timings=timings, neighbours=neighbours,
                        notes=notes)

    def answer(self, message: str, **kwargs) -> str:
        """The whole answer at once (same as joining ``chat``'s deltas)."""
        text = ""
        for event in self.chat(message, **kwargs):
            text = event.text
        return text

    # -- pictures ---------------------------------------------------------------------------------------------

    def picture_status(self) -> PictureStatus:
        """Whether picture answers can be drawn here, and why not (cheap: nothing is imported or loaded)."""
        return self.painter.status()

    def check_picture(self, attachments: Sequence[Attachment]) -> None:
        """PictureError when no picture of ``attachments`` can be drawn here: pictures unavailable (the reason
        ``picture_status`` gives) or no input with a weight above 0. Cheap (nothing loaded or encoded), so a front end
        can refuse a request before it answers anything."""
        status = self.painter.status()
        if not status.available and not self.painter.loaded:
            raise PictureError(f"no picture: {status.note}")
        if not any(a.weight > 0 for a in attachments):
            raise PictureError(NO_PICTURE_INPUT)

    def picture_feature(self, attachments: Sequence[Attachment],
                        visual_cache: VisualCacheConfig | None = None) -> tuple[torch.Tensor, list[Neighbour]]:
        """The unit feature (1, E) a picture is drawn from: the attachments fused and mixed with the visual cache,
        exactly as the language model gets them, with the neighbours retrieved. PictureError without inputs."""
        return in_passing_thread(self._picture_feature, attachments, visual_cache or self.cfg.visual_cache)

    def _picture_feature(self, attachments: Sequence[Attachment],
                         visual_cache: VisualCacheConfig) -> tuple[torch.Tensor, list[Neighbour]]:
        feature = self.fused_feature(attachments)
        if feature is None:
            raise PictureError(NO_PICTURE_INPUT)
        feature, neighbours = self._retrieve(feature, visual_cache)
        return feature.float() / feature.float().norm(dim=-1, keepdim=True), neighbours

    def imagine(self, message: str, *, attachments: Sequence[Attachment] = (),
                visual_cache: VisualCacheConfig | None = None, picture: PictureConfig | None = None,
                should_stop: Callable[[], bool] | None = None) -> Iterator[PictureEvent]:
        """Draw the answer to ``message`` as a picture: the fused, cache-mixed feature of ``attachments`` through
        Stable unCLIP with ``message`` as the prompt (``ibllm.imagine``). Streams ``PictureEvent``s (place in line,
        loading, each step); the last one (``done=True``) holds the PIL image and the seed it was drawn with.

        The pipeline is loaded on the first call, on this engine's device and dtype, and draws one picture at a
        time. PictureError (a RuntimeError) when pictures cannot be drawn here (``picture_status`` says why
        beforehand), for settings out of range and for a request without inputs; MediaError for an unusable file.
        This is the engine-level entry point for every front end (UI, CLI, HTTP API)."""
        picture = picture or PictureConfig()
        picture.check()
        self.check_picture(attachments)
        timings = PictureTimings()
        t0 = time.perf_counter()
        feature, _ = self.picture_feature(attachments, visual_cache)
        timings.encode = time.perf_counter() - t0
        yield from self.painter.paint(feature, message, picture, should_stop=should_stop, timings=timings)
