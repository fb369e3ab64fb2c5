"""ibllm.ui.session: one session object holds the inputs (kind, weight, read-as), the removed files and the turns.

The first tests use the session on its own; the others run it through chat turns (``ChatHandler.respond`` with a
model-free engine), the way the page and the API do.
"""

from __future__ import annotations

import copy
import pickle
import shutil
from pathlib import Path

import pytest
from gradio.utils import deep_hash

from ibllm.types import Turn
from ibllm.ui.chat import ChatHandler
from ibllm.ui.history import Conversation, normalise_history
from ibllm.ui.session import ChatSession, SessionInput, modality_choices
from tests.app_helpers import ERROR_MARK, FakeEngine, run_turn, toy_file

KINDS = {"/t/a.png": "image", "/t/b.wav": "audio", "/t/c.ply": "point", "/t/d.png": "depth"}


def detect(path: str) -> tuple[str, str]:
    return (KINDS[path], "") if path in KINDS else ("", f"{Path(path).name} could not be read")


def conversation(*files: str, turns: int = 1) -> Conversation:
    return Conversation(turns=[Turn(f"q{i}", f"a{i}") for i in range(turns)], files=list(files))


def test_modality_choices():
    assert modality_choices("/t/x.png", "depth") == ["depth", "image", "thermal"]
    assert modality_choices("/t/x.wav", "audio") == ["audio"]
    assert SessionInput("/t/x.wav").choices == []  # an unusable file has none


def test_an_array_is_offered_only_as_the_kinds_its_shape_fits(tmp_path):
    import numpy as np

    for shape, detected, offered in [((6, 2000), "imu", ["imu"]),  # too thin for a depth map, 6 points of 2000
                                     ((2000, 6), "point", ["point", "imu"]),
                                     ((500, 3), "point", ["point"]), ((48, 64), "depth", ["depth"]),
                                     ((6, 6), "imu", ["imu", "point", "depth"])]:
        np.save(tmp_path / "a.npy", np.zeros(shape))
        np.savez(tmp_path / "a.npz", data=np.zeros(shape))
        for name in ("a.npy", "a.npz"):
            assert modality_choices(str(tmp_path / name), detected) == offered, (shape, name)
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")  # the loader says why; every kind stays offered
    assert modality_choices(str(tmp_path / "bad.npy"), "point") == ["point", "depth", "imu"]


def test_follow_lists_the_conversation_then_the_textbox():
    s = ChatSession().follow(conversation("/t/a.png", "/t/bad.png"), ["/t/b.wav", "/t/a.png"], detect)
    assert [(i.path, i.kind, i.sent) for i in s.inputs] == [("/t/a.png", "image", True), ("/t/bad.png", "", True),
                                                           ("/t/b.wav", "audio", False)]
    assert s.input("/t/bad.png").error == "bad.png could not be read"
    assert [i.path for i in s.sent] == ["/t/a.png", "/t/bad.png"]
    assert s.history == (Turn("q0", "a0"),)


def test_weights_and_read_as_survive_follow():
    s = ChatSession().follow(conversation(), ["/t/a.png", "/t/d.png"], detect)  # waiting in the textbox
    s = s.with_weight("/t/a.png", 0.25).with_read_as("/t/a.png", "thermal").with_read_as("/t/d.png", "image")
    # sent with the next message: now part of the conversation, with the choices made while they waited
    s = s.follow(conversation("/t/a.png", "/t/d.png", turns=2), [], detect)
    a, d = s.inputs
    assert (a.sent, a.weight, a.modality, d.modality, d.weight) == (True, 0.25, "thermal", "image", 1.0)
    assert s.with_read_as("/t/a.png", "audio") == s  # not a way a PNG can be read: ignored


def test_removed_files_stay_out():
    s = ChatSession().follow(conversation("/t/a.png", "/t/b.wav"), [], detect).without(["/t/a.png"])
    assert [i.path for i in s.inputs] == ["/t/b.wav"] and s.removed == ("/t/a.png",)
    # the chat still shows the file in an earlier message: it does not come back
    s = s.follow(conversation("/t/a.png", "/t/b.wav", turns=2), ["/t/a.png"], detect)
    assert [i.path for i in s.inputs] == ["/t/b.wav"]
    assert s.without(["/t/a.png"]).removed == ("/t/a.png",)  # removed once


def test_the_panel_layout_ignores_weights():
    s = ChatSession().follow(conversation("/t/a.png"), ["/t/d.png"], detect)
    assert s.with_weight("/t/a.png", 0.1).layout() == s.layout()
    assert s.with_read_as("/t/a.png", "depth").layout() != s.layout()
    assert s.without(["/t/d.png"]).layout() != s.layout()
    assert s.follow(conversation("/t/a.png", "/t/d.png"), [], detect).layout() != s.layout()  # pending → sent


