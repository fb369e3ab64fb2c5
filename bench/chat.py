"""Time to first token and decode speed of whole chat turns through the engine (figures, not pass/fail).

For each gallery example of examples/toy: a cold turn (the file is decoded and encoded) and a warm turn (the
embedding comes from the per-content cache), split into encode / retrieve / bind / prefill / decode.

    python bench/chat.py [--repeats 3] [--device cpu] [--llama-dir ... for the official weights]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ibllm.cli import add_weights_arguments, weights_kwargs  # noqa: E402
from ibllm.config import GenerationConfig  # noqa: E402
from ibllm.factory import create_engine  # noqa: E402
from ibllm.types import Attachment  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    add_weights_arguments(parser)
    args = parser.parse_args()

    t0 = time.perf_counter()
    model = create_engine(**weights_kwargs(args))
    print(f"model: {model.info.name} ({model.info.weights}); {model.info.device} {model.info.dtype}; "
          f"load {time.perf_counter() - t0:.2f} s")
    gallery = json.loads((REPO / "examples" / "toy" / "gallery.json").read_text())["examples"]
    options = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=0.0)
    print(f"{'example':<20} {'inputs':<14} {'cold TTFT':>10} {'warm TTFT':>10} {'encode':>8} {'retrieve':>9} "
          f"{'bind':>6} {'prefill':>8} {'decode tok/s':>13}")
    for ex in gallery:
        atts = [Attachment(str(REPO / "examples" / "toy" / f["path"]), f["modality"], f.get("weight", 1.0))
                for f in ex["files"]]
        model.embeddings = type(model.embeddings)()  # cold: forget earlier encodings
        runs = []
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            first = None
            for event in model.chat(ex["question"], attachments=atts, generation=options):
                if first is None and event.delta:
                    first = time.perf_counter() - start
            runs.append((first or 0.0, event.timings))
        cold, warm = runs[0], runs[1:]
        t = warm[-1][1]
        print(f"{ex['name']:<20} {'+'.join(a.modality for a in atts):<14} {cold[0] * 1000:>8.0f}ms "
              f"{statistics.median(r[0] for r in warm) * 1000:>8.0f}ms {cold[1].encode * 1000:>6.0f}ms "
              f"{t.cache * 1000:>7.1f}ms {t.bind * 1000:>4.1f}ms {t.prefill * 1000:>6.1f}ms "
              f"{statistics.median(r[1].decode_tokens_per_s for r in warm):>13.0f}")


if __name__ == "__main__":
    main()
