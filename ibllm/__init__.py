"""ibllm: ImageBind-LLM (multimodal instruction-tuned LLaMA through ImageBind's joint space) as a chat app."""

__version__ = "0.1.0"
