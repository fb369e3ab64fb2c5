"""The chat function behind the UI and the ``/chat`` API: Gradio values in, streamed cumulative text out."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import gradio as gr

from ibllm.config import GenerationConfig, PictureConfig, VisualCacheConfig
from ibllm.engine import ChatEngine
from ibllm.imagine import PictureError
from ibllm.media.errors import MediaError
from ibllm.types import Attachment, ChatEvent, Neighbour, PictureEvent, Turn
from ibllm.ui.history import ERROR_MARK, PICTURE_MARK, message_parts, normalise_history
from ibllm.ui.inputs import Detector, RequestError, plan_attachments
from ibllm.ui.session import ChatSession
from ibllm.ui.settings import TEXT_ONLY, AnswerForm
from ibllm.ui.zerogpu import gpu

log = logging.getLogger(__name__)

NEIGHBOUR_HEADERS = ["rank", "entry", "similarity", "caption"]
# The answer's text goes to the page at most this often (the engine gathers the tokens made in between): every
# update costs Gradio's event loop Python time, which the decode thread then waits for (the GIL).
STREAM_INTERVAL_S = 0.05


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


def picture_progress(event: PictureEvent) -> str:
    """The placeholder message while a picture is being drawn: place in line, loading, or step and time left."""
    if event.queue_position:
        ahead = event.queue_position
        return f"{PICTURE_MARK} waiting for the picture pipeline ({ahead} picture{'s' if ahead != 1 else ''} ahead)"
    if event.loading:
        return f"{PICTURE_MARK} loading the unCLIP pipeline (the first picture loads it: seconds on a GPU, minutes " \
            "on a CPU)"
    per_step = event.timings.seconds_per_step
    if not event.step or not per_step:
        return f"{PICTURE_MARK} drawing the picture ({event.steps} steps)…"
    left = per_step * (event.steps - event.step)
    return (f"{PICTURE_MARK} drawing the picture: step {event.step}/{event.steps} · {per_step:.2f} s/step · "
            f"about {left:.0f} s left")


def picture_markdown(event: PictureEvent, device: str) -> str:
    return f"**Picture** · seed {event.seed} · {event.timings.summary()} on `{device}`"


def _skips(n: int) -> list[Any]:
    """``n`` outputs left as they are (a fresh update each: Gradio edits update dicts in place)."""
    return [gr.skip() for _ in range(n)]


def _suspects(error: MediaError, new_files: Sequence[str], all_files: Sequence[str]) -> list[str]:
    """The files a MediaError is about: those it names, else the ones new in this turn (earlier ones worked)."""
    text = str(error)
    named = [p for p in all_files if os.path.basename(p) in text]
    return named or list(new_files) or list(all_files)


def _after_media_error(session: ChatSession, suspects: Sequence[str]) -> tuple[ChatSession, str]:
    """The session after ``suspects`` failed to load, and what the chat says about it. A file read as another kind
    than the detected one goes back to the detected kind (the choice failed, not the file: a CSV of xyz rows offered
    as an IMU recording has no 6 channels); the others are left out of the conversation."""
    chosen = [i for p in suspects if (i := session.input(p)) is not None and i.modality != i.kind]
    for item in chosen:
        session = session.with_read_as(item.path, item.kind)
    dropped = [p for p in suspects if p not in {i.path for i in chosen}]
    session = session.without(dropped)
    said = [f"{i.name} is read as {i.kind} again (cannot be read as {i.modality}); ask again to use it"
            for i in chosen]
    if dropped:
        names = ", ".join(os.path.basename(p) for p in dropped)
        said.append(f"{names} left out of the conversation; attach another file to go on")
    return session, "; ".join(said) + "."


class ChatHandler:
    """Turns one chat request into engine calls; holds no conversation state (that is the ``ChatSession``).

    Each handler takes Gradio's values (message, chat history, session) and the engine's settings objects by keyword;
    ``settings.Controls.bind`` makes the function Gradio calls from the page's controls."""

    def __init__(self, engine: ChatEngine) -> None:
        self.engine = engine
        self.detect = Detector(engine)
        # ZeroGPU attaches a GPU only while these run; elsewhere ``gpu`` returns the function unchanged.
        self._stream_events = gpu(self._stream_events)
        self._stream_picture = gpu(self._stream_picture)
        self._pictures: str | None = None  # the folder pictures are written to (Gradio serves them from its cache)

    def _stream_picture(self, message: str, attachments: list[Attachment], cache: VisualCacheConfig,
                        picture: PictureConfig, stop: threading.Event) -> Iterator[PictureEvent]:
        events = self.engine.imagine(message, attachments=attachments, visual_cache=cache, picture=picture,
                                     should_stop=stop.is_set)
        try:
            for event in events:  # noqa: UP028 - a plain loop, as in _stream_events
                yield event
        finally:
            stop.set()
            events.close()

    def _save_picture(self, image: Any) -> str:
        if self._pictures is None:
            self._pictures = tempfile.mkdtemp(prefix="ibllm-pictures-")
        path = os.path.join(self._pictures, f"{uuid.uuid4().hex}.png")
        image.save(path)
        return path

    def pictures(self, message: str, attachments: list[Attachment], cache: VisualCacheConfig, picture: PictureConfig,
                 stop: threading.Event) -> Iterator[tuple[Any, str, str | None]]:
        """The picture answer as ``(chat message, timings line, file)``: progress texts, then the picture (a
        message holding its PNG file), or a message saying why there is none (the text answer is not affected)."""
        try:
            for event in self._stream_picture(message, attachments, cache, picture, stop):
                if event.done:
                    path = self._save_picture(event.image)
                    # A message of its own holding the file: the chat shows it as a picture, the API's JSON names it.
                    yield {"text": "", "files": [path]}, picture_markdown(event, self.engine.info.device), path
                    return
                yield picture_progress(event), "", None
        except (PictureError, MediaError, RequestError, ValueError) as e:
            yield f"{ERROR_MARK} No picture: {e}", "", None
        except Exception as e:  # noqa: BLE001 - as in respond: report, keep serving
            log.exception("picture failed")
            yield f"{ERROR_MARK} No picture: {type(e).__name__}: {e}", "", None

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

    def follow(self, session: ChatSession, history: Sequence[Any] | None, pending: Sequence[str] = ()) -> ChatSession:
        """``session`` brought up to date with the chat's messages (which undo, retry and edit change) and the files
        waiting in the textbox."""
        return session.follow(normalise_history(history), pending, self.detect)

    def respond(self, message: Any, history: list[Any], session: ChatSession, weights: str = "",
                modalities: str = "", *, cache: VisualCacheConfig, generation: GenerationConfig,
                picture: AnswerForm = TEXT_ONLY) -> Iterator[tuple[Any, ...]]:
        """Stream the answer to ``message`` as cumulative text, with timings, neighbours and the session.

        ``picture`` says whether the answer is text, a picture drawn from the inputs, or both: a picture comes as a
        chat message of its own after the text (progress messages stand in for it while it is drawn).

        ``history`` is the chat before this message; every file attached in it (and not removed) is part of this
        turn's input, read and weighed as ``session`` says. ``weights`` / ``modalities`` (JSON, for API callers)
        override the panel's sliders and choices for this turn. Yields ``(text, timings, neighbours, thumbnails,
        session, panel layout, picture file)``; the session is written before the answer streams (and again only
        when a file failed), so a slider moved while the answer streams keeps its value.
        """
        text_in, new_files = message_parts(message)
        asked = {"role": "user", "content": [{"path": p} for p in new_files]}
        stop = threading.Event()
        drawing = threading.Event()  # the picture's own stop flag: the text answer's is raised when it ends
        try:
            session = self.follow(session, [*(history or []), asked])
            attachments = plan_attachments(session.sent, weights, modalities)
            if not text_in and not new_files:  # Enter in an empty textbox: nothing was asked (files stay)
                yield (f"{ERROR_MARK} Type a question" + ("." if attachments else " or attach a file."),
                       *_skips(3), session, session.layout(), None)
                return
            # The side panels are cleared for the new answer rather than skipped (see below: a skip costs more).
            yield "", "", [], [], session, session.layout(), None
            last = ChatEvent()
            rows = thumbs = None
            shown = 0.0  # when the text was last sent (time.monotonic)
            events = self._stream_events(text_in, list(session.history), attachments, cache, generation, stop) \
                if picture.text else iter(())
            for event in events:
                last = event
                if event.done:
                    break
                if rows is None:  # the neighbours are known before the first token
                    rows, thumbs = neighbour_rows(event.neighbours), neighbour_thumbnails(event.neighbours)
                # While the answer streams the side panels get plain values (this answer's timings so far, its
                # neighbours), not gr.skip(): Gradio rebuilds a skipped Dataframe or Gallery and its JSON schema
                # on every update (~20 ms of the event loop holding the GIL, measured), which starved the decode
                # thread: the app decoded ~10x slower than the engine alone.
                # The picture output gets None (it is empty until a picture is drawn), not gr.skip(): a skip is a
                # prop update, for which Gradio rebuilds the Image component and its JSON schema on every event.
                side = timings_markdown(event, cache, self.engine.info.cache_entries), rows, thumbs, *_skips(2), None
                if event.delta:
                    if time.monotonic() - shown >= STREAM_INTERVAL_S:
                        shown = time.monotonic()
                        yield event.text, *side
                elif event.queue_position and not event.text:  # waiting for a decode slot
                    ahead = event.queue_position - 1
                    yield f"⏳ waiting for a free slot ({ahead} request{'s' if ahead != 1 else ''} ahead)", *side
            thumbs = neighbour_thumbnails(last.neighbours)
            timings = timings_markdown(last, cache, self.engine.info.cache_entries) if picture.text else ""
            if picture.picture is None:
                yield (last.text, timings, neighbour_rows(last.neighbours), thumbs,
                       *_skips(2), None)
                return
            text = [last.text] if picture.text else []
            close = getattr(events, "close", None)
            if close is not None:  # the text answer is complete: its decode slot is free before the picture starts
                close()
            yield ([*text, f"{PICTURE_MARK} …"], timings, neighbour_rows(last.neighbours),
                   thumbs, *_skips(2), None)
            for picture_message, line, path in self.pictures(text_in, attachments, cache, picture.picture, drawing):
                yield [*text, picture_message], "  \n".join(t for t in (timings, line) if t) if line else gr.skip(), \
                    *_skips(4), path or gr.skip()
        except RequestError as e:
            yield f"{ERROR_MARK} {e}", *_skips(3), session, session.layout(), gr.skip()
        except MediaError as e:
            session, said = _after_media_error(session, _suspects(e, new_files, [i.path for i in session.inputs]))
            yield f"{ERROR_MARK} {e}\n\n({said})", *_skips(3), session, session.layout(), gr.skip()
        except Exception as e:  # noqa: BLE001 - one bad request must not take the server down
            log.exception("chat failed")
            yield f"{ERROR_MARK} Something went wrong while answering: {type(e).__name__}: {e}", *_skips(6)
        finally:
            # Stop, job.cancel() and a closed browser tab all end here: tell the engine to let go of the model.
            stop.set()
            drawing.set()

    def compare_without_cache(self, history: list[Any], session: ChatSession, *, generation: GenerationConfig
                              ) -> Iterator[str]:
        """Answer the last question again with the visual cache off, streamed into a side box."""
        session = self.follow(session, history)
        if not session.history:
            yield "Ask something first; this re-answers your last question with the cache off."
            return
        last = session.history[-1]
        stop = threading.Event()
        try:
            attachments = plan_attachments(session.sent)
            for event in self._stream_events(last.user, list(session.history[:-1]), attachments,
                                             VisualCacheConfig(enabled=False), generation, stop):
                yield event.text + (f"\n\n({event.timings.summary()})" if event.done else "")
        except (MediaError, RequestError) as e:
            yield f"{ERROR_MARK} {e}"
        except Exception as e:  # noqa: BLE001 - as in respond: report, keep serving
            log.exception("cache-off comparison failed")
            yield f"{ERROR_MARK} Something went wrong while answering: {type(e).__name__}: {e}"
        finally:
            stop.set()

    def lookup_neighbours(self, history: list[Any], inputs: Any, session: ChatSession, *, cache: VisualCacheConfig
                          ) -> tuple[Any, Any, str]:
        """The cache inspector: neighbours of the fused feature of the conversation's inputs plus ``inputs``
        (a multimodal textbox value), without generating."""
        session = self.follow(session, history, message_parts(inputs)[1])
        try:
            attachments = plan_attachments(session.inputs)
        except (MediaError, RequestError) as e:
            return [], [], f"{ERROR_MARK} {e}"
        if not attachments:
            return [], [], "Attach an input first."
        try:
            found = self.engine.neighbours(attachments, cache)
        except Exception as e:  # noqa: BLE001 - MediaError included: the inspector reports, the server keeps serving
            log.exception("neighbour lookup failed")
            return [], [], f"{ERROR_MARK} {type(e).__name__}: {e}"
        thumbs = neighbour_thumbnails(found)
        note = f"{len(found)} neighbours of the fused input feature (top-{cache.top_k})."
        return neighbour_rows(found), thumbs, note
