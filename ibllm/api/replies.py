"""The API's answers in OpenAI's shapes: one ``chat.completion`` object, or server-sent ``chat.completion.chunk``
events ending with ``data: [DONE]``; both carry ``usage``, the whole one also ibllm's timings and neighbours."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from ibllm.api.completion import Completion
from ibllm.api.errors import ApiError
from ibllm.types import ChatEvent


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
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text, "refusal": None},
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
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            delta = self.first
            while delta is not None:
                if delta:
                    yield self._chunk({"content": delta})
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
