"""The conversation's inputs: which files take part, their modality and mixing weight, and the panel that lists them.

An attachment is identified by its path (Gradio stores each upload under a content-hash folder, so one file keeps
one path). Per session four plain values are kept in ``gr.State``: the listed items, the weights chosen with the
sliders (path → weight, default 1), the modalities chosen where a file could be read several ways (a PNG can be a
photo, a depth map or a thermal image), and the paths the person removed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import gradio as gr

import ibllm.ui.previews as previews
from ibllm.engine import ChatEngine
from ibllm.kinds import KINDS
from ibllm.media.digest import file_digest
from ibllm.media.errors import MediaError
from ibllm.types import Attachment
from ibllm.ui.history import normalise_history, unique

DEFAULT_WEIGHT = 1.0
class RequestError(ValueError):
    """Malformed API weights or modalities: reported in the chat like a media problem, but no file is at fault."""


@dataclass(frozen=True)
class Item:
    """One row of the inputs panel (kept in ``gr.State`` as a dict)."""

    path: str
    name: str
    modality: str  # "" when the file could not be used
    pending: bool = False  # in the textbox, sent with the next message
    error: str = ""


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


def display_name(path: str) -> str:
    return os.path.basename(path)


def modality_choices(path: str, detected: str) -> list[str]:
    """The modalities a file could be read as: the detected one first, then the others its extension allows
    (a PNG can be a photo, a depth map or a thermal image; detection never guesses thermal)."""

    ext = os.path.splitext(path)[1].lower()
    others = [k.name for k in KINDS.values() if ext in k.extensions and k.name != detected]
    return [detected, *others]


def collect_items(detect: Detector, history: Sequence[Any] | None, pending: Sequence[str],
                  removed: Sequence[str], chosen: Mapping[str, str] | None = None) -> list[dict]:
    """The panel's rows: files of the conversation, then the ones waiting in the textbox; removed ones left out.

    ``chosen`` holds modalities picked by the person (path → modality); they override detection.
    """
    conversation_files = normalise_history(history).files
    rows = []
    for path in unique([*conversation_files, *pending]):
        if path in removed:
            continue
        modality, error = detect(path)
        if modality and chosen and chosen.get(path) in modality_choices(path, modality):
            modality = chosen[path]
        rows.append(asdict(Item(path=path, name=display_name(path), modality=modality,
                                pending=path not in conversation_files, error=error)))
    return rows


def parse_weights(text: str | None) -> dict[str, float] | list[float]:
    """Weights given through the API: a JSON object keyed by file name, modality or position, or a JSON list.

    Raises ``RequestError`` (shown in the chat) when the text is not such JSON.
    """
    if not text or not str(text).strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(f'weights must be JSON such as {{"photo.png": 1.0, "audio": 0.5}} or [1.0, 0.5]: {e}') from e
    if isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
        return [float(v) for v in value]
    if isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()):
        return {str(k): float(v) for k, v in value.items()}
    raise RequestError('weights must map file names, modalities or positions to numbers, e.g. {"audio": 0.5}')


def parse_modalities(text: str | None) -> dict[str, str] | list[str]:
    """Modalities given through the API: a JSON object keyed by file name or position, or a JSON list."""
    if not text or not str(text).strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(f'modalities must be JSON such as {{"scan.png": "depth"}} or ["image", "depth"]: {e}') from e
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
        return {str(k): v for k, v in value.items()}
    raise RequestError('modalities must map file names or positions to modality names, e.g. {"scan.png": "depth"}')


def resolve_modality(index: int, path: str, detected: str, chosen: Mapping[str, str],
                     given: Mapping[str, str] | Sequence[str]) -> str:
    """The modality an input is read as: the API's, else the one picked in the panel, else the detected one."""
    wanted = None
    if isinstance(given, Sequence):
        wanted = given[index] if index < len(given) else None
    else:
        wanted = given.get(str(index)) or given.get(display_name(path)) or given.get(path)
    allowed = modality_choices(path, detected)
    if wanted is not None:
        if wanted not in allowed:
            raise RequestError(f"{display_name(path)} cannot be read as {wanted}; it can be read as "
                             f"{' or '.join(allowed)}.")
        return wanted
    return chosen[path] if chosen.get(path) in allowed else detected


