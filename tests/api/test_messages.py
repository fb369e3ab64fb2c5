"""OpenAI messages -> the conversation (files written, turns, question), and stop strings; no server, no model."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from ibllm.api.completion import StopText
from ibllm.api.errors import ApiError
from ibllm.api.messages import read_messages, safe_name
from ibllm.ui.history import normalise_history
from tests.app_helpers import TOY


def data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def image_part(path: Path = TOY / "red_cube_image.png") -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(path, "image/png")}}


def refused(tmp_path: Path, messages, status: int = 400, max_bytes: int = 2**20) -> str:
    with pytest.raises(ApiError) as e:
        read_messages(messages, tmp_path, max_bytes)
    assert e.value.status == status
    assert e.value.body()["error"]["message"] == e.value.message
    return e.value.message


def test_files_of_every_user_message_stay_inputs_and_assistant_messages_are_the_history(tmp_path):
    ply = TOY / "pyramid_point.ply"
    wav = TOY / "bell_torus_audio.wav"
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": [image_part(), {"type": "text", "text": "What colour is it?"}]},
        {"role": "assistant", "content": "It is red."},
        {"role": "user", "content": [
            {"type": "file", "file": {"file_data": data_url(ply, "application/octet-stream"), "filename": "a/b.ply"}},
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav.read_bytes()).decode(),
                                                    "format": "wav"}},
            {"type": "text", "text": "And now?"}]},
    ]
    read = read_messages(messages, tmp_path, 2**20)
    assert read.question == "And now?"
    conversation = normalise_history(read.history)
    assert [(t.user, t.assistant) for t in conversation.turns] == [("What colour is it?", "It is red.")]
    names = [Path(p).name for p in conversation.files]
    assert names == ["image1.png", "b.ply", "audio1.wav"]  # the folder part of a file name is dropped
    contents = [Path(p).read_bytes() for p in conversation.files]
    assert contents == [(TOY / "red_cube_image.png").read_bytes(), ply.read_bytes(), wav.read_bytes()]
    assert all(Path(p).is_relative_to(tmp_path) for p in conversation.files)


def test_the_same_file_sent_twice_is_one_input(tmp_path):
    messages = [{"role": "user", "content": [image_part(), "first"]}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": [image_part(), "again"]}]
    files = normalise_history(read_messages(messages, tmp_path, 2**20).history).files
    assert len(files) == 1


def test_web_urls_are_refused_with_a_reason(tmp_path):
    message = refused(tmp_path, [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, "What is it?"]}])
    assert "fetches nothing" in message and "data:image/png;base64" in message


@pytest.mark.parametrize(("part", "says"), [
    ({"type": "file", "file": {"file_id": "file-abc"}}, "file_data"),
    ({"type": "file", "file": {"file_data": base64.b64encode(b"1 2 3\n").decode()}}, "filename"),
    ({"type": "file", "file": {"file_data": "data:text/plain;base64,@@@", "filename": "x.txt"}}, "base64"),
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wma"}}, "wav"),
    ({"type": "image_url", "image_url": {"url": "data:application/pdf;base64,AAAA"}}, "image"),
    ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}, "image_url, input_audio, file"),
])
def test_unusable_parts_say_what_is_wrong_and_where(tmp_path, part, says):
    message = refused(tmp_path, [{"role": "user", "content": [part, "What is it?"]}])
    assert says in message and "messages[0].content[0]" in message


def test_the_last_message_must_be_the_question(tmp_path):
    assert "last message" in refused(tmp_path, [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "hello"}])
    assert "non-empty list" in refused(tmp_path, [])
    assert "role" in refused(tmp_path, [{"role": "tool", "content": "42"}])


def test_a_file_over_the_limit_is_413_before_it_is_decoded(tmp_path):
    big = base64.b64encode(bytes(4096)).decode()
    message = refused(tmp_path, [{"role": "user", "content": [
        {"type": "file", "file": {"file_data": big, "filename": "big.npy"}}]}], status=413, max_bytes=1024)
    assert "at most" in message
    assert not list(tmp_path.iterdir())


def test_file_names_keep_their_extension_and_lose_their_folders():
    assert safe_name("../../etc/passwd") == "passwd"
    assert safe_name("C:\\scans\\chair scan.ply") == "chair scan.ply"
    assert safe_name("") == "file"


def test_stop_text_holds_back_what_could_become_a_stop_string():
    cut = StopText(["</s>", "STOP"])
    out = [cut.feed(d) for d in ["It is", " a cu", "be.<", "/", "s> more"]]
    assert out == ["It is", " a cu", "be.", "", ""]
    assert cut.hit and cut.text == "It is a cube."


def test_stop_text_releases_a_held_back_end_that_never_became_a_stop():
    cut = StopText(["STOP"])
    assert cut.feed("It ST") == "It "
    assert cut.feed("ays.") == "STays."
    assert cut.feed("", last=True) == "" and not cut.hit
    assert StopText([]).feed("anything") == "anything"


def test_the_earliest_stop_string_wins():
    cut = StopText(["cube", "is"])
    assert cut.feed("It is a cube.") == "It "
