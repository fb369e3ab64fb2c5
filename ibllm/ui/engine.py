"""What the UI needs from the engine (``ibllm.model.ImageBindLLM`` provides it): the UI depends on this protocol
only, never on tensors."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, runtime_checkable

from ibllm.types import (
    Attachment,
    CacheOptions,
    ChatEvent,
    GenerationOptions,
    ModelInfo,
    Neighbour,
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
