"""Picture answers through the OpenAI-compatible API (``ibllm.answer_with``), driven with the official ``openai``
client against the real server on loopback.

The engine is the embedded toy model with the tiny random unCLIP pipeline for its 128-d embeddings
(tests/conftest.py ``tiny_unclip``, loaded from its folder like the real one); pictures are compared with the
engine's own, drawn directly with the same settings. A second server, without a usable pipeline, checks the
refusals and that its text answers go on.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ibllm.config import GenerationConfig, PictureConfig
from ibllm.types import Attachment
from tests.api.test_openai_api import ask, file_part, image_part, user
from tests.app_helpers import TOY, launch, wait_until

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai", reason="the openai client is in requirements-test.txt")

IMAGE = TOY / "red_cube_image.png"
SOUND = TOY / "bell_torus_audio.wav"
FAST = {"steps": 3, "seed": 11}


def serve(engine: Any) -> Iterator[tuple[Any, Any]]:
    """(engine, openai client) for ``engine`` served as app.py serves it."""
    from ibllm.api import ApiSettings, OpenAIApi

    api = OpenAIApi(engine, ApiSettings())
    demo, url = launch(engine, api)
    try:
        yield engine, openai.OpenAI(base_url=f"{url.rstrip('/')}/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        demo.close()
        engine.close()


@pytest.fixture(scope="module")
def drawing(tiny_unclip: Path) -> Iterator[tuple[Any, Any]]:
    from ibllm import create_engine

    yield from serve(create_engine(unclip=str(tiny_unclip)))


@pytest.fixture(scope="module")
def not_drawing() -> Iterator[tuple[Any, Any]]:
    from ibllm import create_engine

    # The default pipeline (the official one) takes 1024-d embeddings; the toy model's are 128-d.
    yield from serve(create_engine())


def decoded(picture: dict[str, Any]) -> np.ndarray:
    """The picture's data URL as pixels (it must be a PNG)."""
    head, _, data = picture["url"].partition(",")
    assert head == "data:image/png;base64"
    with Image.open(io.BytesIO(base64.b64decode(data))) as png:
        assert png.format == "PNG"
        return np.asarray(png.convert("RGB"))


def engine_picture(engine: Any, question: str, path: Path, modality: str, **settings: Any) -> np.ndarray:
    events = list(engine.imagine(question, attachments=[Attachment(str(path), modality)],
                                 picture=PictureConfig(**settings)))
    return np.asarray(events[-1].image.convert("RGB"))


def picture_of(reply: Any) -> dict[str, Any]:
    return reply.choices[0].message.ibllm["picture"]


def test_a_picture_answer_is_a_png_on_the_message_drawn_as_the_engine_draws_it(drawing):
    engine, client = drawing
    reply = ask(client, "toy", user(image_part(IMAGE), "What does it look like?"),
                extra_body={"ibllm": {"answer_with": "picture", "picture": FAST}})
    picture = picture_of(reply)
    pixels = decoded(picture)
    assert pixels.shape == (32, 32, 3) and (picture["width"], picture["height"]) == (32, 32)
    assert picture["seed"] == 11 and picture["steps"] == 3
    assert reply.choices[0].message.content == "" and reply.choices[0].finish_reason == "stop"
    assert np.array_equal(pixels, engine_picture(engine, "What does it look like?", IMAGE, "image", **FAST))


def test_the_same_seed_draws_the_same_picture_and_a_random_one_is_reported(drawing):
    _, client = drawing
    question = user(file_part(SOUND), "What would this sound look like?")

    def draw(**settings: Any) -> dict[str, Any]:
        return picture_of(ask(client, "toy", question, extra_body={"ibllm": {"answer_with": "picture",
                                                                             "picture": {"steps": 3, **settings}}}))

    first, again, other = draw(seed=5), draw(seed=5), draw(seed=6)
    assert np.array_equal(decoded(first), decoded(again))
    assert not np.array_equal(decoded(first), decoded(other))
    unseeded = draw()
    assert isinstance(unseeded["seed"], int)
    assert np.array_equal(decoded(unseeded), decoded(draw(seed=unseeded["seed"])))


