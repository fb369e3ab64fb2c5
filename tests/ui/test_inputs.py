"""ibllm.ui.inputs: the API's weights and modalities, how each input is read and weighed, file detection."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ibllm.media import detect_modality
from ibllm.media.errors import MediaError
from ibllm.ui.inputs import (
    Detector,
    RequestError,
    parse_modalities,
    parse_weights,
    plan_attachments,
    resolve_modality,
)
from ibllm.ui.session import SessionInput
from tests.app_helpers import FakeEngine, toy_file


def test_weights_parsing():
    assert parse_weights("") == {}
    assert parse_weights('{"audio": 0.5, "a.png": 2}') == {"audio": 0.5, "a.png": 2.0}
    assert parse_weights("[1, 0]") == [1.0, 0.0]
    with pytest.raises(RequestError, match="JSON"):
        parse_weights("{audio: 1}")
    with pytest.raises(RequestError):
        parse_weights('{"audio": "loud"}')
    # Python's json reads NaN and Infinity; NaN passed "< 0" and would have poisoned the fused embedding
    for wrong in ('{"audio": NaN}', "[1, Infinity]", '{"audio": -1}', "[true]"):
        with pytest.raises(RequestError, match="weights must"):
            parse_weights(wrong)


def test_modalities_parsing():
    assert parse_modalities(None) == {}
    assert parse_modalities('{"x.png": "depth"}') == {"x.png": "depth"}
    assert parse_modalities('["image", "depth"]') == ["image", "depth"]
    with pytest.raises(RequestError, match="JSON"):
        parse_modalities("[depth]")
    with pytest.raises(RequestError):
        parse_modalities('{"x.png": 3}')


INPUTS = (SessionInput("/t/a.png", "image", weight=0.25), SessionInput("/t/b.wav", "audio"),
          SessionInput("/t/c.ply", "point", weight=0.0))


def test_slider_weights_api_weights_and_weight_zero():
    # the session's (slider) weights; API weights by modality, name or position win; 0 drops the input
    got = plan_attachments(INPUTS)
    assert [(a.path, a.modality, a.weight) for a in got] == [("/t/a.png", "image", 0.25), ("/t/b.wav", "audio", 1.0)]
    got = plan_attachments(INPUTS, '{"audio": 0.5, "c.ply": 2}')
    assert [(a.modality, a.weight) for a in got] == [("image", 0.25), ("audio", 0.5), ("point", 2.0)]
    got = plan_attachments(INPUTS, "[0, 1, 0.3]")
    assert [(a.modality, a.weight) for a in got] == [("audio", 1.0), ("point", 0.3)]


def test_api_weights_or_modalities_that_name_no_input_are_refused_naming_the_inputs():
    # a misspelt file name was silently ignored: the answer came, weighed as if it had not been given
    with pytest.raises(RequestError, match=r"'a.jpg' names no input.*0: a.png, 1: b.wav, 2: c.ply"):
        plan_attachments(INPUTS, '{"a.jpg": 0.5}')
    with pytest.raises(RequestError, match="'5' names no input"):
        plan_attachments(INPUTS, '{"5": 1}')
    with pytest.raises(RequestError, match="4 values for 3 input"):
        plan_attachments(INPUTS, "[1, 1, 1, 1]")
    with pytest.raises(RequestError, match="'b.mp3' names no input"):
        plan_attachments(INPUTS, modalities_text='{"b.mp3": "audio"}')
    # a kind of input the conversation has none of is no mistake: a client may weigh kinds once for all its calls
    assert len(plan_attachments(INPUTS, '{"video": 0.5, "/t/b.wav": 0.5, "0": 1}')) == 2


def test_read_as_the_session_says_unless_the_api_says_otherwise():
    png = SessionInput("/t/x.png", "image", read_as="thermal")
    assert resolve_modality(0, png, {}) == "thermal"
    assert resolve_modality(0, png, parse_modalities('{"x.png": "depth"}')) == "depth"
    assert resolve_modality(0, png, parse_modalities('["depth"]')) == "depth"
    assert resolve_modality(0, SessionInput("/t/x.png", "image", read_as="audio"), {}) == "image"  # not a choice
    with pytest.raises(RequestError, match="cannot be read as audio"):
        resolve_modality(0, png, {"x.png": "audio"})
    assert [a.modality for a in plan_attachments([png], modalities_text='{"0": "depth"}')] == ["depth"]


def test_an_unusable_input_stops_the_plan():
    broken = SessionInput("/t/broken.png", error="broken.png could not be decoded as an image")
    with pytest.raises(MediaError, match="broken.png could not be decoded"):
        plan_attachments([INPUTS[0], broken])


def test_detector_remembers_and_hints_by_content(tmp_path, monkeypatch):
    """Detection runs once per file version; a gallery hint (thermal, which detection never guesses) follows the
    content to Gradio's copy of the file, and only files of a hinted size are hashed."""
    import ibllm.media.digest as digest

    engine = FakeEngine()
    detected: list[str] = []
    monkeypatch.setattr(engine, "detect", lambda p: detected.append(p) or detect_modality(p))
    hashed: list[str] = []
    real_digest = digest.hashlib.file_digest
    monkeypatch.setattr(digest.hashlib, "file_digest", lambda f, algo: hashed.append(f.name) or real_digest(f, algo))

    gallery = tmp_path / "gallery"
    upload = tmp_path / "upload"  # Gradio's copy of the gallery file
    gallery.mkdir(), upload.mkdir()
    thermal = Path(shutil.copy(toy_file("thermal"), gallery))
    copy = Path(shutil.copy(thermal, upload))
    photo = Path(shutil.copy(toy_file("image"), tmp_path / "photo.png"))
    assert photo.stat().st_size != thermal.stat().st_size

    detect = Detector(engine)
    detect.add_hint(str(thermal), "thermal")
    for _ in range(3):
        assert detect(str(copy)) == ("thermal", "")
        assert detect(str(photo)) == ("image", "")
    assert detected == [str(copy), str(photo)]
    assert hashed == [str(thermal), str(copy)]  # each once; the photo (another size) never
    missing = tmp_path / "gone.png"
    assert detect(str(missing)) == ("", "gone.png is no longer available; attach it again.")
