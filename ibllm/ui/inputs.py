"""The inputs panel and how each input is read and weighed: detection, the API's weights/modalities, attachments.

The inputs themselves, with the person's choices, are part of the session (``ibllm.ui.session.ChatSession``, one
``gr.State``). An attachment is identified by its path: Gradio stores each upload under a content-hash folder, so
one file keeps one path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import gradio as gr

import ibllm.ui.previews as previews
from ibllm.bind import is_mix_weight
from ibllm.engine import ChatEngine
from ibllm.kinds import KINDS
from ibllm.media.digest import file_digest
from ibllm.media.errors import MediaError
from ibllm.types import Attachment
from ibllm.ui.session import ChatSession, SessionInput, modality_choices


class RequestError(ValueError):
    """Malformed API weights or modalities: reported in the chat like a media problem, but no file is at fault."""


class Detector:
    """Each file's modality (or why it is unusable), remembered so panel refreshes do not re-read files.

    ``hints`` (sha256 of the content → modality) name what detection cannot know, e.g. that a gallery PNG is a
    thermal image; they are matched by content because Gradio hands over copies of example files.
    """

    def __init__(self, engine: ChatEngine, hints: Mapping[str, str] | None = None, capacity: int = 1024) -> None:
        self.engine = engine
        self.hints = dict(hints or {})
        self._hint_sizes: set[int] = set()
        self.capacity = capacity
        self._known: dict[tuple[str, int, int], tuple[str, str]] = {}

    def add_hint(self, path: str, modality: str) -> None:
        self.hints[file_digest(path)] = modality
        self._hint_sizes.add(os.path.getsize(path))

    def _detect(self, path: str, size: int) -> str:
        detected = self.engine.detect(path)
        if size in self._hint_sizes:  # only files of a hinted size are hashed
            hinted = self.hints.get(file_digest(path))
            if hinted in modality_choices(path, detected):
                return hinted
        return detected

    def __call__(self, path: str) -> tuple[str, str]:
        """(modality, "") or ("", readable error)."""
        try:
            st = os.stat(path)
        except OSError:
            return "", f"{os.path.basename(path)} is no longer available; attach it again."
        key = (path, st.st_size, st.st_mtime_ns)
        if key not in self._known:
            try:
                result = (self._detect(path, st.st_size), "")
            except MediaError as e:
                result = ("", str(e))
            if len(self._known) >= self.capacity:
                self._known.pop(next(iter(self._known)))
            self._known[key] = result
        return self._known[key]


# Weights and modalities as API callers give them: JSON text (the /chat endpoint) or its parsed value (the
# OpenAI-compatible API's extension field, batch files).
Given = str | Mapping | Sequence | None


def _parsed(given: Given, what: str, example: str) -> object:
    if not isinstance(given, str):
        return given
    if not given.strip():
        return None
    try:
        return json.loads(given)
    except json.JSONDecodeError as e:
        raise RequestError(f"{what} must be JSON such as {example}: {e}") from e


def parse_weights(given: Given) -> dict[str, float] | list[float]:
    """Weights given through the API: an object keyed by file name, modality or position, or a list (as JSON text
    or already parsed).

    Raises ``RequestError`` (shown in the chat) when it is neither.
    """
    value = _parsed(given, "weights", '{"photo.png": 1.0, "audio": 0.5} or [1.0, 0.5]')
    if not value:
        return {}
    numbers = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else None
    if numbers is None or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
        raise RequestError('weights must map file names, modalities or positions to numbers, e.g. {"audio": 0.5}')
    if not all(is_mix_weight(v) for v in numbers):
        raise RequestError(f"weights must be finite numbers >= 0 (0 leaves an input out), got {json.dumps(value)}")
    if isinstance(value, list):
        return [float(v) for v in value]
    return {str(k): float(v) for k, v in value.items()}


def parse_modalities(given: Given) -> dict[str, str] | list[str]:
    """Modalities given through the API: an object keyed by file name or position, or a list (JSON text or
    parsed)."""
    value = _parsed(given, "modalities", '{"scan.png": "depth"} or ["image", "depth"]')
    if not value:
        return {}
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
        return {str(k): v for k, v in value.items()}
    raise RequestError('modalities must map file names or positions to modality names, e.g. {"scan.png": "depth"}')


def resolve_modality(index: int, item: SessionInput, given: Mapping[str, str] | Sequence[str]) -> str:
    """The kind an input is read as: the API's (by position, file name or path), else the session's."""
    if isinstance(given, Sequence):
        wanted = given[index] if index < len(given) else None
    else:
        wanted = given.get(str(index)) or given.get(item.name) or given.get(item.path)
    if wanted is not None:
        if wanted not in item.choices:
            raise RequestError(f"{item.name} cannot be read as {wanted}; it can be read as "
                               f"{' or '.join(item.choices)}.")
        return wanted
    return item.modality


def resolve_weight(index: int, item: SessionInput, modality: str,
                   given: Mapping[str, float] | Sequence[float]) -> float:
    """The weight of one input: an explicit API weight (position, file name, path, kind) beats the slider's."""
    if isinstance(given, Sequence):
        if index < len(given):
            return float(given[index])
    else:
        for key in (str(index), item.name, item.path, modality):
            if key in given:
                return float(given[key])
    return item.weight


