"""``python -m ibllm ...``: parity, generate, doctor, build-cache, merge-chinese."""

from __future__ import annotations

import argparse
import sys


def _cmd_parity(args: argparse.Namespace) -> int:
    from ibllm import parity

    results = parity.run(args.dir, only=args.only)
    print(parity.report(results))
    return 0 if results and all(r.ok for r in results) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ibllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("parity", help="compare against a reference fixture (e.g. ../shared/fixtures/parity-a)")
    p.add_argument("dir", help="fixture directory with config.json, model.safetensors, inputs, expected outputs")
    p.add_argument("--only", choices=["encoders", "preprocessing", "language"], help="run one check group")
    p.set_defaults(func=_cmd_parity)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
