"""ibllm.ui.chat: the handlers behind /chat, /neighbours and /compare_without_cache, with a model-free engine."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import gradio as gr
import pytest

from ibllm.config import GenerationConfig, VisualCacheConfig
from ibllm.types import Turn
from ibllm.ui import chat
from ibllm.ui.chat import ChatHandler
from ibllm.ui.session import ChatSession
from tests.app_helpers import ERROR_MARK, FakeEngine, run_turn, toy_file


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return Path(shutil.copy(toy_file("image"), tmp_path / "photo.png"))


def test_respond_streams_cumulative_text_and_passes_the_settings_through(image):
    engine = FakeEngine(answer="a small red cube", cache_entries=100)
    handler = ChatHandler(engine)
    cache, generation = VisualCacheConfig(enabled=False, top_k=3), GenerationConfig(max_new_tokens=7, seed=1)
    outs = list(handler.respond({"text": "What is it?", "files": [str(image)]}, [], ChatSession(), cache=cache,
                                generation=generation))
    texts = [o[0] for o in outs]
    assert texts[0] == "" and texts[-1] == "a small red cube"
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:], strict=False))
    first, final = outs[0], outs[-1]
    assert isinstance(first[4], ChatSession) and first[5] == first[4].layout()  # the session, before streaming
    assert all(o[4] == gr.skip() for o in outs[1:])  # not written again: a slider moved meanwhile keeps its value
    assert "visual cache: off" in final[1]
    call = engine.calls[-1]
    assert call["visual_cache"] is cache and call["generation"] is generation


class PacedEngine(FakeEngine):
    """A FakeEngine whose events come after the given pauses (seconds)."""

    def __init__(self, answer: str, pauses: list[float]) -> None:
        super().__init__(answer=answer)
        self.pauses = pauses

    def chat(self, *args, **kwargs):
        for i, event in enumerate(super().chat(*args, **kwargs)):
            time.sleep(self.pauses[i] if i < len(self.pauses) else 0.0)
            yield event


def test_text_goes_out_at_a_bounded_rate_and_nothing_is_lost(image, monkeypatch):
    monkeypatch.setattr(chat, "STREAM_INTERVAL_S", 0.5)
    engine = PacedEngine("one two three four", pauses=[0.0, 0.0, 1.0, 0.0])
    outs = ChatHandler(engine).respond({"text": "What is it?", "files": [str(image)]}, [], ChatSession(),
                                       cache=VisualCacheConfig(), generation=GenerationConfig())
    # "two" comes right after "one" and waits for "three" (a second later, past the interval); "four" comes right
    # after "three" and goes out with the end.
    assert [o[0] for o in outs] == ["", "one", "one two three", "one two three four"]


def test_api_weights_and_modalities_hold_for_one_turn(image):
    engine = FakeEngine()
    handler = ChatHandler(engine)
    _, s, history = run_turn(handler, [], ChatSession(), "What is it?", image, weights='{"thermal": 0.25}',
                             modalities='{"photo.png": "thermal"}')
    assert [(a.modality, a.weight) for a in engine.calls[-1]["attachments"]] == [("thermal", 0.25)]
    run_turn(handler, history, s, "And now?")
    assert [(a.modality, a.weight) for a in engine.calls[-1]["attachments"]] == [("image", 1.0)]


def test_malformed_api_weights_blame_no_file(image):
    handler = ChatHandler(FakeEngine())
    answer, s, _ = run_turn(handler, [], ChatSession(), "What is it?", image, weights="{image: 1}")
    assert answer.startswith(ERROR_MARK) and "JSON" in answer
    assert s.removed == () and [i.path for i in s.sent] == [str(image)]


def test_nothing_to_answer():
    answer, _, _ = run_turn(ChatHandler(FakeEngine()), [], ChatSession(), "")
    assert answer == f"{ERROR_MARK} Type a question or attach a file."


def test_an_empty_message_after_a_file_asks_nothing_of_the_model(image):
    # Enter in an empty textbox, the conversation's photo still attached: the model was asked an empty question
    engine = FakeEngine()
    history = [{"role": "user", "content": [{"path": str(image)}]}, {"role": "user", "content": "What is it?"},
               {"role": "assistant", "content": "a red cube"}]
    outs = list(ChatHandler(engine).respond({"text": "  ", "files": []}, history, ChatSession(),
                                            cache=VisualCacheConfig(), generation=GenerationConfig()))
    assert outs[-1][0] == f"{ERROR_MARK} Type a question." and not engine.calls


def test_every_upload_is_hashed_once(tmp_path, monkeypatch):
    """The UI hashes a file only to match gallery hints, through the digest memo: once per file version, however
    many turns, refreshes and lookups read it."""
    import ibllm.media.digest as digest

    hashed: list[str] = []
    real = digest.hashlib.file_digest
    monkeypatch.setattr(digest.hashlib, "file_digest", lambda f, algo: hashed.append(f.name) or real(f, algo))
    thermal = Path(shutil.copy(toy_file("thermal"), tmp_path / "gallery.png"))
    upload = Path(shutil.copy(thermal, tmp_path / "upload.png"))
    handler = ChatHandler(FakeEngine())
    handler.detect.add_hint(str(thermal), "thermal")
    history, s = [], ChatSession()
    for i in range(3):
        _, s, history = run_turn(handler, history, s, f"question {i}", *([upload] if i == 0 else []))
        s = handler.follow(s, history, [str(upload)])
        handler.lookup_neighbours(history, {"text": "", "files": []}, s, cache=VisualCacheConfig())
        list(handler.compare_without_cache(history, s, generation=GenerationConfig()))
    assert s.input(str(upload)).modality == "thermal"
    assert hashed == [str(thermal), str(upload)]


def test_lookup_neighbours_reads_the_conversation_and_the_textbox(image, tmp_path):
    engine = FakeEngine()
    handler = ChatHandler(engine)
    _, s, history = run_turn(handler, [], ChatSession(), "What is it?", image)
    sound = Path(shutil.copy(toy_file("audio"), tmp_path / "sound.wav"))
    cache = VisualCacheConfig(top_k=4)
    rows, _, note = handler.lookup_neighbours(history, {"text": "", "files": [str(sound)]}, s, cache=cache)
    attachments, used = engine.neighbour_calls[-1]
    assert [a.modality for a in attachments] == ["image", "audio"] and used is cache
    assert rows == [[1, 3, 0.5, "a cube"]] and "top-4" in note
    _, _, note = handler.lookup_neighbours([], {"text": "", "files": []}, ChatSession(), cache=cache)
    assert note == "Attach an input first."


def test_a_file_that_fails_as_the_kind_chosen_for_it_goes_back_to_its_own_kind(tmp_path):
    """A CSV of xyz rows is offered as an IMU recording too (the extension allows both), but has no 6 channels:
    asked about it read as IMU, the loader's reason is shown and the file stays in the conversation read as a point
    cloud (it was dropped for good)."""
    import numpy as np

    from tests.app_helpers import load_engine

    points = tmp_path / "scan.csv"
    np.savetxt(points, np.random.default_rng(0).normal(size=(200, 3)), delimiter=",")
    handler = ChatHandler(load_engine())
    history = [{"role": "user", "content": [{"path": str(points)}]}]
    s = handler.follow(ChatSession(), history).with_read_as(str(points), "imu")
    assert s.input(str(points)).modality == "imu"
    ask = {"text": "What shape is it?", "files": []}
    outs = list(handler.respond(ask, history, s, cache=VisualCacheConfig(),
                                generation=GenerationConfig(max_new_tokens=8)))
    text, after = outs[-1][0], outs[-1][4]
    assert text.startswith(ERROR_MARK) and "6 numeric columns" in text and "read as point again" in text
    assert after.input(str(points)).modality == "point" and str(points) not in after.removed
    outs = list(handler.respond(ask, history, after, cache=VisualCacheConfig(),
                                generation=GenerationConfig(max_new_tokens=8)))
    assert outs[-1][0] and not outs[-1][0].startswith(ERROR_MARK)


def test_compare_without_cache_answers_the_last_question_again(image):
    engine = FakeEngine()
    handler = ChatHandler(engine)
    assert list(handler.compare_without_cache([], ChatSession(), generation=GenerationConfig()))[0].startswith(
        "Ask something first")
    _, s, history = run_turn(handler, [], ChatSession(), "first", image)
    _, s, history = run_turn(handler, history, s, "second")
    generation = GenerationConfig(max_new_tokens=5)
    out = list(handler.compare_without_cache(history, s, generation=generation))
    assert out[-1].startswith(engine.answer)
    call = engine.calls[-1]
    assert call["message"] == "second" and call["history"] == [Turn("first", engine.answer)]
    assert call["visual_cache"].enabled is False and call["generation"] is generation
    assert [a.modality for a in call["attachments"]] == ["image"]
