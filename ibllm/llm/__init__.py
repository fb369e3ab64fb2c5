"""The language side: gated LLaMA (llama.py) and its KV cache (kvcache.py), LoRA conversion for training (lora.py),
tokenizer, prompt formats, the decode loop (batching.py: slots, prefill, the batched one-token step), sampling
(sampling.py), single-request generation and the reference's batch loop (generate.py), text streaming (stream.py).
The scheduler that runs the decode loop for concurrent chats is ``ibllm.serving``."""
