"""``python app.py``: the ImageBind-LLM web chat on http://127.0.0.1:7860.

With no arguments it serves the small default model shipped in ``assets/``; the weights flags (the same as
``python -m ibllm generate``) select the real ImageBind-LLM files. The same server answers the OpenAI-compatible API
(``/v1/chat/completions``, ``/v1/models``) from the same engine; ``IBLLM_API_KEY`` makes it ask for a key.
``--host``/``--port`` or the usual ``GRADIO_SERVER_NAME``/``GRADIO_SERVER_PORT`` choose where it listens (Hugging
Face Spaces sets those).
"""

from __future__ import annotations

import os

# Before gradio is imported anywhere: the launch flag alone does not stop its usage reporting.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import argparse  # noqa: E402
import sys  # noqa: E402

from ibllm.api import OpenAIApi  # noqa: E402
from ibllm.cli import add_weights_arguments, show_logs, weights_kwargs  # noqa: E402
from ibllm.factory import create_engine  # noqa: E402
from ibllm.ui import build_demo, launch_options  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to listen on (env GRADIO_SERVER_NAME; default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                        help="port (env GRADIO_SERVER_PORT; default 7860)")
    add_weights_arguments(parser)  # the same weights options as ``python -m ibllm generate``
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    show_logs()
    engine = create_engine(**weights_kwargs(args))
    demo = build_demo(engine)
    api = OpenAIApi(engine)
    print(f"[OpenAI-compatible API: http://{args.host}:{args.port}/v1, model {api.model!r}"
          f"{', key required' if api.settings.api_key else ''}]", file=sys.stderr)
    demo.launch(server_name=args.host, server_port=args.port, app_kwargs=api.app_kwargs(), **launch_options())
    return 0


if __name__ == "__main__":
    sys.exit(main())
