"""The OpenAI-compatible API on the app's own server, driven with the official ``openai`` client on loopback.

The engine is the real default model with one decode slot (so "the slot is freed" can be seen: a second request is
only answered once the first lets go), served by Gradio exactly as ``app.py`` serves it. Answers are compared with
the engine's own, asked the same thing directly (greedy, so they must be equal).
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from ibllm.config import GenerationConfig, VisualCacheConfig
from ibllm.types import Attachment, Turn
from tests.app_helpers import TOY, launch, wait_until

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai", reason="the openai client is in requirements-test.txt")

POINT = TOY / "pyramid_point.ply"
IMAGE = TOY / "red_cube_image.png"
SOUND = TOY / "bell_torus_audio.wav"
GREEDY = GenerationConfig(max_new_tokens=48, temperature=0.0)


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    from ibllm import create_engine

    engine = create_engine(max_batch=1)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def api(engine: Any) -> Any:
    from ibllm.api import ApiSettings, OpenAIApi

    return OpenAIApi(engine, ApiSettings())


@pytest.fixture(scope="module")
def url(engine: Any, api: Any) -> Iterator[str]:
    demo, url = launch(engine, api)
    try:
        yield url.rstrip("/")
    finally:
        demo.close()


@pytest.fixture
def settings(api: Any) -> Iterator[Any]:
    """Lets a test change the API's settings; puts them back after."""
    before = api.settings
    yield api
    api.settings = before


@pytest.fixture
def client(url: str) -> Any:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def file_part(path: Path, name: str | None = None) -> dict[str, Any]:
    return {"type": "file", "file": {"file_data": f"data:application/octet-stream;base64,{b64(path)}",
                                     "filename": name or path.name}}


def image_part(path: Path = IMAGE) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(path)}"}}


def user(*parts: Any) -> dict[str, Any]:
    return {"role": "user", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}


def ask(client: Any, model: str, *messages: dict[str, Any], **kwargs: Any) -> Any:
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=list(messages), **kwargs)


@contextmanager
def slow_decode(engine: Any, seconds: float) -> Iterator[list[int]]:
    """Every call of the language model (prefill or step) takes ``seconds`` longer; yields the list of the batch
    widths of those calls, as they happen."""
    calls: list[int] = []

    def hook(module: Any, args: tuple[Any, ...]) -> None:
        calls.append(int(args[0].shape[0]))
        time.sleep(seconds)

    handle = engine.net.llama.register_forward_pre_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()




def test_models_lists_the_served_model(client, api):
    assert [m.id for m in client.models.list()] == [api.model] == ["toy"]
    assert client.models.retrieve(api.model).owned_by == "ibllm"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_a_point_cloud_file_is_answered_as_the_engine_answers_it(client, api, engine):
    reply = ask(client, api.model, user(file_part(POINT), "What shape is it?"), max_tokens=48)
    expected = engine.answer("What shape is it?", attachments=[Attachment(str(POINT), "point")], generation=GREEDY)
    answer = reply.choices[0].message.content
    assert answer == expected and "pyramid" in answer
    assert reply.choices[0].finish_reason == "stop"
    assert reply.model == api.model and reply.object == "chat.completion"
    usage = reply.usage
    assert usage.completion_tokens == len(engine.tokenizer.encode(answer, bos=False, eos=False))
    assert usage.prompt_tokens > usage.completion_tokens and usage.total_tokens == usage.prompt_tokens + \
        usage.completion_tokens


def test_an_image_streams_in_openai_chunks(client, api, engine):
    chunks = list(ask(client, api.model, user(image_part(), "What colour is it?"), stream=True,
                      stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) >= 2  # streamed, not one block
    assert text == engine.answer("What colour is it?", attachments=[Attachment(str(IMAGE), "image")],
                                 generation=GREEDY)
    assert "red" in text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens >= 2
    assert len({c.id for c in chunks}) == 1


def test_the_stream_is_server_sent_events_ending_with_done(url, api):
    import httpx

    body = {"model": api.model, "stream": True, "messages": [user("What shape is it?", file_part(POINT))]}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)
    assert "pyramid" in "".join(p["choices"][0]["delta"].get("content", "") for p in payloads)


