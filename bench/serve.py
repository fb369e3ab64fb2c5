"""Serving figures (prints numbers; asserts nothing), side by side in one run:

1. batch-1 decode tokens/s of our decode step (``DecodeBatch``, what the engine serves with) against the
   reference-style eager loop (``../shared/baselines/refstyle.py``) at toy 256x4 (vocab 1024), 1024x8 and 4096x2
   (vocab 32000), with the GB/s of weights each achieves against this machine's measured read bandwidth;
2. aggregate tokens/s of 8 concurrent requests through the scheduler against the same 8 served one at a time,
   with p50/p95 time to first token.

    python bench/serve.py                       # everything, fp32 on CPU
    python bench/serve.py --compile             # also the compiled step (compile time is printed)
    python bench/serve.py --skip-decode --concurrent-sizes toy 1024x8
    python bench/serve.py --skip-decode --skip-concurrent --app   # 8 gradio_client sessions on the real app
    python bench/serve.py --skip-decode --skip-concurrent --app-stream 10   # `python app.py` vs in-process

Random weights, greedy, eos ignored, 32-token prompts, 64 new tokens. Runs of the two loops are interleaved so a
busy neighbour on a shared machine slows both alike; medians are reported.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BASELINES = REPO.parent / "shared" / "baselines"

from ibllm.config import LLAMA_TOY, GenerationConfig, LlamaConfig  # noqa: E402
from ibllm.llm.batching import DONE, DecodeBatch, Request  # noqa: E402
from ibllm.llm.llama import Transformer, init_weights  # noqa: E402
from ibllm.serving import Queued, Scheduler  # noqa: E402
from ibllm.threads import in_passing_thread  # noqa: E402

# The sizes of issue 11. toy: the embedded model's LLaMA (LLAMA_TOY). The others: LLaMA-7B's conventions (heads of
# 64 / 128, FFN multiple of 256, LoRA rank 16) at other widths and depths, vocabulary 32000.
SIZES = {
    "toy": replace(LLAMA_TOY, max_seq_len=256),
    "1024x8": LlamaConfig(dim=1024, n_layers=8, n_heads=16, vocab_size=32000, multiple_of=256, max_seq_len=256,
                          lora_rank=16),
    "4096x2": LlamaConfig(dim=4096, n_layers=2, n_heads=32, vocab_size=32000, multiple_of=256, max_seq_len=256,
                          lora_rank=16),
}


def read_bandwidth(gib: float = 1.0, repeats: int = 10) -> float:
    """GB/s of reading ``gib`` GiB of fp32: the best of ``repeats`` sums over it and matrix-vector products with it
    (on this CPU the GEMV streams faster than the reduction), i.e. the machine's reachable read rate."""
    n = int((gib * 2**30 / 4) ** 0.5)
    x = torch.ones(n, n)
    v = torch.ones(n)
    best = float("inf")
    for op in (lambda: x.sum(), lambda: torch.mv(x, v)):
        op()
        for _ in range(repeats):
            t0 = time.perf_counter()
            op()
            best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def ours(cfg: LlamaConfig) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")
    init_weights(model, torch.Generator().manual_seed(0), nonzero=0.02)
    model.eval().merge_lora()  # as the engine serves it
    model.fuse_projections()
    model.use_gemv()  # small products through ibllm's kernel where it builds (else MKL, packed for B rows)
    return model


def reference(cfg: LlamaConfig):
    sys.path.insert(0, str(BASELINES))
    import refstyle as R

    rc = R.RefConfig(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, vocab_size=cfg.vocab_size,
                     multiple_of=cfg.multiple_of, lora_rank=cfg.lora_rank, embed_dim=1024, query_layer=cfg.n_layers,
                     max_seq_len=cfg.max_seq_len)
    return R, R.build_random_model(rc, max_seq_len=128)


def weight_bytes(model: Transformer) -> int:
    # What one decode step reads: every weight but the embedding table (one row of it is gathered).
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("tok_embeddings"))


def request(model: Transformer, prompt_len: int, new: int, seed: int) -> Request:
    g = torch.Generator().manual_seed(seed)
    prompt = [1, *torch.randint(3, model.cfg.vocab_size, (prompt_len - 1,), generator=g).tolist()]
    adapters = torch.randn(model.query_layer, 1, 1, model.cfg.dim, generator=g) * 0.1
    with torch.no_grad():
        injection = model.visual_injection(adapters)
    return Request(prompt, injection, GenerationConfig.greedy(new), eos_id=-1)


