"""Live capture: the webcam as a source of photos and short videos for the message being written.

Gradio's ``MultimodalTextbox`` offers the paper clip and the microphone only, so the camera has its own fold right
under the chat box. A photo taken or a clip recorded there is added to the message's files exactly as an upload
would be, and from then on follows the same path (detection, the inputs panel, the engine). Nothing is mirrored:
the model sees what the camera sees (mirroring a webcam video would also need an ffmpeg binary on the server).
"""

from __future__ import annotations

import functools
import shutil
import time
from pathlib import Path
from typing import Any

import gradio as gr

from ibllm.ui.history import message_parts

# What the browser asks the camera for. The encoders see 224 px crops, so a VGA frame loses nothing the model could
# use, and the browser encodes and uploads a fraction of what a 4K webcam would give.
WEBCAM = gr.WebcamOptions(mirror=False, constraints={"video": {"width": {"ideal": 640}, "height": {"ideal": 480}}})


def named_capture(path: str, kind: str) -> str:
    """A copy of a capture beside it (in Gradio's upload cache) named for what it is and when it was taken: every
    webcam photo arrives as ``image.png`` and every recording as ``sample.webm``, which the chat and the inputs
    panel could not tell apart."""
    src = Path(path)
    stem = f"webcam-{kind}-{time.strftime('%H%M%S')}"
    dst, n = src.with_name(stem + src.suffix), 1
    while dst.exists():
        n += 1
        dst = src.with_name(f"{stem}-{n}{src.suffix}")
    shutil.copyfile(src, dst)
    return str(dst)


def add_capture(path: str | None, message: Any, kind: str) -> tuple[Any, Any]:
    """The textbox value with the capture at ``path`` added to its files, and the capture widget emptied for the
    next one."""
    if not path:  # the widget was cleared (by us or by its own x button): nothing to add
        return gr.skip(), gr.skip()
    text, files = message_parts(message)
    return {"text": text, "files": [*files, named_capture(path, kind)]}, None


def camera_fold(textbox: gr.MultimodalTextbox) -> list[Any]:
    """The camera fold (a photo and a short video from the webcam), wired to add each capture to ``textbox``.

    Returns the two capture events: a value written into the textbox by an event does not fire the textbox's
    own ``.change``, so whatever follows the textbox must also follow these (``.then``)."""
    internal = {"show_progress": "hidden", "api_visibility": "undocumented"}
    fold = gr.Accordion("Camera: take a photo or record a short video", open=False, elem_id="ibllm-camera")
    with fold, gr.Row(equal_height=True):
        photo = gr.Image(sources=["webcam"], type="filepath", label="photo", height=260,
                         webcam_options=WEBCAM, elem_id="ibllm-camera-photo")
        # The video loader samples 5 clips of 2 s from any length; a few seconds of recording is enough.
        clip = gr.Video(sources=["webcam"], label="short video (a few seconds is enough)", height=260,
                        include_audio=True, webcam_options=WEBCAM,
                        elem_id="ibllm-camera-video")
    # A photo is taken by the person (.input); a recording arrives as a change once the browser has uploaded it.
    return [photo.input(functools.partial(add_capture, kind="photo"), [photo, textbox], [textbox, photo], **internal),
            clip.change(functools.partial(add_capture, kind="video"), [clip, textbox], [textbox, clip], **internal)]
