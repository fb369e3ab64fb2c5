"""The app as an API: launched on 127.0.0.1 in-process and driven with ``gradio_client``, as a user's script would.

The engine is the real default model (``ibllm.create_engine()``), loaded once for the module and wrapped in a
spy that records what the UI asked of it and can slow it down (so a stop can land mid-answer).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ibllm.kinds import MEDIA_KINDS
from tests.app_helpers import ERROR_MARK, TOY, SpyEngine, example_for, launch, load_engine

pytestmark = pytest.mark.slow


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
