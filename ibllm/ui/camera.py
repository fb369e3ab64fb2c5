"""Live capture: the webcam as a source of photos and short videos for the message being written.

Gradio's ``MultimodalTextbox`` offers the paper clip and the microphone only, so the camera has its own fold right
under the chat box. A photo taken or a clip recorded there is added to the message's files exactly as an upload
would be, and from then on follows the same path (detection, the inputs panel, the engine). Nothing is mirrored:
the model sees what the camera sees (mirroring a webcam video would also need an ffmpeg binary on the server).
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from ibllm.ui.history import message_parts

# What the browser asks the camera for. The encoders see 224 px crops, so a VGA frame loses nothing the model could
# use, and the browser encodes and uploads a fraction of what a 4K webcam would give.
WEBCAM = gr.WebcamOptions(mirror=False, constraints={"video": {"width": {"ideal": 640}, "height": {"ideal": 480}}})


def add_capture(path: str | None, message: Any) -> tuple[Any, Any]:
    """The textbox value with ``path`` added to its files, and the capture widget emptied for the next one."""
    if not path:  # the widget was cleared (by us or by its own x button): nothing to add
        return gr.skip(), gr.skip()
    text, files = message_parts(message)
    if path not in files:
        files = [*files, path]
    return {"text": text, "files": files}, None


def camera_fold(textbox: gr.MultimodalTextbox) -> tuple[gr.Image, gr.Video]:
    """The camera fold (a photo and a short video from the webcam), wired to add each capture to ``textbox``."""
    internal = {"show_progress": "hidden", "api_visibility": "undocumented"}
    fold = gr.Accordion("Camera: take a photo or record a short video", open=False, elem_id="ibllm-camera")
    with fold, gr.Row(equal_height=True):
        photo = gr.Image(sources=["webcam"], type="filepath", label="photo", height=260,
                         webcam_options=WEBCAM, elem_id="ibllm-camera-photo")
        # The video loader samples 5 clips of 2 s from any length; a few seconds of recording is enough.
        clip = gr.Video(sources=["webcam"], label="short video (a few seconds is enough)", height=260,
                        include_audio=True, webcam_options=WEBCAM,
                        elem_id="ibllm-camera-video")
    photo.input(add_capture, [photo, textbox], [textbox, photo], **internal)
    clip.change(add_capture, [clip, textbox], [textbox, clip], **internal)
    return photo, clip