def decode_rate(batch: DecodeBatch, model: Transformer, prompt_len: int, new: int) -> float:
    """Seconds per decode step of one request alone (prefill excluded), through ``batch``."""
    r = request(model, prompt_len, new, seed=0)
    batch.admit(r)
    t0 = time.perf_counter()
    while batch.live:
        batch.step()
    dt = time.perf_counter() - t0
    n = sum(1 for _ in iter(r.outbox.get, DONE))
    assert n == new
    return dt / (new - 1)


def bench_decode(names: list[str], prompt_len: int, new: int, repeats: int, compile: bool, slots: int) -> None:
    bandwidth = read_bandwidth()
    print(f"\n## batch-1 decode, fp32, {torch.get_num_threads()} threads; {prompt_len}-token prompt, {new} new "
          f"tokens, median of {repeats} (runs interleaved); read bandwidth {bandwidth:.1f} GB/s (1 GiB, best of 10 "
          f"sums and GEMVs)")
    cols = ["ref tok/s", "ours tok/s", "x ref", "ref GB/s", "ours GB/s", "ours %bw"]
    if compile:
        cols += ["compiled tok/s", "x ref", "compile s"]
    print(f"{'size':8s} " + " ".join(f"{c:>14s}" for c in cols))
    for name in names:
        cfg = SIZES[name]
        R, ref = reference(cfg)
        model = ours(cfg)
        eager = DecodeBatch(model, slots, pack=True)  # the engine's batch: one request alone steps one row
        compiled = None
        compile_s = float("nan")
        if compile:
            compiled = DecodeBatch(model, slots, pack=True)
            t0 = time.perf_counter()
            if not compiled.compile():
                compiled = None
            compile_s = time.perf_counter() - t0
        ref_rates, our_rates, comp_rates = [], [], []
        for run in range(repeats + 1):  # the first round warms up
            res = R.decode_tokens_per_second(ref, prompt_len, new, repeats=1, warmup=0)
            ours_step = decode_rate(eager, model, prompt_len, new)
            comp_step = decode_rate(compiled, model, prompt_len, new) if compiled else float("nan")
            if run:
                ref_rates.append(res["decode_tokens_per_s"])
                our_rates.append(1 / ours_step)
                comp_rates.append(1 / comp_step)
        ref_tps, our_tps = statistics.median(ref_rates), statistics.median(our_rates)
        ref_gbs = res["llama_weight_bytes_per_step"] * ref_tps / 1e9
        our_gbs = weight_bytes(model) * our_tps / 1e9
        row = [f"{ref_tps:14.1f}", f"{our_tps:14.1f}", f"{our_tps / ref_tps:13.2f}x", f"{ref_gbs:14.1f}",
               f"{our_gbs:14.1f}", f"{100 * our_gbs / bandwidth:13.0f}%"]
        if compile:
            comp_tps = statistics.median(comp_rates)
            row += [f"{comp_tps:14.1f}", f"{comp_tps / ref_tps:13.2f}x", f"{compile_s:14.1f}"]
        print(f"{name:8s} " + " ".join(row), flush=True)
        del ref, model, eager, compiled
    print(f"(read bandwidth measured again after the runs: {read_bandwidth():.1f} GB/s)")


def serve(scheduler: Scheduler, reqs: list[Request], concurrent: bool) -> tuple[float, list[float], int]:
    """Wall time, times to first token, tokens: all at once (a thread per request) or one after another."""
    ttft: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def one(r: Request) -> None:
        t0 = time.perf_counter()
        stream = scheduler.submit(r.prompt, r.injection, r.options, eos_id=r.eos_id)
        first, n = None, 0
        for item in stream:
            if isinstance(item, Queued):
                continue
            if first is None:
                first = time.perf_counter() - t0
            n += 1
        with lock:
            ttft.append(first)
            tokens[0] += n

    t0 = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=one, args=(r,)) for r in reqs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for r in reqs:
            one(r)
    return time.perf_counter() - t0, ttft, tokens[0]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def bench_concurrent(names: list[str], n: int, prompt_len: int, new: int, compile: bool, rounds: int) -> None:
    print(f"\n## {n} concurrent requests through the scheduler ({n} slots) vs the same {n} one at a time "
          f"(in-process, one thread per request; {prompt_len}-token prompts, {new} new tokens each; medians of "
          f"{rounds} rounds, alternating)")
    print(f"{'size':8s} {'one-at-a-time tok/s':>20s} {'concurrent tok/s':>17s} {'x':>6s} {'lone TTFT ms':>13s} "
          f"{'p50 TTFT ms':>12s} {'p95 TTFT ms':>12s} {'p95/lone':>9s}")

    def build(name: str) -> tuple[DecodeBatch, list[Request]]:
        model = ours(SIZES[name])
        batch = DecodeBatch(model, n, pack=True)  # as the engine serves float32 on a CPU (weights packed for n rows)
        if compile:
            batch.compile()
        return batch, [request(model, prompt_len, new, seed=i) for i in range(n)]

    for name in names:
        # Built as the factory builds a served model, in a thread that ends (ibllm/threads.py): then the scheduler's
        # thread is the one OpenMP pool, as in the app. (This function must not itself run in a passing thread:
        # the build would then run inline, and that thread's pool would outlive it.)
        batch, reqs = in_passing_thread(build, name)
        scheduler = Scheduler(batch)
        serve(scheduler, reqs[:2], concurrent=True)  # warm-up
        figures = []
        for _ in range(rounds):
            alone_s, alone_ttft, alone_tokens = serve(scheduler, reqs, concurrent=False)
            both_s, ttft, both_tokens = serve(scheduler, reqs, concurrent=True)
            assert alone_tokens == both_tokens == n * new
            lone = statistics.median(alone_ttft)
            figures.append((alone_tokens / alone_s, both_tokens / both_s, lone, percentile(ttft, 0.5),
                            percentile(ttft, 0.95)))
        scheduler.close()
        a, b, lone, p50, p95 = (statistics.median(column) for column in zip(*figures, strict=True))
        ratio = statistics.median(f[4] / f[2] for f in figures)
        print(f"{name:8s} {a:20.1f} {b:17.1f} {b / a:5.2f}x {1e3 * lone:13.1f} {1e3 * p50:12.1f} {1e3 * p95:12.1f} "
              f"{ratio:8.1f}x", flush=True)