def test_a_sound_as_input_audio(client, api, engine):
    audio = {"type": "input_audio", "input_audio": {"data": b64(SOUND), "format": "wav"}}
    answer = ask(client, api.model, user(audio, "What shape is it?")).choices[0].message.content
    assert answer == engine.answer("What shape is it?", attachments=[Attachment(str(SOUND), "audio")],
                                   generation=GREEDY)
    assert "torus" in answer


def test_a_follow_up_with_the_whole_conversation_keeps_the_earlier_file(client, api, engine):
    first = user(image_part(), "What colour is it?")
    answer = ask(client, api.model, first).choices[0].message.content
    follow_up = ask(client, api.model, first, {"role": "assistant", "content": answer}, user("Describe it."))
    expected = engine.answer("Describe it.", history=[Turn("What colour is it?", answer)],
                             attachments=[Attachment(str(IMAGE), "image")], generation=GREEDY)
    without_file = engine.answer("Describe it.", history=[Turn("What colour is it?", answer)],
                                 generation=GREEDY)
    assert follow_up.choices[0].message.content == expected != without_file
    assert "red" in expected  # the red cube's picture is still an input of the conversation


def test_a_broken_file_is_a_400_with_the_loaders_message_and_the_server_still_answers(client, api):
    broken = {"type": "file", "file": {"file_data": base64.b64encode(b"ply\nformat ascii 1.0\nelement vertex 9\n"
                                                                     b"end_header\n1 2\n").decode(),
                                       "filename": "broken.ply"}}
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, api.model, user(broken, "What shape is it?"))
    assert e.value.status_code == 400
    assert "broken.ply" in e.value.message
    assert e.value.body["type"] == "invalid_request_error"
    assert "pyramid" in ask(client, api.model, user(file_part(POINT), "What shape is it?")).choices[0].message.content


def test_a_web_url_is_refused_and_an_unknown_model_is_404(client, api):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, api.model, user({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, "?"))
    assert "data URL" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        ask(client, "gpt-4o", user("What shape is it?"))
    assert "toy" in e.value.message and e.value.code == "model_not_found"


def test_an_unknown_url_or_method_is_an_openai_error_naming_what_is_served(client, url):
    import httpx

    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="toy", prompt="hello")  # the legacy API, not served
    assert "/v1/completions" in e.value.message and "POST /v1/chat/completions" in e.value.message
    response = httpx.get(f"{url}/v1/chat/completions", timeout=30)
    assert response.status_code == 405 and "takes POST" in response.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/models", timeout=30).json()["object"] == "list"  # the real routes still answer


def test_the_model_tabs_api_examples_run_against_this_server(url, api, engine, tmp_path, monkeypatch):
    """Both snippets of the Model tab, as the page shows them for this server, run unchanged on a photo."""
    import re
    import shutil

    from ibllm.ui.blocks import api_help

    shutil.copy(IMAGE, tmp_path / "photo.png")
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", api_help(engine.info, f"{url}/"), re.S)
    assert len(blocks) == 2
    want = engine.answer("What is in this picture?", attachments=[Attachment(str(IMAGE), "image")],
                         generation=replace(engine.cfg.generation, temperature=0.0))
    for code in blocks:
        scope: dict[str, Any] = {}
        exec(code.replace("print(", "shown = str(", 1), scope)  # noqa: S102 - the page's own example
        answer = scope.get("answer") or scope.get("shown")
        assert isinstance(answer, str) and answer.strip()
        assert answer.split()[0] == want.split()[0], (answer, want)


