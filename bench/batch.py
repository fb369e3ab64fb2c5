"""A batch run against the same requests answered one at a time (figures, not pass/fail).

N requests (the toy gallery's questions, repeated with their own ids) through ``ibllm.batch.run_batch`` with the
engine's decode slots, then the same requests one after another through ``ChatEngine.answer`` (the chat path), on
the same engine, warm (the files' embeddings memoised by the first pass). Answers are compared too.

    python bench/batch.py [--requests 64] [--max-batch 4] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ibllm.batch import run_batch  # noqa: E402
from ibllm.config import GenerationConfig  # noqa: E402
from ibllm.factory import create_engine  # noqa: E402
from ibllm.types import Attachment  # noqa: E402

TOY = REPO / "examples" / "toy"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.0, help="> 0: sampled (seeded per request) answers, "
                        "which run longer than the toy model's greedy ones")
    args = parser.parse_args()

    gallery = json.loads((TOY / "gallery.json").read_text())["examples"]
    engine = create_engine(max_batch=args.max_batch)
    lines = []
    for i in range(args.requests):
        ex = gallery[i % len(gallery)]
        lines.append({"id": f"{ex['name']}-{i}", "question": ex["question"],
                      "inputs": [{"path": str(TOY / f["path"]), "modality": f["modality"]} for f in ex["files"]],
                      "generation": {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                                     "top_p": 1.0, "seed": i}})
    with tempfile.TemporaryDirectory() as tmp:
        requests, out = Path(tmp) / "requests.jsonl", Path(tmp) / "answers.jsonl"
        requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
        run_batch(engine, requests, Path(tmp) / "warm.jsonl", progress=False)  # memoise the files' embeddings
        start = time.perf_counter()
        report = run_batch(engine, requests, out, progress=False)
        batched = time.perf_counter() - start
        answers = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}

    start = time.perf_counter()
    same = 0
    for line in lines:
        attachments = [Attachment(i["path"], i["modality"]) for i in line["inputs"]]
        generation = GenerationConfig(**line["generation"])
        same += engine.answer(line["question"], attachments=attachments, generation=generation) == \
            answers[line["id"]]["answer"]
    alone = time.perf_counter() - start
    tokens = sum(r["completion_tokens"] for r in answers.values())
    engine.close()
    print(f"{args.requests} requests ({tokens} answer tokens, {report.answered} answered, {report.failed} failed), "
          f"{args.max_batch} decode slots, {engine.info.device}")
    print(f"batch run {batched:.2f} s ({args.requests / batched:.1f} req/s, {tokens / batched:.0f} tok/s); one at a "
          f"time {alone:.2f} s ({args.requests / alone:.1f} req/s): x{alone / batched:.2f}; "
          f"{same}/{args.requests} answers identical")


if __name__ == "__main__":
    main()
