"""app.py: the launcher's command line (the same weights options as the CLI)."""

from __future__ import annotations


def test_app_flags(monkeypatch):
    import app

    monkeypatch.setenv("GRADIO_SERVER_PORT", "8123")
    args = app.build_parser().parse_args(["--adapter", "7B.pth", "--device", "cpu", "--max-seq-len", "256"])
    assert (args.host, args.port) == ("127.0.0.1", 8123)
    given = {k: v for k, v in app.weights_kwargs(args).items() if v is not None}
    assert given == {"adapter": "7B.pth", "device": "cpu", "max_seq_len": 256}
    # Every weights option of the CLI is an option of the app (one definition).
    from ibllm.cli import build_parser

    generate = next(a for a in build_parser()._subparsers._group_actions[0].choices["generate"]._actions
                    if a.dest == "llama_dir")
    assert generate.help == next(a for a in app.build_parser()._actions if a.dest == "llama_dir").help