def test_plain_data_that_gradio_can_copy_and_compare():
    s = ChatSession().follow(conversation("/t/a.png", "/t/b.wav", turns=2), [], detect).with_weight("/t/b.wav", 0.5)
    s = s.without(["/t/a.png"])
    assert copy.deepcopy(s) == s and pickle.loads(pickle.dumps(s)) == s
    # Gradio decides that a State changed (and fires .change) by this hash: it must follow the value
    assert deep_hash(copy.deepcopy(s)) == deep_hash(s)
    assert deep_hash(s.with_weight("/t/b.wav", 0.75)) != deep_hash(s)
    with pytest.raises(AttributeError):
        s.removed = ()  # type: ignore[misc]  # frozen: an answer still streaming keeps the session it started with


# -- through chat turns ----------------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Copies of toy files under fresh paths (as Gradio's uploads are)."""
    out = {}
    for kind in ("image", "audio", "thermal"):
        src = toy_file(kind)
        out[kind] = Path(shutil.copy(src, tmp_path / src.name))
    return out


def attached(engine: FakeEngine) -> list[tuple[str, str, float]]:
    return [(Path(a.path).name, a.modality, a.weight) for a in engine.calls[-1]["attachments"]]


def test_a_follow_up_keeps_earlier_files(files):
    engine = FakeEngine()
    handler = ChatHandler(engine)
    image, audio = files["image"], files["audio"]
    answer, s, history = run_turn(handler, [], ChatSession(), "What is it?", image)
    assert answer == engine.answer and [i.path for i in s.inputs] == [str(image)] and s.input(str(image)).sent
    _, s, history = run_turn(handler, history, s, "And this sound?", audio)
    assert attached(engine) == [(image.name, "image", 1.0), (audio.name, "audio", 1.0)]
    _, s, history = run_turn(handler, history, s, "Both together?")
    assert attached(engine) == [(image.name, "image", 1.0), (audio.name, "audio", 1.0)]
    assert engine.calls[-1]["history"] == [Turn("What is it?", engine.answer), Turn("And this sound?", engine.answer)]
    assert [i.path for i in handler.follow(s, history).inputs] == [str(image), str(audio)]


def test_weights_and_read_as_survive_a_turn(files):
    engine = FakeEngine()
    handler = ChatHandler(engine)
    image, thermal = files["image"], files["thermal"]
    _, s, history = run_turn(handler, [], ChatSession(), "What is it?", image, thermal)
    assert s.input(str(thermal)).modality == "image"  # detection never guesses thermal
    s = s.with_weight(str(image), 0.5).with_read_as(str(thermal), "thermal")  # the panel's slider and radio
    _, s, history = run_turn(handler, history, s, "How warm is it?")
    assert attached(engine) == [(image.name, "image", 0.5), (thermal.name, "thermal", 1.0)]
    s = handler.follow(s, history)  # the page refreshes the session after the answer
    _, s, history = run_turn(handler, history, s, "And now?")
    assert attached(engine) == [(image.name, "image", 0.5), (thermal.name, "thermal", 1.0)]
    assert (s.input(str(image)).weight, s.input(str(thermal)).read_as) == (0.5, "thermal")


def test_removing_a_file(files):
    engine = FakeEngine()
    handler = ChatHandler(engine)
    image, audio = files["image"], files["audio"]
    _, s, history = run_turn(handler, [], ChatSession(), "What is it?", image, audio)
    s = s.without([str(image)])  # the panel's Remove button
    _, s, history = run_turn(handler, history, s, "Only the sound now?")
    assert attached(engine) == [(audio.name, "audio", 1.0)]
    assert [i.path for i in handler.follow(s, history).inputs] == [str(audio)]


def test_a_file_that_fails_is_left_out_of_the_session(tmp_path, files):
    engine = FakeEngine()
    handler = ChatHandler(engine)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a picture")
    answer, s, history = run_turn(handler, [], ChatSession(), "What is it?", bad)
    assert answer.startswith(ERROR_MARK) and "broken.png" in answer and not engine.calls
    assert s.removed == (str(bad),) and not s.inputs
    assert normalise_history(history).files == [str(bad)]  # still shown in the chat ...
    _, s, _ = run_turn(handler, history, s, "And this?", files["image"])
    assert attached(engine) == [(files["image"].name, "image", 1.0)]  # ... but never read again
