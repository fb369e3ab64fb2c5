"""One person's conversation as one value: its inputs, the files taken out of it and the turns so far.

The whole session lives in a single ``gr.State`` (Gradio deep-copies its initial value for each browser tab and each
``gradio_client`` session). It is plain, immutable data: every change makes a new ``ChatSession``, so an answer still
streaming keeps the session it started with while a slider writes a newer one, and Gradio's change detection (a
hash of the value) sees exactly when it changed.

What the person chose lives only here: each input's mixing weight and *read as* choice, and the removed files.
The rest follows the chat: ``gr.ChatInterface`` owns the displayed messages (undo, retry, edit and clear change
them), so ``follow`` rebuilds the inputs and turns from those messages and the textbox, keeping the choices of every
file that is still there.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from ibllm.kinds import KINDS
from ibllm.media.detect import array_kinds
from ibllm.media.errors import MediaError
from ibllm.types import Turn
from ibllm.ui.history import Conversation, unique

DEFAULT_WEIGHT = 1.0

# path -> (media kind, "") or ("", why the file cannot be used): what ``inputs.Detector`` answers.
Detect = Callable[[str], tuple[str, str]]


def modality_choices(path: str, detected: str) -> list[str]:
    """The media kinds a file could be read as: the detected one first, then the others its extension allows
    (a PNG can be a photo, a depth map or a thermal image; detection never guesses thermal) and, for an array,
    its shape allows."""
    ext = os.path.splitext(path)[1].lower()
    others = [k.name for k in KINDS.values() if ext in k.extensions and k.name != detected]
    if ext in (".npy", ".npz"):
        fits = _array_kinds(path, *_version(path))
        others = [k for k in others if fits is None or k in fits]
    return [detected, *others]


def _version(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=256)
def _array_kinds(path: str, size: int, mtime_ns: int) -> tuple[str, ...] | None:
    """``array_kinds`` once per file version (the panel asks on every re-draw); None when the header is unreadable
    (the loader then says why)."""
    try:
        return tuple(array_kinds(path))
    except MediaError:
        return None


@dataclass(frozen=True)
class SessionInput:
    """One file of the conversation (or waiting in the textbox) and what the person chose for it."""

    path: str
    kind: str = ""  # the detected media kind; "" when the file cannot be used
    error: str = ""  # why it cannot be used
    read_as: str = ""  # the kind picked where a file can be read several ways; "" = as detected
    weight: float = DEFAULT_WEIGHT  # mixing weight (relative; 0 leaves the input out)
    sent: bool = True  # part of the conversation; False while it waits in the textbox for the next message

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def choices(self) -> list[str]:
        """What it can be read as (the detected kind first); none when it cannot be used."""
        return modality_choices(self.path, self.kind) if self.kind else []

    @property
    def modality(self) -> str:
        """The kind it is read as: the person's choice when it is one of ``choices``, else the detected one."""
        return self.read_as if self.read_as and self.read_as in self.choices else self.kind


@dataclass(frozen=True)
class ChatSession:
    """The conversation of one session: inputs in order (the conversation's files, then the textbox's), the paths
    taken out of it (removed in the panel, or left out after they failed), and the turns the model sees."""

    inputs: tuple[SessionInput, ...] = ()
    removed: tuple[str, ...] = ()
    history: tuple[Turn, ...] = ()

    def input(self, path: str) -> SessionInput | None:
        return next((i for i in self.inputs if i.path == path), None)

    @property
    def sent(self) -> list[SessionInput]:
        """The inputs that are part of the conversation (every one the next answer reads, unless weighted 0)."""
        return [i for i in self.inputs if i.sent]

    def follow(self, conversation: Conversation, pending: Sequence[str], detect: Detect) -> ChatSession:
        """The session after the chat changed: the conversation's files (sent), then ``pending`` (the textbox's);
        removed files left out; files seen before keep their weight and *read as* choice."""
        inputs = []
        for path in unique([*conversation.files, *pending]):
            if path in self.removed:
                continue
            kind, error = detect(path)
            before = self.input(path)
            inputs.append(SessionInput(path=path, kind=kind, error=error, read_as=before.read_as if before else "",
                                       weight=before.weight if before else DEFAULT_WEIGHT,
                                       sent=path in conversation.files))
        return replace(self, inputs=tuple(inputs), history=tuple(conversation.turns))

    def _with_input(self, path: str, **changes: object) -> ChatSession:
        return replace(self, inputs=tuple(replace(i, **changes) if i.path == path else i for i in self.inputs))

    def with_weight(self, path: str, weight: float) -> ChatSession:
        return self._with_input(path, weight=max(0.0, float(weight)))

    def with_read_as(self, path: str, kind: str) -> ChatSession:
        """Read ``path`` as ``kind`` (ignored unless it is one of the file's choices)."""
        current = self.input(path)
        if current is None or kind not in current.choices:
            return self
        return self._with_input(path, read_as=kind)

    def without(self, paths: Iterable[str]) -> ChatSession:
        """The session with ``paths`` taken out of the conversation (for good: they stay out in later turns)."""
        gone = unique(paths)
        return replace(self, inputs=tuple(i for i in self.inputs if i.path not in gone),
                       removed=tuple(unique([*self.removed, *gone])))

    def layout(self) -> tuple[tuple[str, str, str, bool], ...]:
        """What the inputs panel draws, without the weights: it is re-drawn only when this changes (moving a
        weight slider must not re-draw the panel and reload every preview)."""
        return tuple((i.path, i.modality, i.error, i.sent) for i in self.inputs)


__all__ = ["ChatSession", "SessionInput", "DEFAULT_WEIGHT", "modality_choices"]
