"""One answer of the API in flight: the engine's chat (and/or picture) on a thread of its own, its events handed to
the event loop, the text cut at the request's stop strings.

A thread per answer (not the server's thread pool): ``ChatEngine.chat`` blocks while it encodes files and while it
waits for tokens from the engine's scheduler, and an answer waiting in the engine's line must not hold one of the
pool's workers, which Gradio's own events need. Cancelling (a client gone) raises the chat's and the picture's
``should_stop``: the scheduler frees the answer's decode slot before its next step, the painter its pipeline. A stop
string met ends the text only: a picture asked for is still drawn after it.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ibllm.config import GenerationConfig, PictureConfig, VisualCacheConfig
from ibllm.engine import ChatEngine
from ibllm.types import Attachment, ChatEvent, PictureEvent, Turn

log = logging.getLogger(__name__)

_END = object()


@dataclass(frozen=True)
class ChatCall:
    """Everything ``ChatEngine.chat`` (and ``imagine``) is asked, and the folder holding the request's files
    (removed at the end). ``text``: answer in words; ``picture``: then draw the answer with these settings."""

    question: str
    history: Sequence[Turn]
    attachments: Sequence[Attachment]
    visual_cache: VisualCacheConfig
    generation: GenerationConfig
    stops: Sequence[str] = ()
    folder: Path | None = None
    text: bool = True
    picture: PictureConfig | None = None


class StopText:
    """The answer cut before the first of ``stops``. ``feed`` returns the text that may be sent now: the end of the
    text that could still become a stop string is held back until the next delta says."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.sent = 0  # characters of ``text`` already returned
        self.hit = False

    def feed(self, delta: str, *, last: bool = False) -> str:
        if self.hit:
            return ""
        self.text += delta
        start = max(0, self.sent - self.longest)
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if found:
            self.hit, end = True, min(found)
            self.text = self.text[:end]
        elif last:
            end = len(self.text)
        else:
            end = len(self.text) - self._held_back()
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest end of the text that is the beginning of a stop string."""
        for n in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0


@dataclass
class Answer:
    """What the caller gets out of a ``Completion``: the events' deltas (cut at a stop string), the last chat event
    and the last picture event (``done``: it holds the picture)."""

    text: str = ""
    last: ChatEvent = field(default_factory=ChatEvent)
    stopped_by_string: bool = False
    picture: PictureEvent | None = None


class Completion:
    """``engine.chat(call)`` then ``engine.imagine(call)`` (as the call asks) running on their own thread;
    ``next_delta`` gives the text as it comes.

    ``arrived`` is called once, from that thread, when the engine has the request in its own line (its first event:
    a place in line, a token or a picture step) or the answer ended without one."""

    def __init__(self, engine: ChatEngine, call: ChatCall, arrived: Callable[[], None] | None = None):
        self.engine, self.call = engine, call
        self.stop = threading.Event()  # the whole answer (a client gone)
        self._text_stop = threading.Event()  # the text only (a stop string met)
        self._arrived = arrived or (lambda: None)
        self.answer = Answer()
        self._cut = StopText(call.stops)
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[object] = asyncio.Queue()
        self._done = False
        threading.Thread(target=self._produce, name="ibllm-api-answer", daemon=True).start()

    def _put(self, item: object) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            self.stop.set()

    def _produce(self) -> None:
        call = self.call
        try:
            if call.text:
                for event in self.engine.chat(call.question, history=call.history, attachments=call.attachments,
                                              visual_cache=call.visual_cache, generation=call.generation,
                                              should_stop=lambda: self.stop.is_set() or self._text_stop.is_set()):
                    self._arrived()
                    self._put(event)
            if call.picture is not None and not self.stop.is_set():
                # After the text: its generator has ended, so its decode slot is free before the picture starts.
                for picture in self.engine.imagine(call.question, attachments=call.attachments,
                                                   visual_cache=call.visual_cache, picture=call.picture,
                                                   should_stop=self.stop.is_set):
                    self._arrived()
                    self._put(picture)
            self._put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the request's coroutine, which answers with it
            self._put(exc)
        finally:
            self._arrived()
            if call.folder is not None:
                shutil.rmtree(call.folder, ignore_errors=True)

    async def next_delta(self) -> str | None:
        """The next piece of answer text ("" for a notice without text: a place in the engine's line, a picture's
        progress or the picture itself, in ``answer.picture``), or None once the answer is complete. Raises what the
        chat raised (a MediaError for an unusable file)."""
        if self._done:
            return None
        item = await self._events.get()
        if item is _END:
            self._done = True
            return None
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if isinstance(item, PictureEvent):
            self.answer.picture = item
            return ""
        assert isinstance(item, ChatEvent)
        self.answer.last = item
        text = self._cut.feed(item.delta, last=item.done)
        if self._cut.hit and not self.answer.stopped_by_string:
            self.answer.stopped_by_string = True
            self._text_stop.set()  # the rest of the text is not wanted: free the decode slot now
        self.answer.text += text
        return text

    @property
    def queue_position(self) -> int:
        return self.answer.last.queue_position

    def cancel(self) -> None:
        self.stop.set()
