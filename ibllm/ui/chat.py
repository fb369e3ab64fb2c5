"""The chat function behind the UI and the ``/chat`` API: Gradio values in, streamed cumulative text out."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import gradio as gr

from ibllm.config import GenerationConfig, VisualCacheConfig
from ibllm.engine import ChatEngine
from ibllm.media.errors import MediaError
from ibllm.types import Attachment, ChatEvent, Neighbour, Turn
from ibllm.ui.history import ERROR_MARK, message_parts, normalise_history, unique
from ibllm.ui.inputs import (
    Detector,
    RequestError,
    collect_items,
    engine_attachments,
    parse_modalities,
    parse_weights,
    resolve_modality,
)
from ibllm.ui.settings import to_cache_options, to_generation_options
from ibllm.ui.zerogpu import gpu

log = logging.getLogger(__name__)

NEIGHBOUR_HEADERS = ["rank", "entry", "similarity", "caption"]


def neighbour_rows(neighbours: Sequence[Neighbour]) -> list[list[Any]]:
    return [[i + 1, n.index, round(float(n.similarity), 4), n.caption or ""] for i, n in enumerate(neighbours)]


def neighbour_thumbnails(neighbours: Sequence[Neighbour]) -> list[tuple[str, str]]:
    return [(n.thumbnail, f"{n.similarity:.3f} {n.caption or ''}".strip()) for n in neighbours
            if n.thumbnail and os.path.isfile(n.thumbnail)]


def timings_markdown(event: ChatEvent, cache: VisualCacheConfig, cache_entries: int) -> str:
    if not cache_entries:
        state = "none loaded"
    else:
        state = f"on (top-{cache.top_k} of {cache_entries:,})" if cache.enabled else "off"
    lines = [f"**Last answer** · {event.timings.summary()}", f"visual cache: {state}"]
    lines += [f"note: {n}" for n in event.notes]
    return "  \n".join(lines)


def _suspects(error: MediaError, new_files: Sequence[str], all_files: Sequence[str]) -> list[str]:
    """The files a MediaError is about: those it names, else the ones new in this turn (earlier ones worked)."""
    text = str(error)
    named = [p for p in all_files if os.path.basename(p) in text]
    return named or list(new_files) or list(all_files)


class ChatHandler:
    """Turns one chat request into engine calls; holds no conversation state (that lives in the session)."""

    def __init__(self, engine: ChatEngine) -> None:
        self.engine = engine
        self.detect = Detector(engine)
        # ZeroGPU attaches a GPU only while this runs; elsewhere ``gpu`` returns the function unchanged.
        self._stream_events = gpu(self._stream_events)

    def _stream_events(self, message: str, history: list[Turn], attachments: list[Attachment], cache: VisualCacheConfig,
                       generation: GenerationConfig, stop: threading.Event) -> Iterator[ChatEvent]:
        events = self.engine.chat(message, history=history, attachments=attachments, visual_cache=cache,
                                  generation=generation, should_stop=stop.is_set)
        # A plain loop, not ``yield from``: on close, ``yield from`` would close the engine's iterator before this
        # ``finally`` runs, i.e. before the stop flag is up; here the flag is raised first, then the engine closed.
        try:
            for event in events:  # noqa: UP028 - see above
                yield event
        finally:
            stop.set()
            close = getattr(events, "close", None)
            if close is not None:
                close()

    def _plan(self, files: Sequence[str], removed: Sequence[str], session_weights: dict[str, float] | None,
              session_modalities: dict[str, str] | None, weights_text: str | None = None,
              modalities_text: str | None = None) -> list[Attachment]:
        """Check every file still in the conversation, say how to read it and weigh it.

        Raises MediaError for an unusable file or malformed API weights/modalities.
        """
        paths = [p for p in unique(files) if p not in removed]
        given = parse_modalities(modalities_text)
        modalities = {}
        for i, path in enumerate(paths):
            detected, error = self.detect(path)
            if error:
                raise MediaError(error)
            modalities[path] = resolve_modality(i, path, detected, session_modalities or {}, given)
        return engine_attachments(paths, modalities, session_weights or {}, parse_weights(weights_text))

    def respond(self, message: Any, history: list[Any], session_weights: dict[str, float],
                session_modalities: dict[str, str], removed: list[str], weights: str, modalities: str,
                cache: bool, cache_top_k: float, cache_temperature: float, cache_weight: float,
                max_new_tokens: float, temperature: float, top_p: float, seed: float
                ) -> Iterator[tuple[Any, ...]]:
        """Stream the answer to ``message`` as cumulative text, with timings, neighbours and the inputs list.

        ``history`` is the conversation before this message; every file attached in it (and not removed) is
        part of this turn's input. ``weights`` / ``modalities`` (JSON, for API callers) override the panel's
        sliders and choices. Yields ``(text, timings, neighbours, thumbnails, items, removed)``.
        """
        text_in, new_files = message_parts(message)
        conversation = normalise_history(history)
        removed = list(removed or [])
        all_files = unique([*conversation.files, *new_files])
        cache_options = to_cache_options(cache, cache_top_k, cache_temperature, cache_weight)
        generation = to_generation_options(max_new_tokens, temperature, top_p, seed)
        history_after = [*(history or []), {"role": "user", "content": [{"path": p} for p in new_files]}]

        def items() -> list[dict]:
            return collect_items(self.detect, history_after, [], removed, session_modalities)

        stop = threading.Event()
        try:
            attachments = self._plan(all_files, removed, session_weights, session_modalities, weights, modalities)
            if not text_in and not attachments:
                yield (f"{ERROR_MARK} Type a question or attach a file.", gr.skip(), gr.skip(), gr.skip(), items(),
                       removed)
                return
            yield "", gr.skip(), gr.skip(), gr.skip(), items(), removed
            last = ChatEvent()
            for event in self._stream_events(text_in, conversation.turns, attachments, cache_options, generation,
                                             stop):
                last = event
                if event.done:
                    break
                if event.delta:
                    yield event.text, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            thumbs = neighbour_thumbnails(last.neighbours)
            timings = timings_markdown(last, cache_options, self.engine.info.cache_entries)
            yield (last.text, timings, neighbour_rows(last.neighbours), gr.Gallery(thumbs, visible=bool(thumbs)),
                   gr.skip(), gr.skip())
        except RequestError as e:
            yield f"{ERROR_MARK} {e}", gr.skip(), gr.skip(), gr.skip(), items(), removed
        except MediaError as e:
            suspects = _suspects(e, new_files, all_files)
            removed = unique([*removed, *suspects])
            names = ", ".join(os.path.basename(p) for p in suspects)
            yield (f"{ERROR_MARK} {e}\n\n({names} left out of the conversation; attach another file to go on.)",
                   gr.skip(), gr.skip(), gr.skip(), items(), removed)
        except Exception as e:  # noqa: BLE001 - one bad request must not take the server down
            log.exception("chat failed")
            yield f"{ERROR_MARK} Something went wrong while answering: {type(e).__name__}: {e}", *[gr.skip()] * 5
        finally:
            # Stop, job.cancel() and a closed browser tab all end here: tell the engine to let go of the model.
            stop.set()

    def compare_without_cache(self, history: list[Any], session_weights: dict[str, float],
                              session_modalities: dict[str, str], removed: list[str], max_new_tokens: float,
                              temperature: float, top_p: float, seed: float) -> Iterator[str]:
        """Answer the last question again with the visual cache off, streamed into a side box."""
        conversation = normalise_history(history)
        if not conversation.turns:
            yield "Ask something first; this re-answers your last question with the cache off."
            return
        last = conversation.turns[-1]
        stop = threading.Event()
        try:
            attachments = self._plan(conversation.files, removed or [], session_weights, session_modalities)
            generation = to_generation_options(max_new_tokens, temperature, top_p, seed)
            for event in self._stream_events(last.user, conversation.turns[:-1], attachments,
                                             VisualCacheConfig(enabled=False), generation, stop):
                yield event.text + (f"\n\n({event.timings.summary()})" if event.done else "")
        except (MediaError, RequestError) as e:
            yield f"{ERROR_MARK} {e}"
        except Exception as e:  # noqa: BLE001 - as in respond: report, keep serving
            log.exception("cache-off comparison failed")
            yield f"{ERROR_MARK} Something went wrong while answering: {type(e).__name__}: {e}"
        finally:
            stop.set()

    def lookup_neighbours(self, history: list[Any], inputs: Any, session_weights: dict[str, float],
                          session_modalities: dict[str, str], removed: list[str], cache_top_k: float,
                          cache_temperature: float, cache_weight: float) -> tuple[Any, Any, str]:
        """The cache inspector: neighbours of the fused feature of the conversation's inputs plus ``inputs``
        (a multimodal textbox value), without generating."""
        _, new_files = message_parts(inputs)
        files = [*normalise_history(history).files, *new_files]
        try:
            attachments = self._plan(files, removed or [], session_weights, session_modalities)
        except (MediaError, RequestError) as e:
            return [], gr.Gallery([], visible=False), f"{ERROR_MARK} {e}"
        if not attachments:
            return [], gr.Gallery([], visible=False), "Attach an input first."
        options = to_cache_options(True, cache_top_k, cache_temperature, cache_weight)
        try:
            found = self.engine.neighbours(attachments, options)
        except Exception as e:  # noqa: BLE001 - MediaError included: the inspector reports, the server keeps serving
            log.exception("neighbour lookup failed")
            return [], gr.Gallery([], visible=False), f"{ERROR_MARK} {type(e).__name__}: {e}"
        thumbs = neighbour_thumbnails(found)
        note = f"{len(found)} neighbours of the fused input feature (top-{options.top_k})."
        return neighbour_rows(found), gr.Gallery(thumbs, visible=bool(thumbs)), note
