"""A tiny LLaMA with every extra switched on (biases, LoRA, gates all non-zero), for the language-side tests."""

from __future__ import annotations

import torch

from ibllm.config import LlamaConfig
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
