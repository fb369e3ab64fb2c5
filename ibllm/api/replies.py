"""The API's answers in OpenAI's shapes: one ``chat.completion`` object, or server-sent ``chat.completion.chunk``
events ending with ``data: [DONE]``; both carry ``usage``, the whole one also ibllm's timings and neighbours.

A picture answer goes in ibllm's extension where OpenAI's message would carry it: ``message.ibllm.picture`` (a whole
answer) or ``delta.ibllm.picture`` (a chunk of its own after the text, before the finish chunk), as a PNG data URL
with the seed it was drawn with; while it is drawn, chunks with ``delta.ibllm.picture_progress`` say how far.
"""

from __future__ import annotations

import base64
import io
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool

from ibllm.api.completion import Completion
from ibllm.api.errors import ApiError
from ibllm.types import ChatEvent, PictureEvent


def png_data_url(image: Any) -> str:
    """A PIL image as a ``data:image/png;base64,...`` URL."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def picture_json(event: PictureEvent) -> dict[str, Any]:
    """The drawn picture (``event.done``) as the API sends it. The PNG is encoded on a worker thread: hundreds of
    milliseconds for a full-size picture, which the event loop (and the decode thread, through the GIL) would wait."""
    t = event.timings
    return {"url": await run_in_threadpool(png_data_url, event.image), "seed": event.seed,
            "width": event.image.width, "height": event.image.height, "steps": t.steps,
            "timings": {"encode": t.encode, "queued": t.queued, "load": t.load, "denoise": t.denoise,
                        "decode": t.decode}}


def picture_progress(event: PictureEvent) -> dict[str, Any]:
    return {"step": event.step, "steps": event.steps, "queue_position": event.queue_position,
            "loading": event.loading, "seed": event.seed}


class Reply:
    """One request's answer in OpenAI's shapes: a ``chat.completion`` or a stream of ``chat.completion.chunk``."""

    def __init__(self, completion: Completion, first: str | None, *, model: str, budget: Callable[[int], int],
                 include_usage: bool = False):
        """``first``: the completion's first delta (already taken: it told whether the files could be used);
        ``budget``: prompt tokens -> the answer tokens the engine allows (to tell "length" from "stop")."""
        self.completion, self.first, self.model = completion, first, model
        self.budget, self.include_usage = budget, include_usage
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _finish_reason(self, last: ChatEvent) -> str:
        if self.completion.answer.stopped_by_string:
            return "stop"
        return "length" if last.timings.new_tokens >= self.budget(last.timings.prompt_tokens) else "stop"

    def _usage(self, last: ChatEvent) -> dict[str, int]:
        t = last.timings
        return {"prompt_tokens": t.prompt_tokens, "completion_tokens": t.new_tokens,
                "total_tokens": t.prompt_tokens + t.new_tokens}

    def _extension(self, last: ChatEvent) -> dict[str, Any]:
        t = last.timings
        timings = {"encode": t.encode, "retrieve": t.cache, "bind": t.bind, "queued": t.queued,
                   "prefill": t.prefill, "decode": t.decode, "decode_tokens_per_s": t.decode_tokens_per_s}
        neighbours = [{"index": n.index, "similarity": n.similarity, "caption": n.caption} for n in last.neighbours]
        return {"timings": timings, "neighbours": neighbours, "notes": list(last.notes)}

    async def whole(self) -> dict[str, Any]:
        delta = self.first
        try:
            while delta is not None:
                delta = await self.completion.next_delta()
        finally:
            self.completion.cancel()  # a no-op once the answer is complete; frees the slot if this was cancelled
        answer = self.completion.answer
        message: dict[str, Any] = {"role": "assistant", "content": answer.text, "refusal": None}
        if answer.picture is not None and answer.picture.done:
            message["ibllm"] = {"picture": await picture_json(answer.picture)}
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": message,
                             "logprobs": None, "finish_reason": self._finish_reason(answer.last)}],
                "usage": self._usage(answer.last), "ibllm": self._extension(answer.last)}

    def _chunk(self, delta: dict[str, Any] | None, finish_reason: str | None = None,
               usage: dict[str, int] | None = None) -> str:
        """One event; ``delta`` None: the usage chunk (no choices) that ``stream_options.include_usage`` asks for."""
        choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                             "finish_reason": finish_reason}]
        chunk: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                 "model": self.model, "choices": choices}
        if self.include_usage:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n"

    async def chunks(self) -> AsyncIterator[str]:
        """Server-sent events: a role chunk, content chunks, a finish chunk (a usage chunk when asked), [DONE].
        While the answer waits for a decode slot, SSE comments say where it is in line. A client that goes away
        ends this generator (Starlette cancels it), which stops the answer and frees its slot."""
        completion = self.completion
        shown: PictureEvent | None = None  # the picture event last sent
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            delta = self.first
            while delta is not None:
                picture = completion.answer.picture
                if delta:
                    yield self._chunk({"content": delta})
                elif picture is not None and picture is not shown:
                    shown = picture
                    extension = {"picture": await picture_json(picture)} if picture.done else \
                        {"picture_progress": picture_progress(picture)}
                    yield self._chunk({"ibllm": extension})
                elif completion.queue_position:
                    yield f": waiting for a free decode slot, {completion.queue_position - 1} ahead\n\n"
                try:
                    delta = await completion.next_delta()
                except Exception as e:  # noqa: BLE001 - the engine failed mid-answer: an error event, as OpenAI's
                    yield f"data: {json.dumps(ApiError(500, f'{type(e).__name__}: {e}').body())}\n\n"
                    return
            last = completion.answer.last
            yield self._chunk({}, self._finish_reason(last))
            if self.include_usage:
                yield self._chunk(None, usage=self._usage(last))
            yield "data: [DONE]\n\n"
        finally:
            completion.cancel()
