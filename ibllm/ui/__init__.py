"""The Gradio web chat: ``build_demo(engine)`` assembles it, ``launch_options()`` says how to serve it."""

import os

# Gradio reads this when it is first imported; the app never reports usage (app.py sets it too, earlier).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from ibllm.ui.blocks import build_demo, launch_options  # noqa: E402

__all__ = ["build_demo", "launch_options"]
