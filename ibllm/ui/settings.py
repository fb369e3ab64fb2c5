"""Visual cache and generation controls, and their conversion to the engine's settings objects.

The controls start at the served model's own settings (``ModelConfig.visual_cache`` / ``generation``), so the
browser, the API (whose optional parameters default to these components' values), the CLI and the evaluation
all serve the same defaults."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from ibllm.config import GenerationConfig, VisualCacheConfig


@dataclass
class CacheControls:
    enabled: gr.Checkbox
    top_k: gr.Slider
    temperature: gr.Slider
    weight: gr.Slider

    def components(self) -> list[gr.components.Component]:
        return [self.enabled, self.top_k, self.temperature, self.weight]


@dataclass
class GenerationControls:
    max_new_tokens: gr.Slider
    temperature: gr.Slider
    top_p: gr.Slider
    seed: gr.Number

    def components(self) -> list[gr.components.Component]:
        return [self.max_new_tokens, self.temperature, self.top_p, self.seed]


def cache_controls(defaults: VisualCacheConfig, render: bool = True) -> CacheControls:
    """The visual cache knobs, starting at ``defaults``."""
    return CacheControls(
        enabled=gr.Checkbox(defaults.enabled, label="Use the visual cache", render=render,
                            info="Mixes the input's feature with its nearest image features (helps non-image inputs)"),
        top_k=gr.Slider(1, 64, value=defaults.top_k, step=1, label="Cache size (top-k neighbours)", render=render),
        temperature=gr.Slider(1, 100, value=defaults.temperature, step=1, label="Cache temperature", render=render,
                              info="Sharpness of the softmax over neighbour similarities"),
        weight=gr.Slider(0, 1, value=defaults.weight, step=0.05, label="Cache weight", render=render,
                         info="0 = the input's own feature, 1 = only the retrieved one"),
    )


def generation_controls(defaults: GenerationConfig, render: bool = True) -> GenerationControls:
    """The sampling knobs, starting at ``defaults`` (seed -1 stands for None: a new random seed each time)."""
    return GenerationControls(
        max_new_tokens=gr.Slider(1, 1024, value=defaults.max_new_tokens, step=1, label="Max new tokens", render=render),
        temperature=gr.Slider(0, 2, value=defaults.temperature, step=0.05, label="Temperature", render=render,
                              info="0 = greedy"),
        top_p=gr.Slider(0.05, 1, value=defaults.top_p, step=0.05, label="Top-p", render=render),
        seed=gr.Number(-1 if defaults.seed is None else defaults.seed, precision=0, label="Seed",
                       info="-1 = a new random seed each time", render=render),
    )


def to_cache_options(enabled: bool, top_k: float, temperature: float, weight: float) -> VisualCacheConfig:
    return VisualCacheConfig(enabled=bool(enabled), top_k=max(1, int(top_k)), temperature=float(temperature),
                        weight=min(max(float(weight), 0.0), 1.0))


def to_generation_options(max_new_tokens: float, temperature: float, top_p: float,
                          seed: float | None) -> GenerationConfig:
    seed_value = None if seed is None or int(seed) < 0 else int(seed)
    return GenerationConfig(max_new_tokens=max(1, int(max_new_tokens)), temperature=max(0.0, float(temperature)),
                             top_p=min(max(float(top_p), 0.0), 1.0), seed=seed_value)