def _check_keys(what: str, given: Mapping | Sequence, inputs: Sequence[SessionInput], kinds_too: bool = False) -> None:
    """RequestError for an API weight or modality that names no input (a misspelt file name was silently ignored).
    A weight keyed by a kind of input (``"audio"``) may name a kind the conversation has none of."""
    names = ", ".join(f"{i}: {item.name}" for i, item in enumerate(inputs)) or "none"
    if isinstance(given, Sequence):
        if len(given) > len(inputs):
            raise RequestError(f"{what} gives {len(given)} values for {len(inputs)} input(s) ({names})")
        return
    known = {k for i, item in enumerate(inputs) for k in (str(i), item.name, item.path)}
    unknown = [k for k in given if k not in known and not (kinds_too and k in KINDS)]
    if unknown:
        raise RequestError(f"{what}: {', '.join(map(repr, unknown))} names no input of this conversation; its "
                           f"inputs (position: file name) are {names}")


def plan_attachments(inputs: Sequence[SessionInput], weights_text: Given = None,
                     modalities_text: Given = None) -> list[Attachment]:
    """The engine's attachments for ``inputs``, in order, read and weighed as the session and the API say; weight 0
    drops an input, as the mixing sliders promise.

    Raises MediaError for an input that cannot be used, RequestError for malformed API weights/modalities.
    """
    given_modalities = parse_modalities(modalities_text)
    modalities = []
    for i, item in enumerate(inputs):
        if item.error or not item.kind:
            raise MediaError(item.error or f"{item.name} cannot be used.")
        modalities.append(resolve_modality(i, item, given_modalities))
    given_weights = parse_weights(weights_text)
    _check_keys("weights", given_weights, inputs, kinds_too=True)
    _check_keys("modalities", given_modalities, inputs)
    out = []
    for i, (item, modality) in enumerate(zip(inputs, modalities, strict=True)):
        w = max(0.0, resolve_weight(i, item, modality, given_weights))
        if w > 0:
            out.append(Attachment(path=item.path, modality=modality, weight=w))
    return out


def _preview(item: SessionInput) -> None:
    p = previews.make_preview(item.path, item.modality)
    key = f"preview-{p.kind}-{item.path}"
    if p.kind != "model3d" and "point" in item.choices:
        # A file that can be read as a point cloud keeps its 3D view, hidden, while it is read as something else.
        # Re-drawn without it, Gradio's page handed the 3D view the new preview's value (a plot, an image) and its
        # script threw, freezing the page: "read as" point cloud -> IMU trace on a (T, 6) array (Gradio 6.x).
        gr.Model3D(None, visible=False, key=f"preview-model3d-{item.path}")
    if p.kind == "image":
        gr.Image(p.value, show_label=False, height=140, interactive=False, key=key)
    elif p.kind == "video":
        gr.Video(p.value, show_label=False, height=160, interactive=False, key=key)
    elif p.kind == "audio":
        gr.Audio(p.value, show_label=False, interactive=False, key=key)
    elif p.kind == "model3d":
        gr.Model3D(p.value, display_mode="point_cloud", show_label=False, height=200, clear_color=(0, 0, 0, 0),
                   key=key)
    elif p.kind == "plot":
        gr.Plot(p.value, show_label=False, key=key)
    elif p.kind == "text":
        gr.Textbox(p.value, show_label=False, lines=3, max_lines=8, interactive=False, key=key)
    if p.note:
        gr.Markdown(f"<small>{p.note}</small>")


def render_panel(demo: gr.Blocks, session: gr.State, layout: gr.State) -> None:
    """Render the inputs panel: per input its preview, kind (*read as* where there is a choice), weight slider and a
    remove button.

    Re-drawn when ``layout`` (``ChatSession.layout()``, written beside the session by every event that changes what
    the panel shows) changes; moving a slider writes the session's weight without a re-draw.
    """

    @gr.render(inputs=[session], triggers=[layout.change, demo.load])
    def _panel(current: ChatSession) -> None:
        if not current.inputs:
            gr.Markdown("No inputs yet. Attach files with the paper clip (or record with the microphone); they stay "
                        "part of the conversation until you remove them here or clear the chat.")
            return
        gr.Markdown("Weights are relative (normalised to sum 1); 0 leaves an input out.")
        for item in current.inputs:
            path = item.path
            with gr.Column(variant="panel", key=f"group-{path}"):
                if item.error:
                    gr.Markdown(f"⚠️ **{item.name}**: {item.error}")
                    continue
                status = "" if item.sent else " · *sent with your next message*"
                icon = KINDS[item.modality].icon if item.modality in KINDS else "📎"
                gr.Markdown(f"{icon} **{item.name}** · {item.modality}{status}", key=f"title-{path}")
                _preview(item)
                if len(item.choices) > 1:
                    read_as = gr.Radio(item.choices, value=item.modality, label="read as", interactive=True,
                                       key=f"as-{path}")

                    def set_read_as(kind: str, s: ChatSession, path: str = path) -> tuple[ChatSession, tuple]:
                        s = s.with_read_as(path, kind)
                        return s, s.layout()

                    read_as.input(set_read_as, [read_as, session], [session, layout], show_progress="hidden",
                                  api_visibility="undocumented")
                with gr.Row():
                    slider = gr.Slider(0, 1, value=item.weight, step=0.05, label="weight", scale=4, interactive=True,
                                       key=f"weight-{path}")
                    remove = gr.Button("Remove", size="sm", scale=1, min_width=60, key=f"remove-{path}")

                def set_weight(value: float, s: ChatSession, path: str = path) -> ChatSession:
                    return s.with_weight(path, value)

                def drop(s: ChatSession, path: str = path) -> tuple[ChatSession, tuple]:
                    s = s.without([path])
                    return s, s.layout()

                slider.change(set_weight, [slider, session], [session], queue=False, show_progress="hidden",
                              api_visibility="undocumented")
                # queued: an unqueued event would not fire layout.change, and the panel would not re-draw
                remove.click(drop, [session], [session, layout], show_progress="hidden",
                             api_visibility="undocumented")
