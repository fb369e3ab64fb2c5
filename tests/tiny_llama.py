"""A tiny LLaMA with every extra switched on (biases, LoRA, gates all non-zero), for the language-side tests."""

from __future__ import annotations

from dataclasses import replace

import torch

from ibllm.config import GenerationConfig, LlamaConfig
from ibllm.llm.batching import Request
from ibllm.llm.generate import generate_tokens
from ibllm.llm.llama import Transformer, init_weights

# Deliberately not the parity sizes: 3 heads of 16, odd vocabulary, FFN hidden rounded to 32.
TINY = LlamaConfig(dim=48, n_layers=3, n_heads=3, vocab_size=97, multiple_of=32, max_seq_len=32, max_batch_size=2,
                   lora_rank=3)


def tiny(cfg: LlamaConfig = TINY, query_layer: int | None = 2, seed: int = 0) -> Transformer:
    model = Transformer(cfg, query_layer)
    init_weights(model, torch.Generator().manual_seed(seed), nonzero=0.3)
    return model.eval()


def injection_for(model: Transformer, batch: int, seed: int = 1) -> torch.Tensor:
    adapters = torch.randn(model.query_layer, batch, 1, model.cfg.dim, generator=torch.Generator().manual_seed(seed))
    return model.visual_injection(adapters)


def tokens(batch: int, length: int, vocab: int = TINY.vocab_size, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# Requests for the decode-loop and scheduler tests: ragged prompts, one injection and one seed each.
CFG = replace(TINY, max_seq_len=64)
GREEDY = GenerationConfig.greedy(12)
SAMPLED = GenerationConfig(max_new_tokens=12, temperature=1.0, top_p=0.9)


def prompt(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1, *torch.randint(3, CFG.vocab_size, (length - 1,), generator=g).tolist()]


def requests(model, options=GREEDY, lengths=(3, 9, 5, 14), eos_id=-1) -> list[Request]:
    return [Request(prompt(n, seed=i), injection_for(model, 1, seed=10 + i), replace(options, seed=100 + i), eos_id)
            for i, n in enumerate(lengths)]


def alone(model, request: Request) -> list[int]:
    return list(generate_tokens(model, request.prompt, request.injection, request.options, eos_id=request.eos_id))


class Recorded:
    """The model, recording ("prefill" or "step", tokens shape) of every call; ``on_prefill`` runs in each prefill."""

    def __init__(self, model, on_prefill=None):
        self.model, self.on_prefill, self.calls = model, on_prefill, []

    def __call__(self, tokens, start_pos, *args, **kwargs):
        prefill = not torch.is_tensor(start_pos)
        self.calls.append(("prefill" if prefill else "step", tuple(tokens.shape)))
        if prefill and self.on_prefill is not None:
            self.on_prefill()
        return self.model(tokens, start_pos, *args, **kwargs)

    def __getattr__(self, name):  # new_cache, injection_buffer, parameters: the model's own
        return getattr(self.model, name)