def resolve_weight(index: int, path: str, modality: str, session: Mapping[str, float],
                   given: Mapping[str, float] | Sequence[float]) -> float:
    """The weight of one input: an explicit API weight (position, file name, modality) beats the slider's."""
    if isinstance(given, Sequence):
        if index < len(given):
            return float(given[index])
    else:
        for key in (str(index), display_name(path), path, modality):
            if key in given:
                return float(given[key])
    return float(session.get(path, DEFAULT_WEIGHT))


def engine_attachments(paths: Sequence[str], modalities: Mapping[str, str], session: Mapping[str, float],
                       given: Mapping[str, float] | Sequence[float] = ()) -> list[Attachment]:
    """Attachments for the engine, in order; weight 0 drops an input, as the mixing sliders promise."""
    out = []
    for i, path in enumerate(paths):
        w = max(0.0, resolve_weight(i, path, modalities[path], session, given))
        if w > 0:
            out.append(Attachment(path=path, modality=modalities[path], weight=w))
    return out


def _preview(item: Mapping[str, Any]) -> None:
    p = previews.make_preview(item["path"], item["modality"])
    key = f"preview-{item['path']}"
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


def render_panel(demo: gr.Blocks, items: gr.State, weights: gr.State, modalities: gr.State,
                 removed: gr.State) -> None:
    """Render the inputs panel: per input its preview, modality, weight slider and a remove button.

    Re-rendered only when the item list changes; moving a slider writes the weights state without a re-render.
    """

    @gr.render(inputs=[items, weights], triggers=[items.change, demo.load])
    def _panel(rows: list[dict], session_weights: dict[str, float]) -> None:
        if not rows:
            gr.Markdown("No inputs yet. Attach files with the paper clip (or record with the microphone); they stay "
                        "part of the conversation until you remove them here or clear the chat.")
            return
        gr.Markdown("Weights are relative (normalised to sum 1); 0 leaves an input out.")
        for row in rows:
            path = row["path"]
            with gr.Column(variant="panel", key=f"group-{path}"):
                if row["error"]:
                    gr.Markdown(f"⚠️ **{row['name']}**: {row['error']}")
                    continue
                status = " · *sent with your next message*" if row["pending"] else ""
                icon = KINDS[row["modality"]].icon if row["modality"] in KINDS else "📎"
                gr.Markdown(f"{icon} **{row['name']}** · {row['modality']}{status}", key=f"title-{path}")
                _preview(row)
                choices = modality_choices(path, row["modality"])
                if len(choices) > 1:
                    as_modality = gr.Radio(choices, value=row["modality"], label="read as", interactive=True,
                                           key=f"as-{path}")

                    def set_modality(value: str, current: dict[str, str], current_rows: list[dict],
                                     path: str = path) -> tuple[dict[str, str], list[dict]]:
                        rows_ = [{**r, "modality": value} if r["path"] == path else r for r in current_rows]
                        return {**current, path: value}, rows_

                    as_modality.input(set_modality, [as_modality, modalities, items], [modalities, items],
                                      show_progress="hidden", api_visibility="undocumented")
                with gr.Row():
                    slider = gr.Slider(0, 1, value=session_weights.get(path, DEFAULT_WEIGHT), step=0.05,
                                       label="weight", scale=4, interactive=True, key=f"weight-{path}")
                    remove = gr.Button("Remove", size="sm", scale=1, min_width=60, key=f"remove-{path}")

                def set_weight(value: float, current: dict[str, float], path: str = path) -> dict[str, float]:
                    return {**current, path: float(value)}

                def drop(current_removed: list[str], current_rows: list[dict],
                         path: str = path) -> tuple[list[str], list[dict]]:
                    return [*current_removed, path], [r for r in current_rows if r["path"] != path]

                slider.change(set_weight, [slider, weights], [weights], queue=False, show_progress="hidden",
                             api_visibility="undocumented")
                # queued: an unqueued event would not fire items.change, and the panel would not re-render
                remove.click(drop, [removed, items], [removed, items], show_progress="hidden",
                             api_visibility="undocumented")
