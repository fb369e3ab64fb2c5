"""Continuous batching at the token level: up to B requests decode together, one token each per step.

``DecodeBatch`` owns B *slots*: a row of its KV cache (allocated once, B x max_seq_len), a row of the visual
injection buffer (each slot its own image, or zeros for text only), a position, the last token, and the request's
own sampling settings and seeded generator. Requests are admitted between steps: the newcomers' prompts are
prefilled together into their slots' cache rows (one int-position call of the model, prompts padded on the right),
which gives each its first token; from then on each takes part in the batched one-token step, where every row has
its own position (``Transformer.forward`` with a (B,) position tensor masks each row to its own length). A slot is
freed as soon as its request meets eos, its token budget, or a stop (``Request.cancel``, ``should_stop``), and the
next admission reuses it.

This is the one decode loop: the serving scheduler (``ibllm.serving``) runs it from its thread for concurrent
chats, ``generate_tokens`` runs a batch of one inline, ``DecodeBatch.run`` serves a list of requests to completion.
Nothing here knows about text or threads; a request's tokens go to its ``outbox`` queue.

The model is anything callable as ``model(tokens (B, T), start_pos, injection, last_only=True, cache=...) -> logits
(B, V)``, where start_pos is an int (prefill; with ``lengths=`` (B,) when prompts of different lengths share it) or
a (B,) tensor (the step): ``ibllm.llm.llama.Transformer``, or a mock in tests. A model without ``new_cache`` gets
``cache=None`` (it keeps no state).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ibllm.config import GenerationConfig
from ibllm.llm import gemv
from ibllm.llm.kvcache import KVCache
from ibllm.llm.sampling import make_generator, sample

log = logging.getLogger(__name__)

DONE = object()
"""Last item of a request's outbox when it ends normally (eos, budget, stop). A failure puts the exception instead."""


@dataclass(eq=False)
class Request:
    """One generation: prompt ids (bos included), the per-layer visual term (``(query_layer, 1, H, 1, hd)`` or None
    for none), sampling settings, eos. Its tokens arrive in ``outbox``: ids, then ``DONE`` or an exception."""

    prompt: Sequence[int]
    injection: torch.Tensor | None
    options: GenerationConfig
    eos_id: int
    should_stop: Callable[[], bool] | None = None  # polled before every model call that would serve this request
    # Per-request state, never copied by dataclasses.replace:
    outbox: queue.SimpleQueue = field(default_factory=queue.SimpleQueue, init=False)
    submitted: float = field(default_factory=time.perf_counter, init=False)
    admitted: float | None = field(default=None, init=False)  # when its prefill began (perf_counter)
    # When each of its tokens was made (perf_counter), appended before the token is put in the outbox: the model's own
    # pace, whatever the pace of the consumer.
    token_times: list[float] = field(default_factory=list, init=False)
    _cancelled: threading.Event = field(default_factory=threading.Event, init=False)

    def cancel(self) -> None:
        self._cancelled.set()

    def stopped(self) -> bool:
        if self._cancelled.is_set():
            return True
        if self.should_stop is None:
            return False
        try:
            return bool(self.should_stop())
        except Exception:  # noqa: BLE001 - a broken callback ends its own request, not the whole batch
            log.exception("should_stop raised; stopping that request")
            return True


@dataclass(eq=False)
class _Slot:
    request: Request
    generator: torch.Generator
    position: int  # tokens in this slot's cache row: where ``last`` goes when it is fed
    last: int  # the newest token, fed at the next step
    left: int  # tokens it may still produce


def model_device(model: Callable) -> torch.device:
    try:
        return next(model.parameters()).device  # type: ignore[attr-defined]
    except (AttributeError, StopIteration):
        return torch.device("cpu")


