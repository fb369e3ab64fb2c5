"""``in_passing_thread``: torch work in a thread that ends with it, leaving no OpenMP pool behind (ibllm/threads.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from ibllm.threads import in_passing_thread, passing_thread


def test_result_error_and_grad_mode_come_back() -> None:
    assert in_passing_thread(lambda a, b=0: a + b, 2, b=3) == 5
    with pytest.raises(ValueError, match="bad input"):
        in_passing_thread(lambda: (_ for _ in ()).throw(ValueError("bad input")))
    with torch.no_grad():
        assert in_passing_thread(torch.is_grad_enabled) is False
    assert in_passing_thread(torch.is_grad_enabled) is True

    @passing_thread
    def double(x: int) -> int:
        return 2 * x

    assert double(21) == 42 and double.__name__ == "double"


def test_one_thread_however_deep_the_calls() -> None:
    """A passing thread's own calls run in it: a chat turn's encode inside its fuse starts no second thread."""
    import threading

    outer, inner = in_passing_thread(lambda: (threading.get_ident(), in_passing_thread(threading.get_ident)))
    assert outer == inner != threading.get_ident()


def test_the_thread_takes_its_openmp_workers_with_it() -> None:
    """In a fresh process: a parallel region run through the helper leaves the process's thread count as it was;
    the same region run in the main thread leaves torch's OpenMP workers behind (the thing the helper avoids)."""
    if torch.get_num_threads() < 2:
        pytest.skip("torch runs one thread here: no OpenMP workers to leave behind")
    code = textwrap.dedent("""
        import os, time, torch
        from ibllm.threads import in_passing_thread
        def count():
            time.sleep(0.2)  # the workers of an ended thread exit on their own
            return len(os.listdir("/proc/self/task"))
        a = torch.randn(1024, 1024)
        before = count()
        in_passing_thread(lambda: a @ a)
        passing = count()
        a @ a
        print(before, passing, count())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    before, passing, main = map(int, out.stdout.split()[-3:])
    assert passing == before
    assert main > before
