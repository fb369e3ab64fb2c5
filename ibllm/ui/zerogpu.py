"""Hugging Face ZeroGPU support that costs nothing elsewhere.

On a ZeroGPU Space the ``spaces`` package is installed and ``spaces.GPU`` lends a GPU for the duration of each
call (generators included). Anywhere else, including machines without the package, ``gpu`` returns the function
unchanged. ``spaces`` is deliberately not a requirement: Spaces provides it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

# Seconds of GPU a single answer may hold; ZeroGPU schedules shorter requests first.
DURATION_S = int(os.environ.get("IBLLM_ZEROGPU_DURATION", "120"))


def gpu(fn: F) -> F:
    try:
        import spaces  # only on Hugging Face Spaces: an optional package, absent elsewhere
    except ImportError:
        return fn
    return spaces.GPU(duration=DURATION_S)(fn)
