"""The example gallery: ``examples/<toy|real>/gallery.json`` → clickable chat examples (never cached: see NOTES.md)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ibllm.types import ModelInfo

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_GALLERY = REPO / "examples" / "toy" / "gallery.json"  # for the default (embedded toy) model
REAL_GALLERY = REPO / "examples" / "real" / "gallery.json"  # for real ImageBind-LLM weights


def gallery_for(info: ModelInfo) -> Path:
    """The gallery that fits the loaded weights: the toy one for the default model, the real-world one otherwise.

    Never both. The toy model knows nothing outside its world of coloured shapes, and to the real model the toy
    examples are meaningless: low-resolution renders of shapes with quiz questions whose expected words were
    made for the toy model, which would misrepresent what the real one does with ordinary inputs.
    """
    return DEFAULT_GALLERY if info.is_default else REAL_GALLERY


@dataclass(frozen=True)
class Example:
    question: str
    files: list[str]
    modalities: list[str]
    expected: list[str] = field(default_factory=list)
    title: str = ""
    followup: str = ""  # a two-turn example: the question to ask after the first answer

    @property
    def label(self) -> str:
        kinds = " + ".join(dict.fromkeys(m or "file" for m in self.modalities))
        label = f"{kinds}: {self.title or self.question}"
        return f"{label} (then ask: {self.followup})" if self.followup else label

    def message(self) -> dict[str, Any]:
        """The multimodal textbox value the example fills in."""
        return {"text": self.question, "files": list(self.files)}


def _file_entries(entry: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(relative path, modality) pairs from the shapes a gallery entry may use."""
    out: list[tuple[str, str]] = []
    files = entry.get("files", entry.get("inputs", []))
    if isinstance(files, Mapping):  # {"image": "a.png", "audio": "b.wav"}
        return [(str(p), str(m)) for m, p in files.items()]
    for i, f in enumerate(files or []):
        if isinstance(f, str):
            modalities = entry.get("modalities") or []
            out.append((f, str(modalities[i]) if i < len(modalities) else ""))
        elif isinstance(f, Mapping):
            out.append((str(f.get("path") or f.get("file") or ""), str(f.get("modality", ""))))
    return out


def _followup_question(entry: Mapping[str, Any]) -> str:
    followup = entry.get("followup")
    return str(followup.get("question") or "") if isinstance(followup, Mapping) else ""


def load_gallery(path: str | Path = DEFAULT_GALLERY) -> list[Example]:
    """The examples whose files exist; an absent or unreadable gallery gives none (the app still runs)."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        log.warning("ignoring example gallery %s: %s", path, e)
        return []
    entries = data.get("examples", []) if isinstance(data, Mapping) else data
    examples = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, Mapping):
            continue
        pairs = _file_entries(entry)
        files = [str((path.parent / p).resolve()) for p, _ in pairs]
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            log.warning("gallery example skipped, missing %s", missing)
            continue
        question = str(entry.get("question") or entry.get("text") or entry.get("prompt") or "")
        expected = entry.get("expect") or entry.get("expected") or entry.get("expected_words") or []
        examples.append(Example(question=question, files=files, modalities=[m for _, m in pairs],
                                expected=[str(w) for w in (expected if isinstance(expected, list) else [expected])],
                                title=str(entry.get("title") or ""), followup=_followup_question(entry)))
    return examples
