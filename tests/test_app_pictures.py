"""Picture answers through the real app: served on 127.0.0.1, driven by gradio_client and by headless Chromium.

The engine is the embedded toy model with a tiny random unCLIP pipeline for its 128-d embeddings (tests/conftest.py
``tiny_unclip``, loaded from its folder like the real one); a second app without a usable pipeline shows the
embedded model's explanation instead of the option.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from tests.app_helpers import ERROR_MARK, launch, toy_file
from tests.test_app_browser import CHROMIUM, CHROMIUM_ARGS

pytestmark = pytest.mark.slow
PICTURE = {"picture_steps": 3, "picture_seed": 11, "max_new_tokens": 24}


@pytest.fixture(scope="module")
def app(tiny_unclip: Path) -> Iterator[tuple[str, Any]]:
    from ibllm import create_engine

    engine = create_engine(unclip=str(tiny_unclip))
    demo, url = launch(engine)
    try:
        yield url, engine
    finally:
        demo.close()


@pytest.fixture
def client(app: tuple[str, Any]) -> Any:
    from gradio_client import Client

    return Client(app[0], verbose=False)


def message(text: str, *paths: str | Path) -> dict[str, Any]:
    from gradio_client import handle_file

    return {"text": text, "files": [handle_file(str(p)) for p in paths]}


def run(client: Any, msg: dict[str, Any], **kwargs: Any) -> tuple[list[Any], tuple[Any, ...]]:
    """Every streamed chat output (the first element of each), and the final outputs."""
    job = client.submit(msg, api_name="/chat", **kwargs)
    shown = [out[0] for out in job]
    return shown, job.result()


def picture_file(chat_message: Any) -> str:
    assert isinstance(chat_message, dict) and len(chat_message["files"]) == 1, chat_message
    return chat_message["files"][0]


def test_the_picture_comes_as_a_chat_message_after_the_text(client):
    image = toy_file("image")
    text_only = client.predict(message("What shape is it?", image), api_name="/chat", max_new_tokens=24)[0]
    client.reset_session()
    shown, final = run(client, message("What shape is it?", image), answer_with="text + picture", **PICTURE)
    answer, timings, _, _, picture = final
    text, drawn = answer
    assert text == text_only  # the text answer is the one it is without a picture
    assert any(isinstance(s, list) and "step 1/3" in str(s[-1]) for s in shown), shown  # progress streamed in
    with Image.open(picture_file(drawn)) as shown_png, Image.open(picture) as api_png:
        assert shown_png.size == (32, 32) and np.array_equal(np.asarray(shown_png), np.asarray(api_png))
    assert "**Picture** · seed 11" in timings and "s/step" in timings

    # The same seed through the API draws the same picture.
    client.reset_session()
    again = run(client, message("What shape is it?", image), answer_with="text + picture", **PICTURE)[1][4]
    with Image.open(picture) as a, Image.open(again) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_picture_alone_and_the_conversation_goes_on(client):
    shown, final = run(client, message("What does it sound like as a picture?", toy_file("audio")),
                       answer_with="picture", **PICTURE)
    (drawn,) = final[0]  # one message: the picture, no text
    assert Path(picture_file(drawn)).is_file()
    follow_up = client.predict(message("What shape is it?"), api_name="/chat", max_new_tokens=24)[0]
    assert follow_up and not follow_up.startswith(ERROR_MARK)


def test_stopping_a_picture_frees_the_pipeline(app, client):
    _, engine = app
    pipe = engine.painter.pipeline()
    steps = []
    hook = pipe.unet.register_forward_hook(lambda *_: steps.append(1))  # counts the UNet calls that really ran
    try:
        job = client.submit(message("Draw it.", toy_file("image")), api_name="/chat", answer_with="picture",
                            picture_steps=100, picture_seed=1)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not steps:
            time.sleep(0.05)
        assert steps, "the picture never started"
        job.cancel()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and engine.painter.in_line:
            time.sleep(0.1)
        assert not engine.painter.in_line, "the stopped picture still holds the pipeline"
        assert len(steps) < 100
    finally:
        hook.remove()
    answer = client.predict(message("Draw it.", toy_file("image")), api_name="/chat", answer_with="picture", **PICTURE)
    assert Path(picture_file(answer[0][0])).is_file()  # the next picture is drawn


def test_bad_picture_settings_are_refused_with_the_reason(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="minimum"):
        client.predict(message("Draw it.", toy_file("image")), api_name="/chat", answer_with="picture",
                       picture_steps=0)
    with pytest.raises(AppError, match="answer_with|text \\+ picture|not in"):
        client.predict(message("Draw it.", toy_file("image")), api_name="/chat", answer_with="sculpture")
    answer = client.predict(message("Draw something."), api_name="/chat", answer_with="picture", **PICTURE)[0]
    assert answer[0].startswith(f"{ERROR_MARK} No picture") and "attach" in answer[0]


def test_without_a_pipeline_the_option_is_hidden_and_explained():
    from gradio_client import Client

    from ibllm import create_engine

    engine = create_engine()  # the default pipeline takes 1024-d embeddings; the toy model's are 128-d
    demo, url = launch(engine)
    try:
        radios = [b for b in demo.blocks.values() if isinstance(b, gr.Radio) and b.label == "Answer with"]
        assert len(radios) == 1 and radios[0].visible is False
        notes = [b.value for b in demo.blocks.values() if isinstance(b, gr.Markdown) and b.elem_id == "ibllm-pictures"]
        assert len(notes) == 1 and "Not available here" in notes[0] and "128-d" in notes[0]
        client = Client(url, verbose=False)
        answer = client.predict(message("What shape is it?", toy_file("image")), api_name="/chat",
                                answer_with="text + picture", **PICTURE)[0]
        text, why = answer
        assert text and not text.startswith(ERROR_MARK)  # the text chat is unaffected
        assert why.startswith(f"{ERROR_MARK} No picture") and "128-d" in why
    finally:
        demo.close()


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} not found (apt-get install chromium)")
def test_the_picture_shows_in_the_browser(app):
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download)")
    url, _ = app
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url, wait_until="domcontentloaded")
            page.get_by_test_id("textbox").first.wait_for(timeout=60_000)
            page.get_by_role("tab", name="Generation").click()
            page.get_by_label("text + picture").check()
            page.get_by_role("tab", name="Inputs").click()  # where the attached file is listed
            with page.expect_file_chooser() as chooser:
                page.get_by_test_id("upload-button").first.click()
            chooser.value.set_files(str(toy_file("image")))
            page.get_by_text(f"{toy_file('image').name} · image").first.wait_for(timeout=60_000)
            box = page.get_by_test_id("textbox").first
            box.fill("What shape is it?")
            box.press("Enter")
            picture = page.locator(".bot.message img")
            picture.first.wait_for(timeout=120_000)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not picture.first.evaluate("i => i.complete && i.naturalWidth"):
                time.sleep(0.1)
            assert picture.first.evaluate("i => i.naturalWidth") == 32  # the picture itself, decoded by the page
            texts = [t.strip() for t in page.locator(".bot.message").all_inner_texts()]
            assert texts and texts[0] and not texts[0].startswith(ERROR_MARK)  # the text answer above it
        finally:
            browser.close()
