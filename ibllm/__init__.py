"""ibllm: ImageBind-LLM (multimodal instruction-tuned LLaMA through ImageBind's joint space) as a chat app.

The front door is ``create_engine``: the embedded default model or the official weights, loaded with everything
that belongs to them (tokenizer, visual cache, defaults), as one ``ChatEngine``. See ARCHITECTURE.md.
"""

__version__ = "0.1.0"

from ibllm.engine import ChatEngine  # noqa: E402
from ibllm.factory import create_engine  # noqa: E402

__all__ = ["ChatEngine", "create_engine", "__version__"]