def test_text_and_picture_stream_the_text_then_progress_then_the_picture(drawing):
    engine, client = drawing
    question = user(image_part(IMAGE), "What colour is it?")
    chunks = list(ask(client, "toy", question, stream=True, stream_options={"include_usage": True},
                      extra_body={"ibllm": {"answer_with": "text+picture", "picture": FAST}}))
    with_choices = [c for c in chunks if c.choices]
    kinds = []  # what each chunk carried, in order
    for c in with_choices:
        delta = c.choices[0].delta
        extension = getattr(delta, "ibllm", None) or {}
        kinds.append("text" if delta.content else "picture" if "picture" in extension else
                     "progress" if "picture_progress" in extension else "finish" if c.choices[0].finish_reason
                     else "other")
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == engine.answer("What colour is it?", attachments=[Attachment(str(IMAGE), "image")],
                                 generation=GenerationConfig(max_new_tokens=48, temperature=0.0))
    assert "red" in text
    first_picture_chunk = kinds.index("progress")
    assert "text" not in kinds[first_picture_chunk:]  # the picture comes after the whole text
    assert kinds[-2:] == ["picture", "finish"] and kinds.count("picture") == 1
    steps = [c.choices[0].delta.ibllm["picture_progress"]["step"] for c, k in zip(with_choices, kinds, strict=True)
             if k == "progress"]
    assert steps[-3:] == [1, 2, 3]
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens >= 2  # the usage chunk is still last
    streamed = with_choices[kinds.index("picture")].choices[0].delta.ibllm["picture"]
    whole = picture_of(ask(client, "toy", question, extra_body={"ibllm": {"answer_with": "picture", "picture": FAST}}))
    assert streamed["seed"] == 11 and np.array_equal(decoded(streamed), decoded(whole))


def test_closing_a_picture_stream_frees_the_pipeline(drawing):
    engine, client = drawing
    pipe = engine.painter.pipeline()
    unet_calls: list[int] = []
    hook = pipe.unet.register_forward_hook(lambda *_: unet_calls.append(1))
    try:
        stream = ask(client, "toy", user(image_part(IMAGE), "Draw it."), stream=True,
                     extra_body={"ibllm": {"answer_with": "picture", "picture": {"steps": 200, "seed": 1}}})
        next(c for c in stream if c.choices and "picture_progress" in (getattr(c.choices[0].delta, "ibllm", None)
                                                                       or {}))
        stream.close()
        assert wait_until(lambda: engine.painter.in_line == 0, timeout=60), "the closed picture holds the pipeline"
    finally:
        hook.remove()
    assert len(unet_calls) < 200, "the picture was drawn to the end"
    assert decoded(picture_of(ask(client, "toy", user(image_part(IMAGE), "Draw it."),
                                  extra_body={"ibllm": {"answer_with": "picture", "picture": FAST}}))).size


@pytest.mark.parametrize(("extension", "named"), [
    ({"answer_with": "sculpture"}, "answer_with"),
    ({"answer_with": "picture", "picture": {"steps": 0}}, "steps"),
    ({"answer_with": "picture", "picture": {"steps": 2.5}}, "steps"),
    ({"answer_with": "picture", "picture": {"guidance": -1}}, "guidance"),
    ({"answer_with": "picture", "picture": {"seed": "eleven"}}, "seed"),
    ({"answer_with": "picture", "picture": {"noise_level": 1000}}, "noise level"),
    ({"answer_with": "text+picture", "picture": {"stepz": 3}}, "stepz"),
])
def test_bad_picture_settings_are_400_naming_the_setting(drawing, extension, named):
    _, client = drawing
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "toy", user(image_part(IMAGE), "Draw it."), extra_body={"ibllm": extension})
    assert named in e.value.message and e.value.body["param"].startswith("ibllm.")


def test_a_picture_needs_an_input_and_text_answers_go_on(drawing):
    _, client = drawing
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "toy", user("Draw a cube."), extra_body={"ibllm": {"answer_with": "picture"}})
    assert "attach" in e.value.message
    assert "red" in ask(client, "toy", user(image_part(IMAGE), "What colour is it?")).choices[0].message.content


def test_the_toy_model_without_its_pipeline_is_told_why_and_its_text_answers_go_on(not_drawing, tmp_path,
                                                                                   monkeypatch):
    engine, client = not_drawing
    question = user(image_part(IMAGE), "What colour is it?")
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "toy", question, extra_body={"ibllm": {"answer_with": "text+picture"}})
    assert e.value.body["message"] == f"no picture: {engine.picture_status().note}"  # what the browser chat says
    assert "128-d" in e.value.message and "1024-d" in e.value.message
    monkeypatch.setattr(engine.painter, "source", str(tmp_path / "no-pipeline-here"))
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "toy", question, extra_body={"ibllm": {"answer_with": "picture"}})
    assert "no-pipeline-here" in e.value.message and "Get it with" in e.value.message
    answer = ask(client, "toy", question).choices[0].message
    assert "red" in answer.content and getattr(answer, "ibllm", None) is None
