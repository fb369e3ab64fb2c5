"""Generation and visual-cache figures (prints numbers; asserts nothing).

    python bench/generate.py                      # tiny LLaMA on CPU + cache search at --cache-n rows
    python bench/generate.py --7b                 # LLaMA-7B shape, random fp16 weights, CUDA: decode tok/s, GB/s
    python bench/generate.py --skip-llm --cache-n 300000

LLM: prefill tokens/s, decode tokens/s (one token per step through the static KV cache, by ``generate_tokens``: the
serving decode step, ``DecodeBatch``, with one slot), LoRA un-merged vs merged, peak memory. Concurrent serving and
the reference-style comparison: ``bench/serve.py``. As gpt-fast, decode bandwidth = bytes of weights read per token
x tokens/s.
Cache: a synthetic clustered cache (unit vectors around random centres, like image embeddings), exact IndexFlatIP vs
HNSW32: single-query and 64-query latency, recall@10 against exact search, and the same extrapolated to the
paper's 3M-row CC3M cache (exact search is linear in rows; HNSW grows roughly with log rows).
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ibllm.cache import VisualCache, configure_faiss  # noqa: E402
from ibllm.config import LLAMA_7B, LLAMA_TOY, GenerationConfig, LlamaConfig, replace  # noqa: E402
from ibllm.llm.generate import generate_tokens  # noqa: E402
from ibllm.llm.llama import Transformer, init_weights  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB CUDA allocated"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB process RSS"


def build(cfg: LlamaConfig, device: torch.device, dtype: torch.dtype) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)  # allocate once, directly in the target dtype
    init_weights(model, nonzero=0.02)
    model.eval()
    model.setup_cache(1, cfg.max_seq_len)
    return model


def bench_llm(cfg: LlamaConfig, device: torch.device, dtype: torch.dtype, prompt_len: int, new_tokens: int,
              repeats: int) -> None:
    model = build(cfg, device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"LLaMA dim {cfg.dim} x {cfg.n_layers} layers, vocab {cfg.vocab_size}, LoRA rank {cfg.lora_rank}: "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, {weight_bytes / 2**30:.2f} GiB "
          f"{str(dtype).removeprefix('torch.')} on {device}")
    adapters = torch.randn(model.query_layer, 1, 1, cfg.dim, device=device, dtype=dtype) * 0.1
    prompt = torch.randint(3, cfg.vocab_size, (prompt_len,)).tolist()
    for label in ("LoRA un-merged", "LoRA merged"):
        if label == "LoRA merged":
            model.merge_lora()
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        with torch.no_grad():
            injection = model.visual_injection(adapters)
            x = torch.tensor([prompt], device=device)
            for _ in range(2):  # warm-up
                model(x, 0, injection, last_only=True)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(repeats):
                model(x, 0, injection, last_only=True)
            sync(device)
            prefill_s = (time.perf_counter() - t0) / repeats
        list(generate_tokens(model, prompt, injection, GenerationConfig.greedy(4), eos_id=-1))  # warm-up
        best = math.inf
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            # prefill + new_tokens decode steps; subtract the prefill to get the decode rate
            n = len(list(generate_tokens(model, prompt, injection, GenerationConfig.greedy(new_tokens), eos_id=-1)))
            sync(device)
            best = min(best, time.perf_counter() - t0 - prefill_s)
        decode_tps = (n - 1) / best  # the first token comes from the prefill
        print(f"  {label:15s} prefill {prompt_len} tok: {prompt_len / prefill_s:9.0f} tok/s ({prefill_s * 1e3:7.1f} ms)"
              f" | decode: {decode_tps:7.1f} tok/s ({1e3 / decode_tps:6.2f} ms/tok), "
              f"{weight_bytes * decode_tps / 1e9:6.1f} GB/s of weights")
    kv = model.kv_cache.nbytes
    print(f"  KV cache {kv / 2**20:.1f} MiB (1 x {cfg.max_seq_len}); peak {peak_memory(device)}")


def clustered(n: int, dim: int, clusters: int, seed: int, chunk: int = 50_000) -> np.ndarray:
    """Unit vectors around ``clusters`` fixed random centres; ``seed`` draws the members (fresh points per seed)."""
    centres = np.random.default_rng(12345).standard_normal((clusters, dim), dtype=np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        x = centres[rng.integers(0, clusters, e - s)] + 0.6 * rng.standard_normal((e - s, dim), dtype=np.float32)
        out[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def timed_search(cache: VisualCache, queries: np.ndarray, single: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    for q in queries[:single]:
        cache.search(q, 10)
    one = (time.perf_counter() - t0) / single
    t0 = time.perf_counter()
    cache.search(queries[:64], 10)
    return one, time.perf_counter() - t0


def bench_cache(n: int, dim: int, target: int) -> None:
    import faiss

    t0 = time.perf_counter()
    vecs = clustered(n, dim, clusters=max(10, n // 300), seed=0)
    queries = clustered(200, dim, clusters=max(10, n // 300), seed=1)  # same centres, points not in the cache
    print(f"\nVisual cache: {n} x {dim} clustered unit vectors ({vecs.nbytes / 2**30:.2f} GiB), made in "
          f"{time.perf_counter() - t0:.1f} s; faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads")
    flat = VisualCache.build(vecs, kind="flat")
    faiss.cvar.distance_compute_blas_threshold = 128000  # faiss 1.15's default, for comparison
    _, batch_default = timed_search(flat, queries, 1)
    configure_faiss()  # back to ibllm's setting
    flat_one, flat_batch = timed_search(flat, queries, 20)
    print(f"  exact : 1 query {flat_one * 1e3:8.2f} ms | 64 queries {flat_batch * 1e3:8.1f} ms "
          f"(faiss default BLAS threshold: {batch_default * 1e3:.1f} ms, x{batch_default / flat_batch:.1f})")
    t0 = time.perf_counter()
    hnsw = VisualCache.build(vecs, kind="hnsw")
    build_s = time.perf_counter() - t0
    scale = target / n
    log_ratio = math.log(target) / math.log(n)
    for ef in (32, 64, 128):
        hnsw.ef_search = ef
        one, batch = timed_search(hnsw, queries, 200)
        recall = hnsw.recall_at_10(queries)
        print(f"  HNSW32 efSearch {ef:3d}: 1 query {one * 1e3:6.3f} ms | 64 queries {batch * 1e3:6.2f} ms | "
              f"recall@10 {recall:.3f}  (x{flat_one / one:.0f} faster than exact)")
    hnsw.ef_search = 64
    one, _ = timed_search(hnsw, queries, 200)
    links = hnsw.index.hnsw.neighbors.size() * 4
    print(f"  HNSW build {build_s:.1f} s; graph links {links / 2**20:.0f} MiB on top of the vectors")
    print(f"  extrapolated to {target / 1e6:.0f}M rows: exact 1 query ~{flat_one * scale * 1e3:.0f} ms, "
          f"64 queries ~{flat_batch * scale:.2f} s; HNSW (ef 64) ~{one * log_ratio * 1e3:.2f} ms per query, "
          f"build ~{build_s * scale * log_ratio / 60:.0f} min on these cores, memory "
          f"{target * dim * 4 / 2**30:.1f} GiB vectors + {links * scale / 2**30:.1f} GiB links")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--7b", dest="big", action="store_true", help="LLaMA-7B shape, fp16, CUDA")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (smoke-test --7b on a CPU)")
    ap.add_argument("--device", default=None, help="default: cuda for --7b, cpu otherwise")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128 tiny, 256 for --7b)")
    ap.add_argument("--new", type=int, default=None, help="new tokens (default 64 tiny, 128 for --7b)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-llm", action="store_true")
    ap.add_argument("--skip-cache", action="store_true")
    ap.add_argument("--cache-n", type=int, default=100_000, help="rows of the synthetic cache")
    ap.add_argument("--cache-dim", type=int, default=1024)
    ap.add_argument("--cache-target", type=int, default=3_000_000, help="extrapolate to this many rows")
    args = ap.parse_args()
    torch.manual_seed(0)
    if not args.skip_llm:
        cfg = LLAMA_7B if args.big else replace(LLAMA_TOY, max_seq_len=256)
        cfg = replace(cfg, n_layers=args.layers) if args.layers else cfg
        device = torch.device(args.device or ("cuda" if args.big else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU here: --7b needs one (or pass --device cpu --layers 1 for a smoke test)")
        if device.type == "cpu":
            print(f"CPU threads: {torch.get_num_threads()}")
        dtype = torch.float16 if args.big else torch.float32
        bench_llm(cfg, device, dtype, args.prompt or (256 if args.big else 128), args.new or (128 if args.big else 64),
                  args.repeats)
    if not args.skip_cache:
        bench_cache(args.cache_n, args.cache_dim, args.cache_target)


if __name__ == "__main__":
    main()
