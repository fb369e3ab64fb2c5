"""The official weights at full size, loaded as the CLI loads them (prints figures; asserts nothing).

    python bench/fullsize.py --dir /data/fullsize              # writes random full-size files once (~21 GB), then runs
    python bench/fullsize.py --dir /data/fullsize --dtype float16
    python bench/fullsize.py --dir /data/fullsize --quantize int8  # weight-only int8 LLaMA, the rest bfloat16
    python bench/fullsize.py --llama-dir LLaMA/7B --adapter 7B.pth --imagebind imagebind_w3D.pth   # real files

Each configuration runs in a child process (so peak RSS is its own) through ``ibllm.create_engine`` exactly as
``python -m ibllm generate`` does, and prints: the memory plan, peak RSS against the served bytes, load time, and
per-stage times of one image question (encode, retrieve, bind, prefill, decode tokens/s, GB/s achieved against this
machine's measured read bandwidth). Needs ~25 GB of disk and minutes; the memory rule itself is a test at a smaller
size (tests/test_memory.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ibllm.config import IMAGEBIND_HUGE, LLAMA_7B  # noqa: E402
from ibllm.synthetic import write_official_layout  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "examples" / "real" / "landscape_image.jpg"

CHILD = r"""
import json, resource, sys, time, torch
from ibllm import create_engine
from ibllm.config import GenerationConfig
from ibllm.llm.quantize import tensor_nbytes
from ibllm.types import Attachment
args = json.loads(sys.argv[1])
def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))
before, t0 = rss(), time.perf_counter()
engine = create_engine(**args["weights"])
load_s = time.perf_counter() - t0
peak_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
served = sum(tensor_nbytes(t) for t in [*engine.net.parameters(), *engine.net.buffers()])
llama_bytes = sum(tensor_nbytes(p) for p in engine.net.llama.parameters())
event = None
for event in engine.chat("Describe the image.", attachments=[Attachment(args["image"], "image")],
                         generation=GenerationConfig.greedy(args["new_tokens"])):
    pass
t = event.timings
peak_total = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the probe below allocates
# The practical limit of the served dtype: one-row products through 7B FFN matrices in it, alone, through the kernel
# the decode step uses for that dtype here (and torch's own, for comparison), in GB/s of weights read. Eight
# matrices, 0.4-0.7 GB in all, one after another: one alone (90 MB) would be read from this CPU's 300 MB L3 cache.
from ibllm.llm import gemv
rows, cols, count = 11008, 4096, 8
products = {}
if args["weights"]["quantize"] == "int8":
    ws = [(torch.randn(rows, cols) * 40).to(torch.int8) for _ in range(count)]
    scale, x = torch.rand(rows, dtype=torch.bfloat16), torch.randn(1, cols, dtype=torch.bfloat16)
    products["torch"] = lambda w: torch._weight_int8pack_mm(x, w, scale)
    if engine.info.decode:
        products["ibllm"] = lambda w: gemv.int8_linear(x, w, scale, None)
else:
    ws = [torch.randn(rows, cols).to(engine.dtype) for _ in range(count)]
    x = torch.randn(1, cols).to(engine.dtype)
    products["torch"] = lambda w: torch.nn.functional.linear(x, w)
    if engine.info.decode:
        products["ibllm"] = lambda w: gemv.linear(x, w, None)
nbytes = sum(w.numel() * w.element_size() for w in ws)
rates = {}
for name, product in products.items():
    best = float("inf")
    for _ in range(4):
        t0 = time.perf_counter()
        for w in ws:
            product(w)
        best = min(best, time.perf_counter() - t0)
    rates[name] = nbytes / best / 1e9
print(json.dumps({"gemv_gbs": rates.get("ibllm", rates["torch"]), "torch_gemv_gbs": rates["torch"],
                  "decode": engine.info.decode,
                  "dtype": engine.info.dtype, "memory": engine.info.memory, "compute": engine.info.compute,
                  "load_s": load_s, "peak_load_growth": peak_load - before, "served": served,
                  "llama_bytes": llama_bytes, "peak_total": peak_total,
                  "encode_s": t.encode, "retrieve_s": t.cache, "bind_s": t.bind, "prefill_s": t.prefill,
                  "prompt_tokens": t.prompt_tokens, "new_tokens": t.new_tokens, "decode_tps": t.decode_tokens_per_s}))
