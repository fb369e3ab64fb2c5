"""``python app.py``: the ImageBind-LLM web chat on http://127.0.0.1:7860.

With no arguments it serves the small default model shipped in ``assets/``; the weights flags (the same as
``python -m ibllm generate``) select the real ImageBind-LLM files. ``--host``/``--port`` or the usual
``GRADIO_SERVER_NAME``/``GRADIO_SERVER_PORT`` choose where it listens (Hugging Face Spaces sets those).
"""

from __future__ import annotations

import os

# Before gradio is imported anywhere: the launch flag alone does not stop its usage reporting.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import argparse  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

WEIGHT_FLAGS = {
    "llama_dir": "folder with LLaMA's params.json, consolidated.*.pth and tokenizer.model",
    "adapter": "ImageBind-LLM adapter checkpoint (7B.pth)",
    "imagebind": "ImageBind (+ Point-Bind) encoder checkpoint (imagebind_w3D.pth)",
    "knn_index": "visual cache index (knn.index)",
    "device": "cpu, cuda, cuda:1, … (default: cuda when available)",
    "dtype": "float32, float16 or bfloat16 (default: float16 on GPU, float32 on CPU)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to listen on (env GRADIO_SERVER_NAME; default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                        help="port (env GRADIO_SERVER_PORT; default 7860)")
    weights = parser.add_argument_group("weights (default: the embedded model in assets/)")
    for name, text in WEIGHT_FLAGS.items():
        weights.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=text)
    return parser


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The weights flags that were given, as ``create_engine`` keyword arguments."""
    return {name: getattr(args, name) for name in WEIGHT_FLAGS if getattr(args, name) is not None}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ibllm.factory import create_engine
    from ibllm.ui import build_demo, launch_options

    engine = create_engine(**model_kwargs(args))
    demo = build_demo(engine)
    demo.launch(server_name=args.host, server_port=args.port, **launch_options())
    return 0


if __name__ == "__main__":
    sys.exit(main())
