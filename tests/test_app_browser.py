"""The app in a real browser: headless Debian Chromium driven by the ``playwright`` pip package (no browser download).

One walk through the page, as a person would: open it, click a gallery example and watch the answer stream, attach a
point cloud and ask about it, then check the page logged no errors and asked nothing of any host but this one. Then
live capture with Chromium's fake camera and microphone: a webcam photo, a webcam video and a voice recording.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from ibllm.ui.gallery import DEFAULT_GALLERY, load_gallery
from tests.app_helpers import ERROR_MARK, TOY, SpyEngine, example_for, launch, load_engine

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
# Babylon.js (gr.Model3D) tries WebGPU first and logs its failure as an error before falling back to WebGL; with
# --disable-gpu that attempt always fails, so the message says nothing about the app.
BENIGN_CONSOLE = ("WebGPU",)
# Babylon's render loop, when a 3D view is hidden while it is still starting, reads its scene once after disposal
# (Gradio 6's Model3D); the page goes on working (the test that switches views checks it answers).
BENIGN_PAGE_ERRORS = ("reading 'postProcessManager'",)
STREAM_DELAY = 0.3  # seconds the spy engine waits per chat event

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} not found (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def app_url() -> Iterator[tuple[str, SpyEngine]]:
    spy = SpyEngine(load_engine())
    # Slow enough that the page shows the answer growing even on a loaded 2-core CI runner: a short toy answer is
    # ~4 events, and at 0.05 s each the whole answer once landed between two polls of the page (CI, session 6).
    spy.delay = STREAM_DELAY
    demo, url = launch(spy)
    try:
        yield url, spy
    finally:
        demo.close()


def bot_texts(page: Any) -> list[str]:
    return [t.strip() for t in page.locator(".bot.message").all_inner_texts()]


def watch_answer(page: Any, index: int, timeout: float = 90.0) -> list[str]:
    """The successive texts of bot message ``index`` until it stops changing (after the queue finishes)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    stable_since = None
    while time.monotonic() < deadline:
        texts = bot_texts(page)
        text = texts[index] if len(texts) > index else ""
        if text and (not seen or text != seen[-1]):
            seen.append(text)
            stable_since = time.monotonic()
        elif seen and stable_since and time.monotonic() - stable_since > 2.0 and \
                page.locator(".stop-button").count() == 0:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"bot message {index} did not settle; saw {seen}")


def test_browser_walkthrough(app_url, tmp_path: Path):
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download)")
    url, spy = app_url
    host = urlparse(url).hostname
    example = example_for(("image",))
    label = next(e.label for e in load_gallery(DEFAULT_GALLERY) if e.question == example["question"]
                 and Path(e.files[0]).name == example["files"][0]["path"])  # as the page labels it

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            requests: list[str] = []
            errors: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.goto(url, wait_until="domcontentloaded")  # never "networkidle": the queue keeps a stream open
            page.get_by_test_id("textbox").first.wait_for(timeout=60_000)

            # 0. the gallery is shown from its first row (the chat's autoscroll had taken it to its last)
            time.sleep(4)  # thumbnails loaded, the chat's own autoscroll done
            assert page.evaluate("() => document.querySelector('#ibllm-chat .bubble-wrap').scrollTop") == 0

            # 1. a gallery example: one click fills and runs it, and the answer streams in
            page.get_by_text(label, exact=True).click()
            seen = watch_answer(page, 0)
            assert len(seen) >= 2, f"the answer did not stream: {seen}"
            assert seen[-1].split()[0] in spy.calls[-1]["answer"]  # the page shows the engine's text
            assert [a.modality for a in spy.calls[-1]["attachments"]] == ["image"]
            page.get_by_text(Path(example["files"][0]["path"]).name).first.wait_for(timeout=30_000)

            # 2. halve the image's weight in the inputs panel, attach a point cloud and ask about both
            weight = page.get_by_label("number input for weight").first
            weight.fill("0.5")
            weight.press("Enter")
            time.sleep(1)  # the slider's change event writes the session's weights
            cloud = TOY / example_for(("point",))["files"][0]["path"]
            with page.expect_file_chooser() as chooser:
                page.get_by_test_id("upload-button").first.click()
            chooser.value.set_files(str(cloud))
            page.get_by_text(f"{cloud.name} · point").first.wait_for(timeout=60_000)  # listed in the inputs panel
            box = page.get_by_test_id("textbox").first
            box.fill("What shape is it?")
            box.press("Enter")
            second = watch_answer(page, 1)
            assert second[-1]
            last = spy.calls[-1]
            assert last["message"] == "What shape is it?" and len(last["history"]) == 1
            assert [(a.modality, a.weight) for a in last["attachments"]] == [("image", 0.5), ("point", 1.0)]
            page.locator("canvas").first.wait_for(timeout=30_000)  # the Model3D preview of the cloud
            time.sleep(2)  # let the 3D view draw before the picture

            shot = tmp_path / "app.png"
            page.screenshot(path=str(shot), full_page=True)
            keep = os.environ.get("IBLLM_SCREENSHOT")
            if keep:
                shutil.copy(shot, keep)
            print(f"screenshot: {shot}")

            outside = sorted({u for u in requests if not u.startswith(("data:", "blob:"))
                              and urlparse(u).hostname not in (host, "localhost", "127.0.0.1")})
            assert not outside, f"the page fetched from other hosts: {outside}"
            real_errors = [e for e in errors if not any(b in e for b in BENIGN_CONSOLE)]
            assert not real_errors, real_errors

            # The Model tab's API examples name this server's address (they said port 7860 wherever it ran)
            page.get_by_role("tab", name="Model").click()
            shown = page.locator("#ibllm-api-help").inner_text(timeout=30_000)
            assert f'Client("{url.rstrip("/")}/")' in shown and f'base_url="{url.rstrip("/")}/v1"' in shown
            page.get_by_role("tab", name="Inputs").click()

            # 3. closing the tab mid-answer frees the model
            spy.stopped.clear()
            spy.delay = 1.0
            calls = len(spy.calls)
            box.fill("Which way does it move?")
            box.press("Enter")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not (len(spy.calls) > calls and spy.calls[-1]["answer"]):
                time.sleep(0.05)
            assert len(spy.calls) > calls, "the third question never reached the engine"
            page.close()
            assert spy.stopped.wait(30), "the answer went on after the tab was closed"
        finally:
            spy.delay = STREAM_DELAY
            browser.close()


