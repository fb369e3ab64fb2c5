"""What the UI needs from the engine (``ibllm.model.ImageBindLLM`` provides it), and a stand-in that echoes.

The UI depends on this protocol only, never on tensors; ``EchoEngine`` implements it with plain Python so the
interface can be developed and its wiring tested without weights.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, runtime_checkable

from ibllm.media.errors import MediaError
from ibllm.types import (
    Attachment,
    CacheOptions,
    ChatEvent,
    GenerationOptions,
    ModelInfo,
    Neighbour,
    Timings,
    Turn,
)


@runtime_checkable
class ChatEngine(Protocol):
    info: ModelInfo

    def detect(self, path: str) -> str: ...

    def chat(self, message: str, *, history: Sequence[Turn], attachments: Sequence[Attachment],
             cache: CacheOptions, generation: GenerationOptions,
             should_stop: Callable[[], bool] | None = None) -> Iterator[ChatEvent]: ...

    def neighbours(self, attachments: Sequence[Attachment], cache: CacheOptions) -> list[Neighbour]: ...


_EXTENSIONS = {
    "image": (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"),
    "video": (".mp4", ".webm", ".avi", ".mov", ".mkv"),
    "audio": (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".aac"),
    "point": (".ply", ".pcd", ".xyz", ".pts", ".obj"),
    "imu": (".csv",),
    "text": (".txt", ".md"),
}


def _check_image(path: str) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError) as e:
        raise MediaError(f"{os.path.basename(path)} is not a readable image ({e}).") from e


class EchoEngine:
    """Answers by describing what it was given, one word per event (``delay`` seconds apart).

    Modality comes from the extension, with ``depth``/``thermal``/``imu`` recognised from the file name
    (``*depth*.png``, ``*thermal*.png``, ``*imu*.npy``); empty files and images PIL cannot read raise
    ``MediaError`` like a real loader.
    """

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.info = ModelInfo(name="echo", weights="no weights: the UI's stand-in engine", device="cpu",
                              dtype="-", is_default=True, trained=False, cache_entries=3,
                              how_to_load_real="python app.py --llama-dir ... --adapter ...")

    def detect(self, path: str) -> str:
        name = os.path.basename(path).lower()
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            raise MediaError(f"{os.path.basename(path)} is empty or unreadable.")
        for hint in ("depth", "thermal", "imu"):
            if hint in name:
                return hint
        if name.endswith(".npy"):
            return "point"
        for modality, extensions in _EXTENSIONS.items():
            if name.endswith(extensions):
                if modality == "image":
                    _check_image(path)
                return modality
        raise MediaError(f"{os.path.basename(path)}: unsupported file type.")

    def chat(self, message: str, *, history: Sequence[Turn], attachments: Sequence[Attachment],
             cache: CacheOptions, generation: GenerationOptions,
             should_stop: Callable[[], bool] | None = None) -> Iterator[ChatEvent]:
        for a in attachments:
            self.detect(a.path)
        t0 = time.perf_counter()
        seen = ", ".join(f"{a.modality} {a.weight:.2f}" for a in attachments) or "nothing"
        words = f"turn {len(history) + 1}: I see {seen}; cache {'on' if cache.enabled else 'off'}; you said {message}"
        text = ""
        for i, word in enumerate(words.split(" ")[: generation.max_new_tokens]):
            if should_stop is not None and should_stop():
                break
            if self.delay:
                time.sleep(self.delay)
            delta = word if i == 0 else " " + word
            text += delta
            yield ChatEvent(delta=delta, text=text)
        timings = Timings(decode=time.perf_counter() - t0, new_tokens=len(text.split()))
        yield ChatEvent(text=text, done=True, timings=timings,
                        neighbours=self.neighbours(attachments, cache) if cache.enabled else [])

    def neighbours(self, attachments: Sequence[Attachment], cache: CacheOptions) -> list[Neighbour]:
        if not attachments:
            return []
        return [Neighbour(index=i, similarity=0.9 - 0.1 * i, caption=f"entry {i}") for i in range(min(3, cache.size))]
