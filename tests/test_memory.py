"""The memory plan (which dtype, or a refusal before anything is allocated) and loading whose peak is what is served,
measured as real resident memory of a child process loading official-layout files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ibllm.config import IMAGEBIND_TOY, LlamaConfig
from ibllm.halfgemm import cpu_half_dtype
from ibllm.memory import WORKING_MARGIN, GiB, convert_releasing, plan_memory, tensor_bytes
from ibllm.synthetic import write_official_layout
from tests.conftest import REPO

TOKENIZER = REPO / "assets" / "toy" / "tokenizer.model"


def _weights(n: int) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return {"w": torch.empty(n, dtype=torch.float16), "steps": torch.empty(8, dtype=torch.int64)}


def test_plan_picks_float32_then_half_then_refuses():
    state = _weights(GiB // 2)  # 1 GiB in float16, 2 GiB in float32
    cpu = torch.device("cpu")
    assert tensor_bytes([state], torch.float32) == 2 * GiB + 64
    roomy = plan_memory([state], cpu, available=8 * GiB)
    assert roomy.dtype == torch.float32 and "fastest that fits" in roomy.reason
    tight = plan_memory([state], cpu, available=GiB + WORKING_MARGIN + 1000)
    # Half precision: bfloat16 where this CPU's bfloat16 GEMM measured fast, else float16 (the files' own dtype).
    assert tight.dtype == cpu_half_dtype() and "float32" in tight.reason and "does not fit" in tight.reason
    assert ("whose GEMM takes" in tight.reason) == (tight.dtype == torch.bfloat16)
    none = plan_memory([state], cpu, available=GiB)
    assert none.dtype is None
    assert "needs at least 2.5 GB" in none.reason and "has 1.0 GB available" in none.reason
    assert plan_memory([state], torch.device("cuda"), available=8 * GiB).dtype == torch.float16  # GPU: fp16
    asked = plan_memory([state], cpu, requested="bfloat16", available=8 * GiB)
    assert asked.dtype == torch.bfloat16 and "as asked" in asked.reason
    assert plan_memory([state], cpu, requested="float32", available=2 * GiB).dtype is None  # refused, not killed


def test_conversion_keeps_same_dtype_tensors_without_a_copy():
    half = torch.randn(1000).half()
    other = torch.randn(3, 5)
    out = convert_releasing({"a": half, "b": other, "n": torch.arange(4)}, torch.float16)
    assert out["a"].data_ptr() == half.data_ptr()  # no copy
    torch.testing.assert_close(out["b"], other.half())
    assert out["n"].dtype == torch.int64


def test_refusal_happens_before_loading(tmp_path):
    files = write_official_layout(tmp_path, LlamaConfig(dim=64, n_layers=2, n_heads=4, vocab_size=1024,
                                                        multiple_of=32, lora_rank=4), IMAGEBIND_TOY, TOKENIZER)
    code = ("import sys, ibllm.memory as m; m.available_bytes = lambda device: 10 * 1024**2\n"
            "from ibllm.factory import load_official\n"
            f"load_official({str(files['llama_dir'])!r}, adapter={str(files['adapter'])!r}, "
            f"imagebind={str(files['imagebind'])!r}, use_cache=False, device='cpu')")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "nothing fits" in result.stderr and "10 MB" not in result.stderr
    assert "0.0 GB available" in result.stderr and "--quantize int8" in result.stderr


MEASURE = """
import gc, json, os, resource, sys, torch
from ibllm.config import IMAGEBIND_TOY
from ibllm.factory import load_official
from ibllm.llm.packed import packed_nbytes
def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))
def load(files, dtype):
    return load_official(files[0], adapter=files[1], imagebind=files[2], use_cache=False, device="cpu",
                         dtype=dtype if dtype != "auto" else None, imagebind_config=IMAGEBIND_TOY, max_seq_len=64,
                         max_batch=1)  # one slot: no packed float32 copy, made after loading, to hide the loading peak
