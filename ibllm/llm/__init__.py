"""The language side: gated LLaMA (llama.py), LoRA conversion for training (lora.py), tokenizer, prompt
formats, the token engine (generate.py) and text streaming (stream.py)."""
