"""The serving scheduler: concurrent chats decode together in one ``DecodeBatch`` (continuous batching).

Callers ``submit`` a request from their own thread and iterate the ``TokenStream`` they get back. One background
thread runs the loop: admit waiting requests in FIFO order into free slots (the newcomers of one turn of the loop
prefilled together, in one call), then one batched decode step for every live slot, and again; it sleeps while there
is nothing to do. A thread rather than "the first waiting caller drives the loop": a driving caller would stall
everyone whenever its own consumer stops pulling (a slow or vanished HTTP client), and handing the loop over between
callers is harder to get right than one owner.

More requests than slots wait in line; while one waits its stream yields ``Queued(position)`` notices (1 = next in
line), so a UI can say "2 requests ahead". A stream that is closed — or dropped and garbage-collected, as when a
client disconnects — cancels its request: a waiting one leaves the line, a live one frees its slot before the next
step.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from ibllm.config import GenerationConfig
from ibllm.llm.batching import DONE, DecodeBatch, Request

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Queued:
    """The request is waiting for a slot; ``position`` 1 is next in line (position - 1 requests ahead of it)."""

    position: int

    @property
    def ahead(self) -> int:
        return self.position - 1


class TokenStream(Iterator[int | Queued]):
    """One request's output: ``Queued`` notices while it waits, then its token ids. Closing (or dropping) it
    cancels the request."""

    def __init__(self, scheduler: Scheduler, request: Request):
        self._scheduler, self._request = scheduler, request
        self._finished = False

    @property
    def submitted(self) -> float:
        """When it was submitted (``time.perf_counter``)."""
        return self._request.submitted

    @property
    def admitted(self) -> float | None:
        """When its prefill began, once it has a slot."""
        return self._request.admitted

    @property
    def token_times(self) -> list[float]:
        """When each token was made (``time.perf_counter``), as many as have been made so far."""
        return self._request.token_times

    def ready(self) -> bool:
        """Whether the next item is already there (``next`` would not wait)."""
        return not self._request.outbox.empty()

    def __next__(self) -> int | Queued:
        if self._finished:
            raise StopIteration
        item = self._request.outbox.get()
        if item is DONE or isinstance(item, BaseException):
            self._finished = True
            if item is DONE:
                raise StopIteration
            raise item
        return item

    def close(self) -> None:
        if not self._finished:
            self._finished = True
            self._scheduler.cancel(self._request)

    def __del__(self) -> None:  # an abandoned stream (a client gone without closing) must not keep its slot
        self.close()


class Scheduler:
    """Owns a ``DecodeBatch`` and the one thread that runs it; requests wait FIFO for a free slot."""

    def __init__(self, batch: DecodeBatch):
        self.batch = batch
        self._waiting: deque[Request] = deque()
        self._positions: dict[int, int] = {}  # id(request) -> last Queued position sent
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def slots(self) -> int:
        return self.batch.size

    @property
    def waiting(self) -> int:
        """Requests in line for a slot."""
        with self._cond:
            return len(self._waiting)

    def submit(self, prompt: Sequence[int], injection: torch.Tensor | None, options: GenerationConfig, *,
               eos_id: int, should_stop: Callable[[], bool] | None = None) -> TokenStream:
        """Queue a request; its tokens (after any ``Queued`` notices) come out of the returned stream.

        ``should_stop`` is polled by the loop before every step that would serve the request. ValueError at once
        for a prompt that cannot fit."""
        request = Request(prompt, injection, options, eos_id=eos_id, should_stop=should_stop)
        self.batch.check(request)
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            self._waiting.append(request)
            self._announce()
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="ibllm-decode", daemon=True)
                self._thread.start()
                # At interpreter exit the loop is stopped and joined first: a daemon thread killed inside a torch
                # call aborts the process ("terminate called without an active exception", exit status -6).
                ref = weakref.ref(self)
                atexit.register(lambda: (scheduler := ref()) is not None and scheduler.close())
            self._cond.notify()
        return TokenStream(self, request)

    def cancel(self, request: Request) -> None:
        request.cancel()
        with self._cond:
            if request in self._waiting:
                self._waiting.remove(request)
                self._positions.pop(id(request), None)
                request.outbox.put(DONE)
                self._announce()
            self._cond.notify()

    def close(self) -> None:
        """Stop the loop thread; requests still waiting or live end with an error."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _drop_stopped_waiting(self) -> None:
        # A chat stopped while in line (its should_stop turned true) leaves it now, not when a slot frees up: its
        # consumer is blocked waiting for the next item and is released by DONE.
        stopped = [r for r in self._waiting if r.stopped()]
        for request in stopped:
            self._waiting.remove(request)
            self._positions.pop(id(request), None)
            request.outbox.put(DONE)
        if stopped:
            self._announce()

    def _announce(self) -> None:
        """Tell every request that has to wait (no slot free for it) its place in line, when it changed."""
        free = self.batch.free
        for i, request in enumerate(self._waiting):
            position = i + 1 - free
            if position >= 1 and self._positions.get(id(request)) != position:
                self._positions[id(request)] = position
                request.outbox.put(Queued(position))

    def _loop(self) -> None:
        just_prefilled = False
        with torch.no_grad():  # grad mode is per thread: the callers' no_grad does not reach here
            while True:
                with self._cond:
                    while not self._closed and not self._waiting and not self.batch.live:
                        self._cond.wait()
                    if self._closed:
                        break
                    self._drop_stopped_waiting()
                    admitted = []
                    while self._waiting and len(admitted) < self.batch.free:
                        request = self._waiting.popleft()
                        self._positions.pop(id(request), None)
                        admitted.append(request)
                if admitted:
                    try:
                        self.batch.admit(*admitted)  # one prefill for all newcomers of this step
                    except Exception as exc:  # noqa: BLE001 - their consumers get the error, the live ones go on
                        log.exception("prefill failed")
                        for request in admitted:
                            request.outbox.put(exc)
                if admitted:
                    with self._cond:
                        self._announce()
                        # Those who arrived during that prefill get theirs before the step, once: a burst of
                        # arrivals then waits for at most two prefills and no step between them.
                        again = not just_prefilled and bool(self._waiting) and self.batch.free > 0
                    just_prefilled = True
                    if again:
                        continue
                just_prefilled = False
                try:
                    self.batch.step()
                except Exception as exc:  # noqa: BLE001
                    log.exception("decode step failed; ending the %d live requests", self.batch.live)
                    self.batch.fail_all(exc)
        error = RuntimeError("the scheduler was closed")
        self.batch.fail_all(error)
        with self._cond:
            for request in self._waiting:
                request.outbox.put(error)
            self._waiting.clear()