def test_too_large_is_413(client, settings, url):
    import httpx

    settings.settings = replace(settings.settings, max_file_bytes=IMAGE.stat().st_size - 1)
    with pytest.raises(openai.APIStatusError) as e:
        ask(client, settings.model, user(image_part(), "What colour is it?"))
    assert e.value.status_code == 413 and "at most" in e.value.message
    settings.settings = replace(settings.settings, max_request_bytes=1000)
    response = httpx.post(f"{url}/v1/chat/completions", content=b"x" * 5000, timeout=30)
    assert response.status_code == 413 and response.json()["error"]["message"].startswith("the request is")


def test_max_tokens_stop_seed_and_temperature_are_honoured(client, api):
    point = user(file_part(POINT), "What shape is it?")
    short = ask(client, api.model, point, max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    cut = ask(client, api.model, point, stop=["pyramid", "zzz"])
    assert cut.choices[0].message.content == "It is a " and cut.choices[0].finish_reason == "stop"
    streamed = ask(client, api.model, point, stop="pyramid", stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "It is a "
    sampled = [ask(client, api.model, point, temperature=2.0, top_p=1.0, seed=s, max_tokens=12).choices[0]
               .message.content for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]
    for wrong, says in (({"top_p": 5}, "top_p"), ({"max_tokens": 0}, "max_tokens"), ({"n": 2}, "n must be 1"),
                        ({"temperature": 3}, "temperature")):
        with pytest.raises(openai.BadRequestError) as e:
            ask(client, api.model, point, **wrong)
        assert says in e.value.message


def test_the_extension_field_sets_weights_modalities_and_the_visual_cache(client, api, engine):
    torus_point, torus_text = TOY / "yellow_torus_point.ply", TOY / "yellow_torus_text.txt"
    both = user(file_part(torus_point), file_part(torus_text), "What colour is it?")
    weighed = ask(client, api.model, both, extra_body={"ibllm": {
        "weights": {"yellow_torus_text.txt": 0.25}, "visual_cache": {"enabled": False}}})
    assert weighed.choices[0].message.content == engine.answer(
        "What colour is it?", attachments=[Attachment(str(torus_point), "point"),
                                           Attachment(str(torus_text), "text", 0.25)],
        visual_cache=VisualCacheConfig(enabled=False), generation=GREEDY)
    assert weighed.ibllm["neighbours"] == []  # the cache was off
    cached = ask(client, api.model, both, extra_body={"ibllm": {"visual_cache": {"top_k": 3}}})
    assert len(cached.ibllm["neighbours"]) == 3
    depth = TOY / "blue_cube_depth.png"
    as_image = ask(client, api.model, user(file_part(depth), "What shape is it?"),
                   extra_body={"ibllm": {"modalities": ["image"]}})
    assert as_image.choices[0].message.content == engine.answer(
        "What shape is it?", attachments=[Attachment(str(depth), "image")], generation=GREEDY)
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, api.model, both, extra_body={"ibllm": {"modalities": ["depth"]}})
    assert "cannot be read as depth" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, api.model, both, extra_body={"ibllm": {"visual_cache": {"top_k": "many"}}})
    assert "top_k" in e.value.message