# The runtime's one-time set-up is not loading weights: let it happen before the baseline, by loading a tiny model of
# the same layout first. It imports the modules a load uses (~870 of torch's meta kernels alone: 0.11 GB), maps
# their shared libraries, times the start-up GEMM probe and loads the decode kernel: ~0.1-0.15 GB in all, measured,
# the whole of the 10 % margin at this test's size (and nothing at 7B's).
tiny = load(sys.argv[5:8], sys.argv[4])
del tiny
gc.collect()
before = rss()
engine = load(sys.argv[1:4], sys.argv[4])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
served = sum(t.numel() * t.element_size() for t in [*engine.net.parameters(), *engine.net.buffers()])
kv = engine.scheduler.batch.cache.nbytes  # the decode slots' KV cache (reserved; pages committed when written)
packed = packed_nbytes(engine.net.llama)  # a packed float32 copy for batched decode (none with one slot)
# How much of Meta's file is resident in this process's mapping of it right after loading: with float16 every
# tensor is served straight from it, and loading reads them in (else the first question pays for it).
shard = sys.argv[1] + "/consolidated.00.pth"
resident, mapping = 0, None
for line in open("/proc/self/smaps"):
    if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
        mapping = line.split()[-1]
    elif line.startswith("Rss:") and mapping == shard:
        resident += int(line.split()[1]) * 1024
print(json.dumps({"growth": peak - before, "served": served + kv + packed, "dtype": str(engine.dtype),
                  "file_resident": resident / os.path.getsize(shard)}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["auto", "float16"])
def test_peak_memory_while_loading_is_what_is_served(tmp_path, dtype):
    # A 4096-wide, 2-layer LLaMA (1.3 GB of float16 in Meta's layout) under the toy encoders. "auto" picks float32
    # on this machine (every tensor converted, 2.7 GB served); float16 serves the file's own tensors (no copy).
    # The files are written by another process that has exited, as a download is. (Measured: while the process
    # that wrote them is still alive, the loader's peak is 0.6 GB higher for the same files; we have not found why.)
    write = (f"from pathlib import Path; from ibllm.config import IMAGEBIND_TOY, LlamaConfig; "
             f"from ibllm.synthetic import write_official_layout; "
             f"write_official_layout(Path({str(tmp_path)!r}), LlamaConfig(dim=4096, n_layers=2, n_heads=32, "
             f"vocab_size=32000, multiple_of=256, lora_rank=16), IMAGEBIND_TOY, Path({str(TOKENIZER)!r}), "
             f"bridge_hidden=512)")
    subprocess.run([sys.executable, "-c", write], cwd=REPO, check=True, timeout=600)
    files = [tmp_path / "LLaMA" / "7B", tmp_path / "7B.pth", tmp_path / "imagebind_w3D.pth"]
    tiny = write_official_layout(tmp_path / "tiny", LlamaConfig(dim=64, n_layers=2, n_heads=4, vocab_size=1024,
                                                                multiple_of=32, lora_rank=4), IMAGEBIND_TOY, TOKENIZER)
    # A user's fresh process: not the environment earlier tests and the libraries they imported left in this one.
    clean = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR", "PYTHONPATH")}
    argv = [*map(str, files), dtype, *map(str, tiny.values())]
    result = subprocess.run([sys.executable, "-c", MEASURE, *argv], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env=clean)
    assert result.returncode == 0, result.stderr[-3000:]
    m = json.loads(result.stdout.strip().splitlines()[-1])
    assert m["dtype"] == ("torch.float32" if dtype == "auto" else "torch.float16")
    growth, served = m["growth"] / GiB, m["served"] / GiB
    assert growth <= 1.1 * served, f"peak RSS growth {growth:.2f} GB for {served:.2f} GB served"
    if dtype == "float16":  # the weights used straight from the file were read in while loading
        assert m["file_resident"] > 0.95, m