"""


def read_bandwidth_gbs(size_mb: int = 1024) -> float:
    """Best of a few full reads of a buffer far larger than the caches (a sum touches every byte once)."""
    x = torch.ones(size_mb * 1024 * 1024 // 4)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, help="where to write (once) random full-size files in the official layout")
    p.add_argument("--llama-dir"), p.add_argument("--adapter"), p.add_argument("--imagebind")
    p.add_argument("--knn-index")
    p.add_argument("--dtype", action="append", help="repeatable; default: the memory plan's own choice")
    p.add_argument("--quantize", action="append", choices=["int8", "int4"], help="repeatable; instead of --dtype")
    p.add_argument("--new-tokens", type=int, default=8)
    args = p.parse_args()
    if args.llama_dir:
        weights = {"llama_dir": args.llama_dir, "adapter": args.adapter, "imagebind": args.imagebind,
                   "knn_index": args.knn_index}
    elif args.dir:
        if not (args.dir / "7B.pth").is_file():
            print(f"writing random LLaMA-7B + 7B.pth + imagebind_w3D.pth to {args.dir} (once) ...", flush=True)
            t0 = time.perf_counter()
            write_official_layout(args.dir, LLAMA_7B, IMAGEBIND_HUGE, REPO / "assets" / "toy" / "tokenizer.model")
            # Until the ~21 GB are on disk their dirty pages do not count as available memory: measured right
            # after writing, the memory plan saw 15 of 22 GB and refused float16.
            os.sync()
            print(f"  written in {time.perf_counter() - t0:.0f} s")
        weights = {"llama_dir": str(args.dir / "LLaMA" / "7B"), "adapter": str(args.dir / "7B.pth"),
                   "imagebind": str(args.dir / "imagebind_w3D.pth")}
    else:
        p.error("pass --dir (random full-size files) or --llama-dir/--adapter/--imagebind (real ones)")
    bandwidth = read_bandwidth_gbs()
    print(f"read bandwidth of this machine: {bandwidth:.1f} GB/s")
    runs = [(None, q) for q in args.quantize] if args.quantize else [(d, None) for d in args.dtype or [None]]
    for dtype, quantize in runs:
        label = quantize or dtype
        config = {"weights": {**weights, "device": "cpu", "dtype": dtype, "quantize": quantize}, "image": str(IMAGE),
                  "new_tokens": args.new_tokens}
        result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config)], cwd=REPO, capture_output=True,
                                text=True)
        if result.returncode != 0:
            print(f"[{label or 'default'}] exit {result.returncode}:\n{result.stderr[-2000:]}")
            continue
        r = json.loads(result.stdout.strip().splitlines()[-1])
        gbs = r["llama_bytes"] * r["decode_tps"] / 1e9
        print(f"[{label or 'default'} -> {r['dtype']}] {r['memory']}" + (f"; {r['compute']}" if r["compute"] else "")
              + (f"; decode: {r['decode']}" if r["decode"] else ""))
        print(f"  load {r['load_s']:.1f} s; peak RSS growth while loading {r['peak_load_growth'] / 1e9:.1f} GB for "
              f"{r['served'] / 1e9:.1f} GB served (x{r['peak_load_growth'] / r['served']:.2f}); "
              f"peak RSS overall {r['peak_total'] / 1e9:.1f} GB")
        print(f"  image encode {r['encode_s']:.1f} s, retrieve {r['retrieve_s'] * 1e3:.0f} ms, bind "
              f"{r['bind_s'] * 1e3:.0f} ms, prefill {r['prompt_tokens']} tok {r['prefill_s']:.1f} s, decode "
              f"{r['decode_tps']:.2f} tok/s = {gbs:.1f} GB/s ({gbs / bandwidth:.0%} of the read bandwidth; "
              f"{gbs / r['gemv_gbs']:.0%} of the {r['gemv_gbs']:.1f} GB/s a lone {r['dtype']} matrix-vector product "
              f"reaches here through the same kernel; torch's own: {r['torch_gemv_gbs']:.1f} GB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
