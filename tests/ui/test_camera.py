"""The webcam fold's handler: a capture joins the message being written, under a name that tells captures apart."""

from __future__ import annotations

import re
from pathlib import Path

import gradio as gr

from ibllm.ui.camera import add_capture


def test_a_capture_joins_the_message_under_its_own_name(tmp_path):
    upload = tmp_path / "cache-a" / "image.png"  # every webcam photo reaches the server under this name
    upload.parent.mkdir()
    upload.write_bytes(b"first")
    message, cleared = add_capture(str(upload), {"text": "What is it?", "files": ["/x/earlier.wav"]}, "photo")
    assert cleared is None  # the widget is emptied for the next photo
    assert message["text"] == "What is it?" and message["files"][0] == "/x/earlier.wav"
    first = Path(message["files"][1])
    assert re.fullmatch(r"webcam-photo-\d{6}\.png", first.name) and first.read_bytes() == b"first"

    upload.write_bytes(b"second")  # the next photo, the same second
    message, _ = add_capture(str(upload), message, "photo")
    second = Path(message["files"][2])
    assert second != first and second.read_bytes() == b"second" and first.read_bytes() == b"first"


def test_clearing_the_widget_adds_nothing():
    assert add_capture(None, {"text": "hi", "files": ["/x/a.png"]}, "video") == (gr.skip(), gr.skip())
