"""The app as an API: launched on 127.0.0.1 in-process and driven with ``gradio_client``, as a user's script would.

The engine is the real default model (``ibllm.create_engine()``), loaded once for the module and wrapped in a
spy that records what the UI asked of it and can slow it down (so a stop can land mid-answer).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ibllm.kinds import MEDIA_KINDS
from tests.conftest import REPO

pytestmark = pytest.mark.slow

TOY = REPO / "examples" / "toy"
ERROR_MARK = "⚠️"


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
    def cfg(self) -> Any:
        return self.engine.cfg

    def detect(self, path: str) -> str:
        return self.engine.detect(path)

    def neighbours(self, attachments: Any, visual_cache: Any) -> Any:
        return self.engine.neighbours(attachments, visual_cache)

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


def launch(engine: Any) -> tuple[Any, str]:
    from ibllm.ui import build_demo, launch_options

    demo = build_demo(engine)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                            **launch_options())
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


@pytest.fixture(scope="module")
def spy() -> SpyEngine:
    return SpyEngine(load_engine())


@pytest.fixture(scope="module")
def server(spy: SpyEngine) -> Iterator[str]:
    demo, url = launch(spy)
    try:
        yield url
    finally:
        demo.close()


@pytest.fixture
def client(server: str) -> Any:
    from gradio_client import Client

    return Client(server, verbose=False)


def message(text: str, *paths: str | Path) -> dict[str, Any]:
    from gradio_client import handle_file

    return {"text": text, "files": [handle_file(str(p)) for p in paths]}


SHORT = 24  # max new tokens where the answer's length does not matter (an untrained model never stops early)


def ask(client: Any, msg: dict[str, Any], **kwargs: Any) -> str:
    """The whole answer to one message."""
    kwargs.setdefault("max_new_tokens", SHORT)
    return client.predict(msg, api_name="/chat", **kwargs)[0]


def stream(client: Any, msg: dict[str, Any], **kwargs: Any) -> list[str]:
    """The cumulative texts of one streamed answer, in order (the final one last)."""
    kwargs.setdefault("max_new_tokens", SHORT)
    job = client.submit(msg, api_name="/chat", **kwargs)
    texts = [out[0] for out in job]
    final = job.result()[0]
    if not texts or texts[-1] != final:
        texts.append(final)
    return texts


def test_chat_endpoint_is_documented(client):
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    params = [p["parameter_name"] for p in api["/chat"]["parameters"]]
    assert params[:3] == ["message", "weights", "modalities"]
    assert {"cache", "cache_top_k", "max_new_tokens", "temperature", "top_p", "seed"} <= set(params)
    assert all(p["parameter_has_default"] for p in api["/chat"]["parameters"])




@pytest.mark.parametrize("modality", MEDIA_KINDS)
def test_each_modality_streams_an_answer(client, spy, modality):
    ex = example_for((modality,))
    path = TOY / ex["files"][0]["path"]
    texts = stream(client, message(ex["question"], path), temperature=0)
    final = texts[-1]
    assert final and not final.startswith(ERROR_MARK), final
    partial = [t for t in texts if t]
    assert len(set(partial)) >= 2, f"not streamed: {texts}"
    assert all(final.startswith(t) for t in partial), "chunks must be cumulative"
    (att,) = spy.calls[-1]["attachments"]
    assert att.modality == modality
    if spy.info.trained:
        assert all(w.lower() in final.lower() for w in ex["expect"]), (ex["expect"], final)


def test_mix_with_weights(client, spy):
    ex = example_for(("image", "audio"))
    paths = [TOY / f["path"] for f in ex["files"]]
    texts = stream(client, message(ex["question"], *paths), weights='{"image": 1.0, "audio": 0.25}', temperature=0)
    assert texts[-1] and not texts[-1].startswith(ERROR_MARK)
    assert [(a.modality, a.weight) for a in spy.calls[-1]["attachments"]] == [("image", 1.0), ("audio", 0.25)]
    # later turns keep the files; weight 0 leaves an input out of the mix
    final = ask(client, message("And its colour?"), weights="[0, 1]")
    assert final and not final.startswith(ERROR_MARK)
    assert [(a.modality, a.weight) for a in spy.calls[-1]["attachments"]] == [("audio", 1.0)]
    assert len(spy.calls[-1]["history"]) == 1


def test_stop_mid_answer_frees_the_model(client, spy):
    ex = example_for(("image",))
    spy.stopped.clear()
    spy.delay = 0.3
    try:
        job = client.submit(message(ex["question"], TOY / ex["files"][0]["path"]), api_name="/chat",
                            max_new_tokens=64)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(out[0] for out in job.outputs()):
            time.sleep(0.05)
        assert any(out[0] for out in job.outputs()), "no text streamed before the deadline"
        job.cancel()
        assert spy.stopped.wait(10), "the engine was not told to stop"
    finally:
        spy.delay = 0.0
    # the model is free again: the next request is answered
    final = ask(client, message("What is it?"))
    assert final and not final.startswith(ERROR_MARK)


@pytest.mark.parametrize("name,content", [("broken.png", b"this is not a picture"), ("empty.wav", b""),
                                          ("model.pt", b"PK\x03\x04 pretend pickle")])
def test_malformed_file_is_reported_and_server_keeps_serving(client, tmp_path, name, content):
    bad = tmp_path / name
    bad.write_bytes(content)
    answer = ask(client, message("What is it?", bad))
    assert answer.startswith(ERROR_MARK) and name in answer, answer
    assert "Traceback" not in answer
    # the same session goes on: the bad file is out of the conversation
    ex = example_for(("image",))
    final = ask(client, message(ex["question"], TOY / ex["files"][0]["path"]))
    assert final and not final.startswith(ERROR_MARK), final


def test_malformed_api_weights_blame_no_file(client, spy):
    ex = example_for(("image",))
    answer = ask(client, message(ex["question"], TOY / ex["files"][0]["path"]), weights="{image: 1}")
    assert answer.startswith(ERROR_MARK) and "JSON" in answer, answer
    final = ask(client, message(ex["question"]))
    assert final and not final.startswith(ERROR_MARK), final
    assert [a.modality for a in spy.calls[-1]["attachments"]] == ["image"]  # the image is still in the chat


def test_sessions_are_isolated(server, spy):
    from gradio_client import Client

    image, audio = example_for(("image",)), example_for(("audio",))
    a, b = Client(server, verbose=False), Client(server, verbose=False)
    spy.max_active, spy.delay = 0, 0.05
    try:
        ja = a.submit(message("first question from a", TOY / image["files"][0]["path"]), api_name="/chat",
                      max_new_tokens=SHORT)
        jb = b.submit(message("first question from b", TOY / audio["files"][0]["path"]), api_name="/chat",
                      max_new_tokens=SHORT)
        ja.result(), jb.result()
    finally:
        spy.delay = 0.0
    assert spy.max_active == 1, "two answers ran on the one model at once"
    for c, own, other, modality in ((a, "from a", "from b", "image"), (b, "from b", "from a", "audio")):
        ask(c, message("second question"))
        call = spy.calls[-1]
        users = [t.user for t in call["history"]]
        assert len(users) == 1 and own in users[0] and other not in users[0]
        assert [att.modality for att in call["attachments"]] == [modality]


def test_cache_inspector_and_cache_off_comparison(client):
    ex = example_for(("audio",))
    ask(client, message(ex["question"], TOY / ex["files"][0]["path"]))
    rows, _, note = client.predict({"text": "", "files": []}, api_name="/neighbours")
    assert isinstance(rows["data"], list) and note
    answer = client.predict(max_new_tokens=SHORT, api_name="/compare_without_cache")
    assert answer and not answer.startswith(ERROR_MARK)
