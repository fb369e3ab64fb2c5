"""What the OpenAI-compatible API costs on top of the engine, and what concurrent API requests gain (figures, not
pass/fail).

The app is served as ``app.py`` serves it (Gradio + the API on one port, loopback) around one engine. For one
gallery question (a point cloud, warm: its embedding memoised): the engine's own answer time and time to first
token, then the same through the ``openai`` client (whole answer, and time to the first streamed content chunk).
Then N requests at once from N client threads against N one after another.

    python bench/api.py [--repeats 20] [--concurrent 8] [--max-batch 4]
"""

from __future__ import annotations

import argparse
import base64
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import openai  # noqa: E402

from ibllm.api import OpenAIApi  # noqa: E402
from ibllm.config import GenerationConfig  # noqa: E402
from ibllm.factory import create_engine  # noqa: E402
from ibllm.types import Attachment  # noqa: E402
from tests.app_helpers import launch  # noqa: E402

POINT = REPO / "examples" / "toy" / "pyramid_point.ply"
QUESTION = "What shape is it?"


def median_ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    engine = create_engine(max_batch=args.max_batch)
    api = OpenAIApi(engine)
    demo, url = launch(engine, api)
    client = openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key="unused", max_retries=0)
    part = {"type": "file", "file": {"filename": POINT.name, "file_data": "data:application/octet-stream;base64,"
                                     + base64.b64encode(POINT.read_bytes()).decode()}}
    messages = [{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}]
    generation = GenerationConfig(max_new_tokens=args.max_tokens, temperature=0.0)
    print(f"model {engine.info.name} ({engine.info.device} {engine.info.dtype}), {engine.scheduler.slots} decode "
          f"slots; {POINT.name} ({POINT.stat().st_size / 1024:.0f} kB, {len(part['file']['file_data']) / 1024:.0f} "
          f"kB as base64); {args.repeats} repeats, medians")

    def engine_turn() -> tuple[float, float]:
        start, first = time.perf_counter(), None
        for event in engine.chat(QUESTION, attachments=[Attachment(str(POINT), "point")], generation=generation):
            if first is None and event.delta:
                first = time.perf_counter() - start
        return time.perf_counter() - start, first or 0.0

    def api_turn() -> float:
        start = time.perf_counter()
        client.chat.completions.create(model=api.model, messages=messages, max_tokens=args.max_tokens, temperature=0)
        return time.perf_counter() - start

    def api_first_chunk() -> float:
        start = time.perf_counter()
        with client.chat.completions.create(model=api.model, messages=messages, max_tokens=args.max_tokens,
                                            temperature=0, stream=True) as stream:
            first = next(time.perf_counter() - start for c in stream if c.choices and c.choices[0].delta.content)
            for _ in stream:
                pass
        return first

    try:
        engine_turn(), api_turn(), api_first_chunk()  # warm: the file's embedding memoised, connections open
        # Interleaved, so that load from elsewhere on the machine falls on all three alike.
        runs = [(engine_turn(), api_turn(), api_first_chunk()) for _ in range(args.repeats)]
        engine_runs, api_runs, first_chunks = (list(r) for r in zip(*runs, strict=True))
        whole_engine, whole_api = statistics.median(r[0] for r in engine_runs), statistics.median(api_runs)
        print(f"whole answer: engine {whole_engine * 1000:.1f} ms, API {whole_api * 1000:.1f} ms "
              f"({(whole_api - whole_engine) * 1000:+.1f} ms: HTTP, JSON, base64, file written and detected)")
        print(f"first token: engine {median_ms([r[1] for r in engine_runs])}, API first streamed chunk "
              f"{median_ms(first_chunks)}")

        n = args.concurrent
        start = time.perf_counter()
        for _ in range(n):
            api_turn()
        one_by_one = time.perf_counter() - start
        start = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(lambda _: api_turn(), range(n)))
        together = time.perf_counter() - start
        print(f"{n} API requests: one after another {one_by_one:.2f} s, at once {together:.2f} s "
              f"(x{one_by_one / together:.2f})")
    finally:
        demo.close()
        engine.close()


if __name__ == "__main__":
    main()
