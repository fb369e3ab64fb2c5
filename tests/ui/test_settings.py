"""ibllm.ui.settings: the controls, their conversion to the engine's settings and how handlers are bound to them."""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import gradio as gr
import pytest

from ibllm.config import GenerationConfig, VisualCacheConfig
from ibllm.ui.settings import Controls, cache_controls, generation_controls, to_cache_options, to_generation_options


def test_options_conversion():
    c = to_cache_options(False, 7.0, 15.0, 1.5)
    assert (c.enabled, c.top_k, c.temperature, c.weight) == (False, 7, 15.0, 1.0)
    g = to_generation_options(32.0, 0.0, 0.9, -1)
    assert (g.max_new_tokens, g.temperature, g.top_p, g.seed) == (32, 0.0, 0.9, None)
    assert to_generation_options(32, 0.5, 0.9, 42.0).seed == 42
    # NaN and infinity pass every clamp (max(nan, 0) is nan when nan comes first): each becomes its default
    nan, inf = float("nan"), float("inf")
    assert to_cache_options(True, nan, nan, nan) == VisualCacheConfig()
    assert to_generation_options(inf, nan, nan, nan) == GenerationConfig()


def test_a_value_that_is_not_a_number_falls_back_to_the_served_models_setting():
    """The controls start at the loaded model's settings (the toy model serves a cache weight of 0.25, not the
    class default 0.5); a NaN sent by an API caller takes that, not the config class's default."""
    served_cache = VisualCacheConfig(top_k=8, weight=0.25)
    served_generation = GenerationConfig(max_new_tokens=64, temperature=0.3, top_p=0.8)
    controls = Controls(cache_controls(served_cache, render=False),
                        generation_controls(served_generation, render=False))
    nan = float("nan")
    fn, _ = controls.bind(lambda *, cache, generation: (cache, generation))
    cache, generation = fn(True, nan, nan, nan, nan, nan, nan, -1)
    assert cache == served_cache
    assert generation == served_generation


@pytest.fixture
def controls() -> Controls:
    return Controls(cache_controls(VisualCacheConfig(), render=False),
                    generation_controls(GenerationConfig(), render=False))


def test_bind_names_each_control_as_the_api_does(controls):
    def respond(message, history, session, weights="", *, cache: VisualCacheConfig,
                generation: GenerationConfig) -> Iterator[tuple]:
        yield message, session, weights, cache, generation

    fn, components = controls.bind(respond)
    assert list(inspect.signature(fn).parameters) == [
        "message", "history", "session", "weights", "cache", "cache_top_k", "cache_temperature", "cache_weight",
        "max_new_tokens", "temperature", "top_p", "seed"]
    assert components == [*controls.cache.components(), *controls.generation.components()]
    assert inspect.isgeneratorfunction(fn) and fn.__name__ == "respond"
    ((message, session, weights, cache, generation),) = fn("hi", [], "S", "{}", False, 7.0, 15.0, 0.3, 32.0, 0.0,
                                                            0.9, -1)
    assert (message, session, weights) == ("hi", "S", "{}")
    assert cache == VisualCacheConfig(enabled=False, top_k=7, temperature=15.0, weight=0.3)
    assert generation == GenerationConfig(max_new_tokens=32, temperature=0.0, top_p=0.9, seed=None)


def test_bind_only_the_controls_a_handler_asks_for(controls):
    def lookup(history, inputs, *, cache: VisualCacheConfig) -> VisualCacheConfig:
        return cache

    fn, components = controls.bind(lookup, leave_out=["cache"])
    assert list(inspect.signature(fn).parameters) == ["history", "inputs", "cache_top_k", "cache_temperature",
                                                      "cache_weight"]
    assert components == controls.cache.components()[1:]
    assert fn([], None, 4, 10, 0.5) == VisualCacheConfig(enabled=True, top_k=4, temperature=10.0, weight=0.5)

    def compare(history, *, generation: GenerationConfig) -> GenerationConfig:
        return generation

    fn, components = controls.bind(compare)
    assert components == controls.generation.components()
    assert fn([], 5, 0.5, 1.0, 3).seed == 3

    def odd(history, *, sampler: object) -> None: ...

    with pytest.raises(TypeError, match="sampler"):
        controls.bind(odd)


def test_the_ui_serves_the_models_own_defaults():
    from dataclasses import replace

    from ibllm import create_engine
    from ibllm.ui import build_demo

    engine = create_engine()
    # The shipped model's own settings (greedy, 48 tokens), not the reference demo's (0.1, 128).
    engine.cfg = replace(engine.cfg, generation=replace(engine.cfg.generation, max_new_tokens=37, top_p=0.6),
                         visual_cache=replace(engine.cfg.visual_cache, top_k=4, weight=0.3))
    sliders = {b.label: b.value for b in build_demo(engine, gallery=None).blocks.values()
               if isinstance(b, gr.Slider | gr.Checkbox)}
    assert sliders["Max new tokens"] == 37 and sliders["Top-p"] == 0.6
    assert sliders["Temperature"] == engine.cfg.generation.temperature
    assert sliders["Cache size (top-k neighbours)"] == 4 and sliders["Cache weight"] == 0.3
    assert sliders["Use the visual cache"] is engine.cfg.visual_cache.enabled
