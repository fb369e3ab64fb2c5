"""Chat history as Gradio hands it over → plain turns and file paths.

The same conversation reaches the chat function in several shapes: typed content blocks from the browser
(``{"type": "text", "text": ...}``, ``{"type": "file", "file": {"path": ...}}``), raw strings, tuples and
``{"path": ...}`` dicts from ``gradio_client``, FileData objects or components after an example click. Everything
here accepts all of them, so the rest of the UI only ever sees ``Turn`` objects and path strings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ibllm.types import NEEDS_INPUT, Turn

# Answers that are error reports start with this mark: they stay visible in the chat but are never fed back to the
# model as if it had said them.
ERROR_MARK = "⚠️"
# Progress notes of a picture being drawn start with this mark; a stopped picture leaves its last one in the chat,
# which is the app's, never the model's words.
PICTURE_MARK = "🎨"
# An answer stopped before its first word (while the files were read, or waiting for a slot) says so instead of
# staying an empty bubble; like an error report, it is never fed back to the model, nor is its question.
STOPPED_MARK = "⏹"
STOPPED_BEFORE_ANSWERING = f"{STOPPED_MARK} stopped before answering"


@dataclass
class Conversation:
    """A chat history reduced to what the engine needs."""

    turns: list[Turn] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # every file attached so far, in order of first appearance


def _file_path(item: Any) -> str | None:
    """The path of a file-like content item, or None when it is not one."""
    if isinstance(item, str):
        return None
    if isinstance(item, Mapping):
        if item.get("type") == "file":
            return _file_path(item.get("file"))
        path = item.get("path")
        return str(path) if path else None
    path = getattr(item, "path", None)  # gradio FileData
    if isinstance(path, str) and path:
        return path
    value = getattr(item, "value", None)  # a component (gr.Image(...), gr.Audio(...)) placed in the history
    if value is not None and value is not item:
        return _file_path(value)
    return None


def content_parts(content: Any) -> tuple[list[str], list[str]]:
    """Split one message's content into its texts and file paths, whatever shape it arrived in."""
    texts: list[str] = []
    files: list[str] = []

    def visit(item: Any) -> None:
        if item is None:
            return
        if isinstance(item, str):
            if item.strip():
                texts.append(item)
            return
        if isinstance(item, Mapping):
            if item.get("type") == "text":
                visit(item.get("text"))
                return
            if "files" in item or ("text" in item and "path" not in item and item.get("type") is None):
                # a multimodal textbox value: {"text": ..., "files": [...]}
                for f in item.get("files") or []:
                    path = f if isinstance(f, str) else _file_path(f)
                    if path:
                        files.append(path)
                visit(item.get("text"))
                return
        if isinstance(item, tuple):
            # gradio's legacy ("path", "alt text") file tuple: the first element is the file
            if item and isinstance(item[0], str):
                files.append(item[0])
            else:
                for sub in item:
                    visit(sub)
            return
        if isinstance(item, list):
            for sub in item:
                visit(sub)
            return
        path = _file_path(item)
        if path:
            files.append(path)
        elif hasattr(item, "text"):
            visit(item.text)

    visit(content)
    return texts, files


def _message_fields(message: Any) -> tuple[str | None, Any, Any]:
    if isinstance(message, Mapping):
        return message.get("role"), message.get("content"), message.get("metadata")
    return getattr(message, "role", None), getattr(message, "content", None), getattr(message, "metadata", None)


def normalise_history(history: Sequence[Any] | None) -> Conversation:
    """Fold a Gradio message list into (user, assistant) turns and the files attached along the way.

    Consecutive user messages (Gradio stores each file and the text as separate messages) form one turn; a turn
    whose answer is an error report (or the note of an answer stopped before it began, or the default model's
    ``NEEDS_INPUT`` note) is kept out of ``turns`` so
    the model never sees its own error messages, and so is an error report after the text (a picture that could not
    be drawn). An answer that is a picture alone is a turn with an empty answer.
    Assistant messages with a metadata title (collapsible notes, tool logs) are display-only and skipped.
    """
    conversation = Conversation()
    seen: set[str] = set()
    user_texts: list[str] = []
    answer_texts: list[str] = []
    answered = False  # an answer may be a picture alone (no text)

    def close_turn() -> None:
        nonlocal answered
        answer = "\n".join(answer_texts).strip()
        if (user_texts or answer) and not answer.startswith((ERROR_MARK, STOPPED_MARK)) and answer != NEEDS_INPUT:
            conversation.turns.append(Turn(user="\n".join(user_texts).strip(), assistant=answer))
        user_texts.clear()
        answer_texts.clear()
        answered = False

    for message in history or []:
        role, content, metadata = _message_fields(message)
        texts, files = content_parts(content)
        if role == "user":
            if answered:
                close_turn()
            user_texts.extend(texts)
            for path in files:
                if path not in seen:
                    seen.add(path)
                    conversation.files.append(path)
        elif role == "assistant":
            if isinstance(metadata, Mapping) and metadata.get("title"):
                continue
            answered = True
            # A later message of the same answer that reports an error (no picture) is the app's, not the model's.
            answer_texts.extend(t for t in texts if not t.startswith(PICTURE_MARK)
                                and not (answer_texts and t.startswith(ERROR_MARK)))
    if answered:
        close_turn()
    # a trailing user message without an answer (e.g. the turn being answered) is not a finished turn
    return conversation


def mark_stopped(history: list[Any] | None) -> list[Any] | None:
    """``history`` with a last answer that is still empty (stopped before its first word) replaced by
    ``STOPPED_BEFORE_ANSWERING``; None when there is nothing to change."""
    if not history:
        return None
    role, content, metadata = _message_fields(history[-1])
    texts, files = content_parts(content)
    if role != "assistant" or files or any(t.strip() for t in texts):
        return None
    return [*history[:-1], {"role": "assistant", "content": STOPPED_BEFORE_ANSWERING}]


def message_parts(message: Any) -> tuple[str, list[str]]:
    """The text and files of the message being sent (a multimodal textbox value, a string, or a message dict)."""
    if isinstance(message, Mapping) and "role" in message:
        _, content, _ = _message_fields(message)
        texts, files = content_parts(content)
    else:
        texts, files = content_parts(message)
    return "\n".join(texts).strip(), files


def unique(paths: Iterable[str]) -> list[str]:
    """Paths in order of first appearance, without repeats."""
    out: list[str] = []
    for p in paths:
        if p not in out:
            out.append(p)
    return out
