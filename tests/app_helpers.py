"""Helpers shared by the app's tests: engines that record what the UI asked, and the running app for API/browser tests.

- ``FakeEngine``: stands in for ``ChatEngine`` in handler tests (no model: fixed answers, real file detection).
- ``SpyEngine``: wraps the real default model, records each chat call and can slow it down (so a stop can land
  mid-answer); ``launch`` serves the app around it on a free port of 127.0.0.1.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from ibllm.types import Attachment, ChatEvent, ModelInfo, Neighbour, Timings
from tests.conftest import REPO

TOY = REPO / "examples" / "toy"
ERROR_MARK = "⚠️"


class FakeEngine:
    """The engine interface the UI uses, without a model: detection is the media package's, every answer is
    ``answer`` streamed word by word, and each call is recorded (``calls``, ``neighbour_calls``)."""

    def __init__(self, answer: str = "a red cube", cache_entries: int = 0) -> None:
        self.answer = answer
        self.info = ModelInfo(name="fake", weights="none", device="cpu", dtype="float32", is_default=True,
                              trained=True, cache_entries=cache_entries)
        self.calls: list[dict[str, Any]] = []
        self.neighbour_calls: list[tuple[list[Attachment], Any]] = []

    def detect(self, path: str) -> str:
        from ibllm.media import detect_modality

        return detect_modality(path)

    def chat(self, message: str, *, history: Sequence[Any] = (), attachments: Sequence[Attachment] = (),
             visual_cache: Any = None, generation: Any = None, should_stop: Any = None) -> Iterator[ChatEvent]:
        self.calls.append({"message": message, "history": list(history), "attachments": list(attachments),
                           "visual_cache": visual_cache, "generation": generation})
        text = ""
        for word in self.answer.split():
            text = f"{text} {word}".strip()
            yield ChatEvent(delta=word, text=text)
        yield ChatEvent(text=text, done=True, timings=Timings(new_tokens=len(self.answer.split())))

    def neighbours(self, attachments: Sequence[Attachment], cache: Any) -> list[Neighbour]:
        self.neighbour_calls.append((list(attachments), cache))
        return [Neighbour(index=3, similarity=0.5, caption="a cube")]


class SpyEngine:
    """Delegates to an engine; records each chat call, can pause ``delay`` s per event, notes when asked to stop."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.delay = 0.0
        self.calls: list[dict[str, Any]] = []
        self.stopped = threading.Event()  # set when a chat call ended with its stop flag raised
        self.active = 0
        self.max_active = 0  # the most chat calls ever running at once (the model serves one at a time)
        self._lock = threading.Lock()

    @property
    def info(self) -> Any:
        return self.engine.info

    @property
    def cfg(self) -> Any:  # the UI's controls start at the model's own settings
        return self.engine.cfg

    def detect(self, path: str) -> str:
        return self.engine.detect(path)

    def neighbours(self, attachments: Any, cache: Any) -> Any:
        return self.engine.neighbours(attachments, cache)

    def picture_status(self) -> Any:
        return self.engine.picture_status()

    def imagine(self, message: str, **kwargs: Any) -> Iterator[Any]:
        return self.engine.imagine(message, **kwargs)

    def chat(self, message: str, *, should_stop: Any = None, **kwargs: Any) -> Iterator[Any]:
        call = {"message": message, "answer": "", **kwargs}
        self.calls.append(call)
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            for event in self.engine.chat(message, should_stop=should_stop, **kwargs):
                if self.delay:
                    time.sleep(self.delay)
                call["answer"] = event.text
                yield event
        finally:
            with self._lock:
                self.active -= 1
            if should_stop is not None and should_stop():
                self.stopped.set()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_engine() -> Any:
    from ibllm import create_engine

    return create_engine()


def launch(engine: Any, api: Any = None) -> tuple[Any, str]:
    """The app around ``engine`` on a free port of 127.0.0.1, as ``app.py`` serves it; with ``api`` (an
    ``ibllm.api.OpenAIApi``) its routes too. Returns (demo, url)."""
    from ibllm.ui import build_demo, launch_options

    demo = build_demo(engine)
    extra = {"app_kwargs": api.app_kwargs()} if api is not None else {}
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                            **launch_options(), **extra)
    return demo, url


def toy_examples() -> list[dict[str, Any]]:
    path = TOY / "gallery.json"
    if not path.is_file():
        pytest.skip(f"{path} is missing (examples/make_examples.py writes it)")
    return json.loads(path.read_text())["examples"]


def example_for(modalities: tuple[str, ...]) -> dict[str, Any]:
    """The first gallery example with exactly these inputs (the shipped model answers every one of them correctly:
    tests/test_default_model.py)."""
    for ex in toy_examples():
        if tuple(f["modality"] for f in ex["files"]) == modalities:
            return ex
    pytest.skip(f"no gallery example with exactly {modalities}")


def toy_file(modality: str) -> Path:
    """The file of the first single-input gallery example of ``modality``."""
    return TOY / example_for((modality,))["files"][0]["path"]


def run_turn(handler: Any, history: list[Any], session: Any, text: str, *files: str | Path, weights: str = "",
             modalities: str = "", cache: Any = None, generation: Any = None) -> tuple[str, Any, list[Any]]:
    """One chat turn as ``gr.ChatInterface`` runs it: ``handler.respond`` to the end, then the history with the
    message (one entry per file, then the text) and the answer appended. Returns (answer, session, history)."""
    from ibllm.config import GenerationConfig, VisualCacheConfig
    from ibllm.ui.session import ChatSession

    message = {"text": text, "files": [str(f) for f in files]}
    answer, after = "", session
    for out in handler.respond(message, history, session, weights, modalities, cache=cache or VisualCacheConfig(),
                               generation=generation or GenerationConfig()):
        answer = out[0]
        if isinstance(out[4], ChatSession):  # gr.skip() where the session was not written
            after = out[4]
    asked = [{"role": "user", "content": [{"path": str(f)}]} for f in files]
    if text:
        asked.append({"role": "user", "content": text})
    return answer, after, [*history, *asked, {"role": "assistant", "content": answer}]


def wait_until(condition: Any, timeout: float = 30.0) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.005)
    return False