@contextmanager
def no_eos(engine: Any) -> Iterator[None]:
    """The language model never picks eos (its logit is -inf): an answer runs to max_tokens, so a cancellation has
    something left to cut short (the trained toy model ends its answers within a few tokens)."""
    eos = engine.tokenizer.eos_id

    def hook(module: Any, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[..., eos] = float("-inf")
        return out

    handle = engine.net.llama.output.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _long_request(client: Any, model: str, **kwargs: Any) -> Any:
    # With no_eos, sampled at temperature 2: all 100 tokens (checked below).
    return ask(client, model, user(file_part(POINT), "What is it?"), temperature=2.0, top_p=1.0, seed=0,
               max_tokens=100, **kwargs)


def test_cancelling_a_stream_frees_the_decode_slot(client, api, engine):
    assert engine.scheduler.slots == 1
    with no_eos(engine):
        full = _long_request(client, api.model)
    assert full.choices[0].finish_reason == "length"  # left alone, it would decode 100 tokens
    with slow_decode(engine, 0.05) as calls, no_eos(engine):
        stream = _long_request(client, api.model, stream=True)
        received = next(c for c in stream if c.choices and c.choices[0].delta.content)
        stream.close()
        at_close = len(calls)
        assert wait_until(lambda: engine.scheduler.batch.live == 0, timeout=10)
        after_cancel = len(calls) - at_close
        answer = ask(client, api.model, user(file_part(POINT), "What shape is it?")).choices[0].message.content
    assert received.choices[0].delta.content
    assert "pyramid" in answer
    assert after_cancel <= 5, f"the cancelled answer went on for {after_cancel} more steps (of ~{100 - at_close})"


def test_a_client_that_leaves_before_a_whole_answer_frees_the_slot(url, api, engine):
    import httpx

    body = {"model": api.model, "messages": [user(file_part(POINT), "What is it?")], "temperature": 2.0,
            "top_p": 1.0, "seed": 0, "max_tokens": 100}  # 100 tokens when left alone (the test above)
    with slow_decode(engine, 0.05) as calls, no_eos(engine):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=1.0))
        at_leaving = len(calls)
        assert wait_until(lambda: engine.scheduler.batch.live == 0, timeout=10)
        after = len(calls) - at_leaving
    assert at_leaving < 50 and after <= 5, f"{after} more steps after the client left (at step {at_leaving})"


@contextmanager
def held_encoder(engine: Any) -> Iterator[tuple[threading.Event, list[int]]]:
    """Every encoder call waits until the yielded event is set (or 30 s); the list counts the calls that began."""
    release, began = threading.Event(), []

    def hook(module: Any, args: tuple[Any, ...]) -> None:
        began.append(1)
        release.wait(30)

    handle = engine.net.image_bind.register_forward_pre_hook(hook)
    try:
        yield release, began
    finally:
        release.set()
        handle.remove()


def fresh_text(tmp_path: Path, words: str = "a red cube") -> Path:
    """A text file no earlier request sent (its embedding is not in the engine's memo, so it is encoded)."""
    path = tmp_path / f"note-{uuid.uuid4().hex[:8]}.txt"
    path.write_text(f"{words} {uuid.uuid4().hex}")
    return path


def answer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ibllm-api-answer"]


def test_a_stream_closed_before_its_first_chunk_stops_its_answer(url, api, engine, tmp_path):
    import httpx

    body = {"model": api.model, "stream": True, "messages": [user(file_part(fresh_text(tmp_path)), "What is it?")],
            "temperature": 2.0, "top_p": 1.0, "seed": 0, "max_tokens": 100}  # 100 tokens when left alone
    with held_encoder(engine) as (release, began), slow_decode(engine, 0.05) as calls, no_eos(engine):
        # No chunk, not even the headers: its file is still being encoded when the client gives up and closes.
        with pytest.raises(httpx.ReadTimeout), httpx.stream("POST", f"{url}/v1/chat/completions", json=body,
                                                            timeout=httpx.Timeout(30, read=1.0)):
            pass
        assert began, "the request never reached the encoder"
        left_behind = answer_threads()
        assert left_behind, "the answer was not running when the client left"
        release.set()  # the encoding ends after the client has gone
        assert wait_until(lambda: not any(t.is_alive() for t in left_behind), timeout=30)
    assert len(calls) <= 5, f"the abandoned answer made {len(calls)} model calls"
    assert engine.scheduler.batch.live == 0 and engine.scheduler.waiting == 0


def test_requests_still_encoding_their_files_count_toward_the_429_line(client, settings, engine, tmp_path):
    settings.settings = replace(settings.settings, max_queue=0)  # nobody may wait: one answer for the one slot
    answers: list[Any] = []
    with held_encoder(engine) as (release, began):
        first = threading.Thread(target=lambda: answers.append(ask(
            client, settings.model, user(file_part(fresh_text(tmp_path)), "What colour is it?"))))
        first.start()
        assert wait_until(lambda: bool(began), timeout=30), "the first request never reached the encoder"
        for _ in range(3):  # a burst: each would take the slot the first one is about to take
            with pytest.raises(openai.RateLimitError) as e:
                ask(client, settings.model, user(file_part(fresh_text(tmp_path)), "What colour is it?"),
                    timeout=10)
            assert "busy" in e.value.message
        release.set()
        first.join(timeout=60)
    assert answers and answers[0].choices[0].message.content
    assert ask(client, settings.model, user(file_part(POINT), "What shape is it?")).choices[0].message.content


