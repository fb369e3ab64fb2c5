"""Torch work outside the decode loop runs in a thread of its own that ends with it (``in_passing_thread``).

Why: GNU OpenMP (torch's CPU threads, the decode kernel's, inductor's) keeps a pool of worker threads for every
thread that ever ran a parallel region, for as long as that thread lives. Once the workers of all pools outnumber
the CPUs, every worker sleeps in the kernel after ~100 spins instead of the usual ~300,000 (libgomp's
"throttled" spin), and each parallel region then waits for its workers to be woken. Measured on a 2-core CPU: the
toy model's compiled decode step took 2.3-3.8 ms in the scheduler's thread after the model had been built in the
main thread, against 0.7-1.8 ms once the thread that built it had ended; a prefill of 8 prompts 27-40 against
16-20 ms. The decode loop is a long-lived thread; the main thread (loading, warm-up) and a web server's worker
threads (encoding a file) are long-lived too, so their torch work runs here instead: a thread that ends frees its
pool.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")

M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def _one_malloc_arena() -> None:
    """glibc gives each new thread a malloc arena of its own, and what a loading thread frees there (the buffers of
    converting weights) stays in that arena instead of going back to the system: loading the 1.3 GB model of
    tests/test_memory.py in a passing thread grew the peak by 1.45 GB instead of 1.40 (1.34 with one arena). One
    arena for the whole process, as the main thread alone would have; the GIL serialises most allocations anyway."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to tune
            ctypes.CDLL(None).mallopt(M_ARENA_MAX, 1)


_one_malloc_arena()
_here = threading.local()  # .passing: this thread is a passing one


def in_passing_thread(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """``fn(*args, **kwargs)`` in a new thread, waited for: its result, or its exception raised here. The caller's
    grad mode goes with it (grad mode is per thread). Called from a passing thread already, it runs right there:
    nested entry points (a chat turn's encode inside its fuse) start one thread, not one each."""
    if getattr(_here, "passing", False):
        return fn(*args, **kwargs)
    grad = torch.is_grad_enabled()
    box: dict[str, object] = {}

    def work() -> None:
        _here.passing = True
        try:
            with torch.set_grad_enabled(grad):
                box["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=work, name=f"ibllm-{getattr(fn, '__name__', 'work')}",
                              daemon=True)  # Ctrl-C in the caller (a long load) ends the process
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


def passing_thread(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator: every call of ``fn`` runs ``in_passing_thread``."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        return in_passing_thread(fn, *args, **kwargs)

    return wrapper