def bench_app(n: int, new: int) -> None:
    """``n`` gradio_client sessions on loopback against ``python app.py --max-batch n`` in its own process (as a
    deployment has it: the clients' threads do not share the server's interpreter), each its own gallery example,
    all at once vs one after another."""
    import json

    from gradio_client import Client, handle_file

    examples = json.loads((REPO / "examples" / "toy" / "gallery.json").read_text())["examples"]
    examples = (examples * n)[:n]
    app, url = start_app(REPO, "--max-batch", str(n))

    def ask(client: Client, ex: dict, out: list) -> None:
        msg = {"text": ex["question"], "files": [handle_file(str(REPO / "examples" / "toy" / f["path"]))
                                                 for f in ex["files"]]}
        t0 = time.perf_counter()
        job = client.submit(msg, api_name="/chat", max_new_tokens=new, temperature=0)
        first = None
        for chunk in job:
            if chunk[0] and first is None:
                first = time.perf_counter() - t0
        answer, timings = job.result()[:2]
        tokens = int(re.search(r"\((\d+) tok, ", timings).group(1))
        out.append((first if first is not None else time.perf_counter() - t0, tokens, answer))

    def run(concurrent: bool) -> tuple[float, list]:
        clients = [Client(url, verbose=False) for _ in examples]
        out: list = []
        t0 = time.perf_counter()
        if concurrent:
            threads = [threading.Thread(target=ask, args=(c, ex, out)) for c, ex in zip(clients, examples, strict=True)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            for c, ex in zip(clients, examples, strict=True):
                ask(c, ex, out)
        return time.perf_counter() - t0, out

    try:
        run(concurrent=True)  # warm-up: every file encoded once (the per-content memo), Gradio warmed
        alone_s, alone = run(concurrent=False)
        both_s, both = run(concurrent=True)
    finally:
        app.terminate()
        app.wait(timeout=30)
    tok_a, tok_b = sum(t for _, t, _ in alone), sum(t for _, t, _ in both)
    same = sorted(a for *_, a in alone) == sorted(a for *_, a in both)
    print(f"\n## {n} gradio_client sessions on loopback (`python app.py --max-batch {n}` in its own process, toy "
          f"model, greedy, answers end at eos)")
    print(f"one at a time: {tok_a} tokens in {alone_s:.2f} s = {tok_a / alone_s:.1f} tok/s, lone TTFT p50 "
          f"{1e3 * percentile([f for f, *_ in alone], 0.5):.0f} ms")
    ttft = [f for f, *_ in both]
    print(f"concurrent   : {tok_b} tokens in {both_s:.2f} s = {tok_b / both_s:.1f} tok/s "
          f"(x{(tok_b / both_s) / (tok_a / alone_s):.2f}; wall x{alone_s / both_s:.2f}), TTFT p50 "
          f"{1e3 * percentile(ttft, 0.5):.0f} ms, p95 {1e3 * percentile(ttft, 0.95):.0f} ms; same answers as one at "
          f"a time: {same}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(app_dir: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """``python app.py`` (with ``flags``) of the checkout ``app_dir`` on a free loopback port; its URL once it
    answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    app = subprocess.Popen([sys.executable, "app.py", "--port", str(port), *flags], cwd=app_dir,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return app, url
        except OSError:
            if app.poll() is not None or time.monotonic() > deadline:
                app.kill()
                raise SystemExit(f"{app_dir / 'app.py'} did not start") from None
            time.sleep(1)


def bench_app_stream(n: int, app_dirs: list[Path]) -> None:
    """One chat at a time through real ``python app.py`` processes (one per checkout in ``app_dirs``, each driven
    by gradio_client on loopback) and through the engine in this process (``ChatEngine.chat``, no Gradio),
    interleaved: the decode tok/s each answer's timings report, and the whole answer's time."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from gradio_client import Client, handle_file

    from ibllm import create_engine
    from ibllm.types import Attachment

    image = REPO / "examples" / "toy" / "red_cube_image.png"
    question = "Describe it."
    apps = [start_app(d) for d in app_dirs]
    engine = create_engine()
    try:
        clients = [Client(url, verbose=False) for _, url in apps]

        def through_app(client: Client) -> tuple[float, float]:
            client.reset_session()
            t0 = time.perf_counter()
            job = client.submit({"text": question, "files": [handle_file(str(image))]}, api_name="/chat",
                                max_new_tokens=48, temperature=0)
            timings = job.result()[1]
            wall = time.perf_counter() - t0
            return float(re.search(r"\(\d+ tok, ([\d.]+) tok/s\)", timings).group(1)), wall

        def in_process() -> tuple[float, float]:
            t0 = time.perf_counter()
            events = list(engine.chat(question, attachments=[Attachment(str(image), "image")],
                                      generation=GenerationConfig.greedy(48)))
            return events[-1].timings.decode_tokens_per_s, time.perf_counter() - t0

        runs: list[list[tuple[float, float]]] = [[] for _ in range(len(apps) + 1)]
        for run in range(n + 1):  # the first round warms up
            results = [*(through_app(c) for c in clients), in_process()]
            if run:
                for got, result in zip(runs, results, strict=True):
                    got.append(result)
    finally:
        for app, _ in apps:
            app.terminate()
            app.wait(timeout=30)
        engine.close()
    medians = [[statistics.median(x) for x in zip(*r, strict=True)] for r in runs]
    own_rate, own_wall = medians[-1]
    print(f"\n## one chat at a time, toy model, {question!r} about an image, greedy, median of {n} (interleaved): "
          f"`python app.py` through gradio_client vs the engine in-process")
    print(f"{'':24s} {'decode tok/s (timings)':>23s} {'x in-process':>13s} {'whole answer ms':>16s} "
          f"{'x in-process':>13s}")
    names = [f"{d.name}/app.py" for d in app_dirs] + ["in-process"]
    for name, (rate, wall) in zip(names, medians, strict=True):
        print(f"{name:24s} {rate:23.1f} {rate / own_rate:12.2f}x {1e3 * wall:16.0f} {wall / own_wall:12.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--concurrent-sizes", nargs="+", default=["toy", "1024x8"], choices=list(SIZES))
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slots", type=int, default=4, help="slots of the batch the batch-1 figures run in")
    ap.add_argument("--concurrent", type=int, default=8)
    ap.add_argument("--compile", action="store_true", help="also time the compiled decode step (batch-1 table)")
    ap.add_argument("--compile-concurrent", action="store_true", help="compile the concurrent runs' step too")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-concurrent", action="store_true")
    ap.add_argument("--app", action="store_true", help="also the real app through gradio_client on loopback")
    ap.add_argument("--app-stream", type=int, default=0, metavar="N",
                    help="N chats one at a time through `python app.py` (a subprocess) vs in-process")
    ap.add_argument("--app-dirs", type=Path, nargs="+", default=[REPO],
                    help="the checkouts whose app.py --app-stream runs (e.g. an older one beside this one)")
    args = ap.parse_args()
    torch.manual_seed(0)
    with torch.no_grad():
        # Each part's torch work in a thread of its own that ends with it, so no part's OpenMP pool outlives it
        # (ibllm/threads.py)
        if not args.skip_decode:
            if not (BASELINES / "refstyle.py").is_file():
                raise SystemExit(f"{BASELINES / 'refstyle.py'} not found (it ships in ../shared beside the repo)")
            in_passing_thread(bench_decode, args.sizes, args.prompt, args.new, args.repeats, args.compile, args.slots)
        if not args.skip_concurrent:  # in this thread: it runs its own torch work in passing threads
            bench_concurrent(args.concurrent_sizes, args.concurrent, args.prompt, args.new, args.compile_concurrent,
                             args.repeats)
    if args.app:
        bench_app(args.concurrent, args.new)
    if args.app_stream:
        bench_app_stream(args.app_stream, args.app_dirs)


if __name__ == "__main__":
    main()