class DecodeBatch:
    """B slots over one KV cache; ``admit`` a request into a free slot, ``step`` every live slot by one token."""

    def __init__(self, model: Callable, slots: int, *, cache: KVCache | None = None, max_seq_len: int | None = None,
                 vocab_limit: int | None = None, pack: bool = False):
        if slots < 1:
            raise ValueError(f"need at least one slot, got {slots}")
        self.model = model
        self.device = model_device(model)
        if cache is None and hasattr(model, "new_cache"):
            cache = model.new_cache(slots, max_seq_len)
        if cache is not None and cache.batch < slots:
            raise ValueError(f"a KV cache of {cache.batch} rows cannot hold {slots} slots")
        self.cache = cache
        self.max_seq_len = cache.seq_len if cache is not None else (max_seq_len or model.max_seq_len)
        self.injection = model.injection_buffer(slots) if hasattr(model, "injection_buffer") else None
        self.vocab_limit = vocab_limit  # ids at or past it are never produced (a vocabulary padded past the tokenizer)
        self.slots: list[_Slot | None] = [None] * slots
        # Eager steps run rows 0..(last live slot); a compiled step runs the smallest of ``widths`` that covers them,
        # one static shape (one compiled graph) per width.
        self.widths: tuple[int, ...] = ()
        # ``pack``: the model's float32 CPU weights get a copy in MKL's layout for products of B rows
        # (``llm.packed``), with which B rows cost about what one does; then every step with a live slot past the
        # first runs all B rows. 0: not packed (not asked, one slot, no MKL, or weights that are not float32).
        self.packed_rows = 0
        if pack and slots > 1 and hasattr(model, "pack_for_rows") and model.pack_for_rows(slots):
            self.packed_rows = slots

    # -- state ----------------------------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self.slots)

    @property
    def live(self) -> int:
        return sum(s is not None for s in self.slots)

    @property
    def free(self) -> int:
        return self.size - self.live

    def check(self, request: Request) -> None:
        """ValueError for a request no slot can serve (raised before it takes one)."""
        if not request.prompt:
            raise ValueError("empty prompt (encode it with bos)")
        if len(request.prompt) > self.max_seq_len:
            raise ValueError(f"prompt of {len(request.prompt)} tokens exceeds max_seq_len {self.max_seq_len}")

    # -- admission and steps --------------------------------------------------------------------------------------

    @torch.no_grad()
    def admit(self, *requests: Request) -> None:
        """Prefill ``requests`` together into free slots, in one call of the model; each one's first token goes to
        its outbox (or DONE if it ends there, or was stopped meanwhile).

        Prompts of different lengths share the call padded on the right (``Transformer.forward``'s ``lengths``),
        so newcomers arriving together cost one prefill rather than one each, and each gets exactly what its
        prefill alone gives."""
        ready: list[tuple[Request, int]] = []
        for request in requests:
            self.check(request)
        for request in requests:
            budget = min(int(request.options.max_new_tokens), self.max_seq_len - len(request.prompt))
            if budget <= 0 or request.stopped():
                request.outbox.put(DONE)
            else:
                ready.append((request, budget))
        if not ready:
            return
        free = [i for i, s in enumerate(self.slots) if s is None]  # lowest first: keeps the eager step's rows few
        if len(ready) > len(free):
            raise ValueError(f"{len(ready)} requests for {len(free)} free slots")
        indices = free[:len(ready)]
        now = time.perf_counter()
        for (request, _), index in zip(ready, indices, strict=True):
            request.admitted = now
            self._set_injection(index, request.injection)
        lengths = [len(request.prompt) for request, _ in ready]
        prompts = torch.zeros((len(ready), max(lengths)), dtype=torch.long)
        for row, (request, _) in enumerate(ready):
            prompts[row, :lengths[row]] = torch.tensor(list(request.prompt), dtype=torch.long)
        ragged = {"lengths": torch.tensor(lengths)} if len(set(lengths)) > 1 else {}  # mocks need not know it
        cache = self.cache.select(indices) if self.cache is not None else None
        injection = None
        if self.injection is not None:
            contiguous = indices == list(range(indices[0], indices[0] + len(indices)))
            injection = (self.injection[:, indices[0]:indices[-1] + 1] if contiguous
                         else self.injection[:, torch.tensor(indices, device=self.injection.device)])
        logits = self.model(prompts.to(self.device), 0, injection, last_only=True, cache=cache, **ragged)
        slots = [_Slot(request, make_generator(self.device, request.options.seed), len(request.prompt), 0, budget)
                 for request, budget in ready]
        picked = self._pick(logits, slots)  # before the slots are taken: a failure here leaves them free
        for index, slot in zip(indices, slots, strict=True):
            self.slots[index] = slot
        for index, slot, token in zip(indices, slots, picked, strict=True):
            if slot.request.stopped():  # stopped while its prompt was being read: no token, the slot is free now
                self._free(index, DONE)
            else:
                self._deliver(index, token)

    def _set_injection(self, index: int, injection: torch.Tensor | None) -> None:
        """Slot ``index``'s row of the injection buffer: the request's visual term, or zeros (no visual input)."""
        if injection is not None:
            if self.injection is None:  # a model without injection_buffer (a mock): shaped by the first request
                self.injection = injection.new_zeros((injection.shape[0], self.size, *injection.shape[2:]))
            self.injection[:, index] = injection[:, 0]
        elif self.injection is not None:
            self.injection[:, index] = 0

    @torch.no_grad()
    def step(self) -> None:
        """One token for every live slot (after freeing those whose request was stopped)."""
        self.drop_stopped()
        live = [i for i, s in enumerate(self.slots) if s is not None]
        if not live:
            return
        if self.packed_rows and live[-1] > 0:
            width = self.size
        else:
            width = next((w for w in self.widths if w > live[-1]), live[-1] + 1)
        rows = self.slots[:width]
        # Free rows inside the width are fed token 0 at position 0: a harmless write, their next prefill overwrites
        # it, and their logits are ignored.
        feed = torch.tensor([[s.last, s.position] if s else [0, 0] for s in rows], dtype=torch.long,
                            device=self.device)  # one tensor (one copy to a GPU) for both
        tokens, positions = feed[:, :1], feed[:, 1]
        injection, cache = self._rows(width)
        if self.compiled:  # one static shape per width: the whole cache length
            logits = self._forward(tokens, positions, injection, cache)
        else:  # attention reads only the positions some row has reached
            span = max(s.position for s in rows if s) + 1
            logits = self._forward(tokens, positions, injection, cache, span=span)
        for i in live:
            self.slots[i].position += 1
        for i, token in zip(live, self._pick(logits[live] if width != len(live) else logits,
                                             [self.slots[i] for i in live]), strict=True):
            self._deliver(i, token)

    def _rows(self, width: int) -> tuple[torch.Tensor | None, KVCache | None]:
        """The injection buffer and KV cache for rows 0..width-1: the tensors themselves at full width (CUDA graphs
        need the same addresses at every step), views otherwise."""
        if width == self.size:
            return self.injection, self.cache
        return (None if self.injection is None else self.injection[:, :width],
                None if self.cache is None else self.cache.rows(0, width))

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, injection: torch.Tensor | None,
                 cache: KVCache | None, span: int | None = None) -> torch.Tensor:
        """The decode step: one token per row at per-row positions, attending to cache positions below ``span``
        (None: all). ``compile`` replaces it with a compiled one (always called without ``span``)."""
        if span is None:
            return self.model(tokens, positions, injection, last_only=True, cache=cache)
        return self.model(tokens, positions, injection, last_only=True, cache=cache, span=span)

    def _pick(self, logits: torch.Tensor, slots: Sequence[_Slot]) -> list[int]:
        """Next token of each slot from its row of ``logits``, with its own settings and generator."""
        if self.vocab_limit is not None and self.vocab_limit < logits.shape[-1]:
            logits[..., self.vocab_limit:] = float("-inf")
        greedy = None
        picked = []
        for row, slot in enumerate(slots):
            options = slot.request.options
            if options.temperature <= 0:
                if greedy is None:
                    greedy = logits.argmax(dim=-1).tolist()  # one argmax and one transfer for all greedy rows
                picked.append(greedy[row])
            else:
                picked.append(int(sample(logits[row:row + 1], options.temperature, options.top_p, slot.generator)[0]))
        return picked

    def _deliver(self, index: int, token: int) -> None:
        slot = self.slots[index]
        if token == slot.request.eos_id:
            self._free(index, DONE)
            return
        slot.request.token_times.append(time.perf_counter())
        slot.request.outbox.put(token)
        slot.last, slot.left = token, slot.left - 1
        if slot.left == 0:
            self._free(index, DONE)

    def _free(self, index: int, last: object) -> None:
        request = self.slots[index].request
        self.slots[index] = None
        request.outbox.put(last)

    def drop_stopped(self) -> None:
        """Free the slots of stopped or cancelled requests."""
        for i, slot in enumerate(self.slots):
            if slot is not None and slot.request.stopped():
                self._free(i, DONE)

    def fail_all(self, error: BaseException) -> None:
        """End every live request with ``error`` (after a failed step) and free its slot."""
        for i, slot in enumerate(self.slots):
            if slot is not None:
                self._free(i, error)

    # -- compilation ----------------------------------------------------------------------------------------------

    @property
    def compiled(self) -> bool:
        return bool(self.widths)

    def compile(self) -> bool:
        """Compile the one-token step with ``torch.compile`` (inductor; CUDA graphs on a GPU) and warm it up.

        Static shapes, one graph per batch width: on a GPU only the full width B (a step costs about the same for
        1 or B rows there); on a CPU with packed weights 1 and B; otherwise also 2, 4, ... below B, because there an
        ordinary GEMM of 4 rows takes about twice as long as one of 1 (measured, bench/serve.py), so a lone request
        must not pay for B rows. Returns False, keeping the eager step, where compilation fails (no compiler, an
        unsupported op): serving never depends on it. Call it while no slot is live: the warm-up writes position 0 of
        the rows.
        """
        if self.compiled:
            return True
        if self.cache is None or self.live:
            raise RuntimeError("compile a DecodeBatch over a real model, before any request is admitted")
        cuda = self.device.type == "cuda"
        if cuda:
            widths: tuple[int, ...] = (self.size,)
        elif self.packed_rows:  # one row, or all of them through the packed weights
            widths = tuple(sorted({1, self.size}))
        else:
            widths = tuple(sorted({min(2**i, self.size) for i in range(self.size.bit_length() + 1)}))
        if not cuda:
            gemv.native_op()  # the decode kernel's C++ op, built (once) before tracing, which cannot run a build
            # The C++ wrapper imports torch.utils.cpp_extension, which warns on every start that no CUDA runtime is
            # found: true, and beside the point on a CPU.
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        if cuda:  # CUDA graphs need the tensors the step mutates at fixed addresses
            for t in (*self.cache.tensors(), self.injection):
                if t is not None:
                    torch._dynamo.mark_static_address(t)
        # One graph per width, per DecodeBatch (dynamo keys its cache on the code of _forward, shared by instances).
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), 64))
        eager = self._forward
        t0 = time.perf_counter()
        try:
            # On a CPU the graph's own calls (a C++ wrapper instead of Python's, one per kernel) are much of a small
            # model's step: toy decode x2.73-3.58 the reference loop in five runs with the C++ wrapper, against
            # x2.39-2.42 in two without (bench/serve.py, separate runs alternating).
            compiled = torch.compile(eager, mode="reduce-overhead" if cuda else None, dynamic=False,
                                     options=None if cuda else {"cpp_wrapper": True})
            with torch.no_grad():
                for width in widths:
                    # Laid out as step() makes them (views of one (width, 2) tensor): a guard on their strides
                    # would otherwise recompile the graph at the first real step (1-6 s of the first answer).
                    feed = torch.zeros(width, 2, dtype=torch.long, device=self.device)
                    tokens, positions = feed[:, :1], feed[:, 1]
                    injection, cache = self._rows(width)
                    for _ in range(3 if cuda else 1):  # compile, then (CUDA graphs) record and replay
                        want = eager(tokens, positions, injection, cache)
                        got = compiled(tokens, positions, injection, cache)
                    # float32 to 1e-3; half precision to its own rounding, a few units of the last place of the
                    # largest logit (measured 4.9e-3 on logits of ~1 from float16 weights, 4096x4): a broken graph
                    # is far off either way.
                    tol = 1e-3 if self.cache.tensors()[0].dtype == torch.float32 else 3e-2
                    scale = max(1.0, float(want.abs().max()))
                    if not torch.allclose(got.float(), want.float(), atol=tol * scale, rtol=tol):
                        raise RuntimeError(f"compiled step differs from eager by {(got - want).abs().max():.2e}")
        except Exception as exc:  # noqa: BLE001 - any failure means "serve eagerly"
            log.warning("decode step not compiled (%s: %s); decoding eagerly", type(exc).__name__,
                        str(exc).splitlines()[0] if str(exc) else "")
            return False
        self._forward, self.widths = compiled, widths
        log.info("compiled the decode step for %d slots (%s; widths %s) in %.1f s", self.size, self.device,
                 ", ".join(map(str, widths)), time.perf_counter() - t0)
        return True

    # -- serving without a thread ---------------------------------------------------------------------------------

    def stream(self, request: Request) -> Iterator[int]:
        """Serve one request alone, inline, yielding its tokens (``generate_tokens``). Closing the iterator frees
        the slot."""
        self.admit(request)
        try:
            while True:
                while not request.outbox.empty():
                    item = request.outbox.get_nowait()
                    if item is DONE:
                        return
                    if isinstance(item, BaseException):
                        raise item
                    yield item
                self.step()
        finally:
            request.cancel()
            self.drop_stopped()

    def run(self, requests: Sequence[Request]) -> list[list[int]]:
        """Serve ``requests`` to completion, admitted in order as slots free up; their tokens, in order."""
        waiting = list(requests)
        while waiting or self.live:
            if waiting and self.free:
                admitted, waiting = waiting[:self.free], waiting[self.free:]
                self.admit(*admitted)
            self.step()
        outputs = []
        for request in requests:
            tokens = []
            for item in iter(request.outbox.get, DONE):
                if isinstance(item, BaseException):
                    raise item
                tokens.append(item)
            outputs.append(tokens)
        return outputs