# Chromium's stand-ins for a camera and a microphone (a moving pattern and a beep), granted without a prompt.
FAKE_MEDIA = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]


def test_browser_live_capture(app_url, tmp_path: Path):
    """A photo and a short video from the webcam and a recording from the microphone, then a question about them:
    each capture lands in the message like an upload and the engine gets all three."""
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download)")
    url, spy = app_url
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + FAKE_MEDIA, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000},
                                          permissions=["camera", "microphone"])
            page = context.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.goto(url, wait_until="domcontentloaded")
            page.get_by_test_id("textbox").first.wait_for(timeout=60_000)
            page.get_by_text("Camera: take a photo").click()

            def camera_live(elem_id: str) -> None:  # the preview shows frames: a capture now has a picture
                page.wait_for_function(f"document.querySelector('#{elem_id} video')?.readyState >= 2",
                                       timeout=30_000)

            photo = page.locator("#ibllm-camera-photo")
            photo.get_by_text("Click to Access Webcam").click()
            camera_live("ibllm-camera-photo")
            photo.get_by_label("capture photo").click()
            page.get_by_text(re.compile(r"webcam-photo-\d+\.png · image")).first.wait_for(timeout=30_000)

            video = page.locator("#ibllm-camera-video")
            video.get_by_text("Click to Access Webcam").click()
            camera_live("ibllm-camera-video")
            video.get_by_label("start recording").click()
            time.sleep(2.5)
            video.locator("button", has_text="Stop").click()
            page.get_by_text(re.compile(r"webcam-video-\d+\.webm · video")).first.wait_for(timeout=60_000)

            page.get_by_test_id("microphone-button").click()
            page.get_by_label("Start recording").click()
            time.sleep(2)
            page.get_by_label("Stop recording").first.click()
            page.get_by_label("Attach audio").click()
            page.get_by_text(re.compile(r"\.wav · audio")).first.wait_for(timeout=30_000)

            calls = len(spy.calls)
            box = page.get_by_test_id("textbox").first
            box.fill("What shape is it?")
            box.press("Enter")
            answer = watch_answer(page, 0)[-1]
            assert len(spy.calls) == calls + 1
            last = spy.calls[-1]
            assert [a.modality for a in last["attachments"]] == ["image", "video", "audio"]
            assert [Path(a.path).suffix for a in last["attachments"]] == [".png", ".webm", ".wav"]
            assert answer and ERROR_MARK not in answer and answer.split()[0] in last["answer"], answer

            shot = tmp_path / "capture.png"
            page.screenshot(path=str(shot), full_page=True)
            keep = os.environ.get("IBLLM_CAPTURE_SCREENSHOT")
            if keep:
                shutil.copy(shot, keep)
            real_errors = [e for e in errors if not any(b in e for b in BENIGN_CONSOLE)]
            assert not real_errors, real_errors
        finally:
            browser.close()


