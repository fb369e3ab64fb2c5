"""ibllm.ui.history: every shape Gradio hands a chat history over in → turns and file paths."""

from __future__ import annotations

from ibllm.types import NEEDS_INPUT, Turn
from ibllm.ui.history import (
    ERROR_MARK,
    STOPPED_BEFORE_ANSWERING,
    mark_stopped,
    message_parts,
    normalise_history,
    unique,
)


def test_history_from_browser_blocks():
    # what the browser sends: typed blocks, each file its own user message
    history = [
        {"role": "user", "content": [{"type": "file", "file": {"path": "/t/a.png", "mime_type": "image/png"}}]},
        {"role": "user", "content": [{"type": "text", "text": "what is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a cube"}]},
        {"role": "user", "content": [{"type": "text", "text": "colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}], "metadata": None},
    ]
    conv = normalise_history(history)
    assert conv.turns == [Turn("what is it?", "a cube"), Turn("colour?", "red")]
    assert conv.files == ["/t/a.png"]


def test_history_from_gradio_client_and_examples():
    # what gradio_client and example clicks leave: raw strings, {"path"} dicts, tuples, FileData-like objects
    class FileData:
        path = "/t/c.wav"

    history = [
        {"role": "user", "content": [{"path": "/t/a.png"}, "hello"]},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": ("/t/b.ply",)},
        {"role": "user", "content": [FileData(), "and now?"]},
        {"role": "assistant", "content": ["more"]},
        {"role": "user", "content": [{"path": "/t/a.png"}]},  # the same file again is one input
        {"role": "user", "content": "pending question"},  # not answered yet: not a turn
    ]
    conv = normalise_history(history)
    assert conv.turns == [Turn("hello", "hi"), Turn("and now?", "more")]
    assert conv.files == ["/t/a.png", "/t/b.ply", "/t/c.wav"]


def test_error_answers_and_notes_are_not_fed_back():
    history = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": f"{ERROR_MARK} bad file"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
        {"role": "assistant", "content": "timing details", "metadata": {"title": "timings"}},
    ]
    assert normalise_history(history).turns == [Turn("q2", "a2")]


def test_an_answer_stopped_before_its_first_word_says_so_and_is_not_fed_back():
    asked = [{"role": "user", "content": "What colour is it?"}]
    for empty in ("", [], [{"type": "text", "text": " "}]):
        marked = mark_stopped([*asked, {"role": "assistant", "content": empty}])
        assert marked == [*asked, {"role": "assistant", "content": STOPPED_BEFORE_ANSWERING}]
        assert normalise_history([*marked, {"role": "user", "content": "And its shape?"}]).turns == []
    assert mark_stopped([*asked, {"role": "assistant", "content": "It is"}]) is None  # a partial answer stays
    assert mark_stopped(asked) is None and mark_stopped([]) is None


def test_the_default_models_note_on_a_question_without_input_is_not_fed_back():
    # the app's words, not the model's; fed back, it filled the toy model's context (208 tokens) and was dropped
    history = [{"role": "user", "content": "hi, what can you do?"}, {"role": "assistant", "content": NEEDS_INPUT},
               {"role": "user", "content": "What colour is it?"}, {"role": "assistant", "content": "It is red."}]
    assert normalise_history(history).turns == [Turn("What colour is it?", "It is red.")]


def test_message_parts():
    assert message_parts({"text": " hi ", "files": ["/a.png", {"path": "/b.wav"}]}) == ("hi", ["/a.png", "/b.wav"])
    assert message_parts("just text") == ("just text", [])
    assert message_parts(None) == ("", [])
    assert message_parts({"role": "user", "content": [{"path": "/a.png"}, "q"]}) == ("q", ["/a.png"])


def test_unique_keeps_first_appearance():
    assert unique(["/b", "/a", "/b", "/c", "/a"]) == ["/b", "/a", "/c"]


def test_picture_answers_in_the_history():
    """A picture is an answer of its own (no text), never an input; the app's notes about it are not the model's."""
    from ibllm.ui.history import PICTURE_MARK

    history = [
        {"role": "user", "content": [{"path": "/t/bell.wav"}, "draw it"]},
        {"role": "assistant", "content": [{"path": "/tmp/gradio/picture.png"}]},  # a picture alone
        {"role": "user", "content": "what shape is it?"},
        {"role": "assistant", "content": "a torus"},
        {"role": "assistant", "content": f"{ERROR_MARK} No picture: the pipeline is missing"},
        {"role": "user", "content": "and now?"},
        {"role": "assistant", "content": "a cube"},
        {"role": "assistant", "content": f"{PICTURE_MARK} drawing the picture: step 3/20"},  # stopped mid-picture
        {"role": "user", "content": "one more"},
        {"role": "assistant", "content": f"{PICTURE_MARK} drawing the picture: step 1/20"},  # a stopped picture alone
    ]
    conv = normalise_history(history)
    assert conv.turns == [Turn("draw it", ""), Turn("what shape is it?", "a torus"), Turn("and now?", "a cube"),
                          Turn("one more", "")]
    assert conv.files == ["/t/bell.wav"]