def test_a_full_line_is_429_and_the_line_frees_up(client, settings, engine):
    settings.settings = replace(settings.settings, max_queue=0)
    with slow_decode(engine, 0.05):
        stream = _long_request(client, settings.model, stream=True)
        next(c for c in stream if c.choices and c.choices[0].delta.content)  # it holds the only slot
        with pytest.raises(openai.RateLimitError) as e:
            ask(client, settings.model, user("What shape is it?"))
        assert "busy" in e.value.message
        stream.close()
        assert wait_until(lambda: engine.scheduler.batch.live == 0, timeout=10)
    assert ask(client, settings.model, user(file_part(POINT), "What shape is it?")).choices[0].message.content


def test_a_stream_waiting_for_the_slot_says_where_it_is_in_line_then_answers(client, url, api, engine):
    import httpx

    body = {"model": api.model, "stream": True, "temperature": 0,
            "messages": [user(file_part(POINT), "What shape is it?")]}
    with slow_decode(engine, 0.05):
        first = _long_request(client, api.model, stream=True)
        next(c for c in first if c.choices and c.choices[0].delta.content)  # it holds the only slot
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as waiting:
            lines = waiting.iter_lines()
            notices = []
            for line in lines:
                if line.startswith(":"):
                    notices.append(line)
                    first.close()  # the slot frees up; the waiting answer goes on
                elif line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    break
            rest = [line for line in lines if line]
    assert notices == [": waiting for a free decode slot, 0 ahead"]
    assert rest[-1] == "data: [DONE]"


def test_a_key_is_required_when_set(url, settings):
    settings.settings = replace(settings.settings, api_key="s3cret")
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="guess", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    right = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
    assert [m.id for m in right.models.list()] == [settings.model]


def test_the_browser_chat_and_the_api_share_one_server_and_engine(client, api, url):
    from gradio_client import Client, handle_file

    results: dict[str, str] = {}

    def browser() -> None:
        chat = Client(f"{url}/", verbose=False)
        results["ui"] = chat.predict({"text": "What shape is it?", "files": [handle_file(str(POINT))]},
                                     api_name="/chat")[0]

    thread = threading.Thread(target=browser)
    thread.start()
    results["api"] = ask(client, api.model, user(file_part(POINT), "What shape is it?")).choices[0].message.content
    thread.join(timeout=60)
    assert results["ui"] == results["api"] and "pyramid" in results["api"]


def test_python_app_py_serves_the_chat_and_the_api_with_the_key_from_the_environment(tmp_path):
    import os
    import subprocess
    import sys

    import httpx

    from tests.app_helpers import free_port
    from tests.conftest import REPO

    port = free_port()
    env = {**os.environ, "IBLLM_API_KEY": "from-env", "OMP_NUM_THREADS": "1"}
    log = (tmp_path / "app.log").open("w")
    app = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=REPO, env=env, stdout=log,
                           stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                return httpx.get(f"{base}/", timeout=2).status_code == 200
            except httpx.HTTPError:
                return app.poll() is not None  # stop waiting if it died
        assert wait_until(up, timeout=120) and app.poll() is None, (tmp_path / "app.log").read_text()
        assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 401
        keyed = openai.OpenAI(base_url=f"{base}/v1", api_key="from-env", max_retries=0)
        answer = ask(keyed, "toy", user(file_part(POINT), "What shape is it?")).choices[0].message.content
        assert "pyramid" in answer
    finally:
        app.terminate()
        app.wait(timeout=30)
        log.close()