@contextmanager
def chat_page(url: str, errors: list[str] | None = None) -> Iterator[Any]:
    """The app's page in headless Chromium, its chat box ready; uncaught page errors (less the benign ones) go
    to ``errors``."""
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            if errors is not None:
                page.on("pageerror", lambda e: errors.append(f"page error: {e}")
                        if not any(b in str(e) for b in BENIGN_PAGE_ERRORS) else None)
            page.goto(url, wait_until="domcontentloaded")
            page.get_by_test_id("textbox").first.wait_for(timeout=60_000)
            yield page
        finally:
            browser.close()


def attach(page: Any, path: Path, kind: str) -> None:
    """Attach ``path`` with the paper clip and wait for the inputs panel to list it as ``kind``."""
    with page.expect_file_chooser() as chooser:
        page.get_by_test_id("upload-button").first.click()
    chooser.value.set_files(str(path))
    page.get_by_text(f"{path.name} · {kind}").first.wait_for(timeout=60_000)


def test_reading_a_file_as_another_kind_redraws_its_preview(app_url, tmp_path):
    """A (T, 6) array is a point cloud or an IMU trace; going point cloud -> IMU swaps the 3D view for a plot
    (re-drawn without a 3D view, Model3D's script was handed the plot and threw, freezing the page) and the chat
    still answers, reading the file as chosen."""
    import numpy as np

    url, spy = app_url
    trace = tmp_path / "trace.npy"
    np.save(trace, np.load(TOY / example_for(("imu",))["files"][0]["path"]).T)  # (T, 6): detected as points
    errors: list[str] = []
    with chat_page(url, errors) as page:
        attach(page, trace, "point")
        page.locator("canvas").first.wait_for(timeout=30_000)
        for kind, shown in (("imu", ".js-plotly-plot"), ("point", "canvas"), ("imu", ".js-plotly-plot")):
            page.get_by_label(kind, exact=True).check()
            page.get_by_text(f"{trace.name} · {kind}").first.wait_for(timeout=60_000)
            page.locator(shown).first.wait_for(timeout=30_000)
        calls = len(spy.calls)
        box = page.get_by_test_id("textbox").first
        box.fill("Which way does it move?")
        box.press("Enter")
        watch_answer(page, 0)
        assert len(spy.calls) == calls + 1, "the question never reached the engine"
        assert [a.modality for a in spy.calls[-1]["attachments"]] == ["imu"]
        assert not errors, errors


def test_stop_before_the_first_word_says_so_and_the_next_question_goes_on(app_url):
    """Stopped while its file is read (the engine is slow here), an answer said nothing: an empty bubble, and an
    empty answer in the history the model read next. Now the bubble says it stopped and the model never sees it."""
    url, spy = app_url
    image = TOY / example_for(("image",))["files"][0]["path"]
    with chat_page(url) as page:
        attach(page, image, "image")
        box = page.get_by_test_id("textbox").first
        spy.delay = 5.0  # the first word is seconds away
        try:
            box.fill("What colour is it?")
            box.press("Enter")
            page.locator(".stop-button").first.click(timeout=30_000)
            page.get_by_text("stopped before answering").first.wait_for(timeout=30_000)
        finally:
            spy.delay = STREAM_DELAY
        calls = len(spy.calls)
        box.fill("And its shape?")
        box.press("Enter")
        watch_answer(page, 1)
        assert bot_texts(page)[0].endswith("stopped before answering")
        assert len(spy.calls) > calls and spy.calls[-1]["history"] == []  # the stopped turn is not fed back


def test_a_two_turn_example_offers_its_follow_up(app_url):
    """A gallery example with a follow-up ("(then ask: ...)") offers it under the chat once clicked: one click puts it
    in the textbox, Enter asks it in the same conversation (the person had to type it)."""
    url, spy = app_url
    example = next(e for e in load_gallery(DEFAULT_GALLERY) if e.followup)
    with chat_page(url) as page:
        box = page.get_by_test_id("textbox").first
        page.get_by_text(example.label, exact=True).click()
        watch_answer(page, 0)
        page.get_by_role("button", name=f"Then ask: {example.followup}").click(timeout=30_000)
        assert box.input_value() == example.followup
        box.press("Enter")
        watch_answer(page, 1)
        assert spy.calls[-1]["message"] == example.followup and len(spy.calls[-1]["history"]) == 1
        assert page.get_by_role("button", name=f"Then ask: {example.followup}").count() == 0  # offered once
