"""Visual cache and generation controls, and the one place their values become the engine's settings objects.

The controls start at the served model's own settings (``ModelConfig.visual_cache`` / ``generation``), so the
browser, the API (whose optional parameters default to these components' values), the CLI and the evaluation
all serve the same defaults.

A handler asks for settings objects by keyword (``*, cache: VisualCacheConfig, generation: GenerationConfig``);
``Controls.bind`` turns it into the function Gradio calls, whose parameters are the handler's own followed by one
per control, named as the API names them (``cache, cache_top_k, …, seed``), together with the list of components
in that same order. So the order of a handler's inputs is defined once, here, and the handler never sees a
slider's value.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import gradio as gr

from ibllm.config import GenerationConfig, PictureConfig, VisualCacheConfig

Component = gr.components.Component


class ControlGroup:
    """A group of controls that ``named`` lists under their API parameter names, in the API's order."""

    def named(self) -> dict[str, Component]:
        raise NotImplementedError

    def components(self) -> list[Component]:
        return list(self.named().values())


@dataclass
class CacheControls(ControlGroup):
    enabled: gr.Checkbox
    top_k: gr.Slider
    temperature: gr.Slider
    weight: gr.Slider
    # What the controls started at (the served model's settings): a value that is not a finite number falls back
    # to it, not to the config class's default (the toy model serves a cache weight of its own).
    defaults: VisualCacheConfig = VisualCacheConfig()

    def named(self) -> dict[str, Component]:
        return {"cache": self.enabled, "cache_top_k": self.top_k, "cache_temperature": self.temperature,
                "cache_weight": self.weight}

    def read(self, values: Mapping[str, Any]) -> VisualCacheConfig:
        """The settings from the controls' values by API name; without the on/off switch the cache is on."""
        return to_cache_options(values.get("cache", True), values["cache_top_k"], values["cache_temperature"],
                                values["cache_weight"], defaults=self.defaults)


@dataclass
class GenerationControls(ControlGroup):
    max_new_tokens: gr.Slider
    temperature: gr.Slider
    top_p: gr.Slider
    seed: gr.Number
    defaults: GenerationConfig = GenerationConfig()  # as ``CacheControls.defaults``

    def named(self) -> dict[str, Component]:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "seed": self.seed}

    def read(self, values: Mapping[str, Any]) -> GenerationConfig:
        return to_generation_options(values["max_new_tokens"], values["temperature"], values["top_p"],
                                     values["seed"], defaults=self.defaults)


# What "Answer with" offers: the text answer, a picture drawn from the inputs (Stable unCLIP), or both.
ANSWER_WITH = ("text", "picture", "text + picture")


@dataclass(frozen=True)
class AnswerForm:
    """What a turn answers with: text, and/or a picture drawn with ``picture`` (None: no picture)."""

    text: bool = True
    picture: PictureConfig | None = None


TEXT_ONLY = AnswerForm()


@dataclass
class PictureControls(ControlGroup):
    answer_with: gr.Radio
    steps: gr.Slider
    guidance: gr.Slider
    seed: gr.Number
    noise_level: gr.Slider

    def named(self) -> dict[str, Component]:
        return {"answer_with": self.answer_with, "picture_steps": self.steps, "picture_guidance": self.guidance,
                "picture_seed": self.seed, "picture_noise_level": self.noise_level}

    @staticmethod
    def read(values: Mapping[str, Any]) -> AnswerForm:
        return to_answer_form(values["answer_with"], values["picture_steps"], values["picture_guidance"],
                              values["picture_seed"], values["picture_noise_level"])


@dataclass
class Controls:
    """Every settings control of the page; ``bind`` connects a handler to the ones it asks for."""

    cache: CacheControls
    generation: GenerationControls
    picture: PictureControls | None = None

    def bind(self, handler: Callable[..., Any], leave_out: Sequence[str] = ()) -> tuple[Callable[..., Any],
                                                                                         list[Component]]:
        """``handler(*args, cache=VisualCacheConfig, generation=GenerationConfig, picture=AnswerForm)`` (any of the
        keywords) as
        ``(fn, controls)``: ``fn(*args, *control_values)``, with the controls' API names as its parameter names
        (Gradio's API shows them), and the matching components, to follow the handler's own inputs.

        ``leave_out`` names controls the endpoint does not offer (their ``read`` default applies).
        """
        signature = inspect.signature(handler)
        own = [p for p in signature.parameters.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        wanted = [name for name, p in signature.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        unknown = sorted(set(wanted) - {"cache", "generation", "picture"})
        if unknown or (self.picture is None and "picture" in wanted):
            raise TypeError(f"{handler.__name__} asks for unknown settings {unknown or ['picture']}")
        groups: dict[str, CacheControls | GenerationControls | PictureControls] = {
            name: getattr(self, name) for name in wanted}
        named = {name: c for group in groups.values() for name, c in group.named().items() if name not in leave_out}
        names, n = list(named), len(own)

        def settings(values: Sequence[Any]) -> dict[str, Any]:
            by_name = dict(zip(names, values, strict=True))
            return {key: group.read(by_name) for key, group in groups.items()}

        if inspect.isgeneratorfunction(handler):
            def fn(*args: Any) -> Any:
                yield from handler(*args[:n], **settings(args[n:]))
        else:
            def fn(*args: Any) -> Any:
                return handler(*args[:n], **settings(args[n:]))

        functools.update_wrapper(fn, handler, assigned=("__module__", "__name__", "__qualname__", "__doc__"),
                                 updated=())
        # Plain positional parameters: every value comes from a component (which holds the default).
        parameters = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                      for name in [*(p.name for p in own), *names]]
        fn.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        return fn, list(named.values())


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
        defaults=defaults,
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
        defaults=defaults,
    )


def _finite(value: Any, fallback: float) -> float:
    """A control's value as a float; NaN or infinity (an API caller's JSON can carry them past a slider, and
    they pass every clamp below) becomes the setting's default."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return fallback
    return number if math.isfinite(number) else fallback


def to_cache_options(enabled: bool, top_k: float, temperature: float, weight: float,
                     defaults: VisualCacheConfig | None = None) -> VisualCacheConfig:
    """The cache settings from the controls' values; one that is not a finite number takes ``defaults``' (the
    config class's own when None)."""
    d = defaults or VisualCacheConfig()
    return VisualCacheConfig(enabled=bool(enabled), top_k=max(1, int(_finite(top_k, d.top_k))),
                             temperature=_finite(temperature, d.temperature),
                             weight=min(max(_finite(weight, d.weight), 0.0), 1.0))


def to_generation_options(max_new_tokens: float, temperature: float, top_p: float, seed: float | None,
                          defaults: GenerationConfig | None = None) -> GenerationConfig:
    """The sampling settings from the controls' values; one that is not a finite number takes ``defaults``' (the
    config class's own when None)."""
    d = defaults or GenerationConfig()
    seed_value = None if seed is None or _finite(seed, -1) < 0 else int(_finite(seed, -1))
    return GenerationConfig(max_new_tokens=max(1, int(_finite(max_new_tokens, d.max_new_tokens))),
                            temperature=max(0.0, _finite(temperature, d.temperature)),
                            top_p=min(max(_finite(top_p, d.top_p), 0.0), 1.0), seed=seed_value)


def picture_controls(defaults: PictureConfig, *, visible: bool, render: bool = True) -> PictureControls:
    """How a turn answers (text and/or a picture) and the picture's knobs, starting at ``defaults``. Hidden where
    pictures cannot be drawn (the API keeps the parameters; a picture asked for there is explained instead)."""
    return PictureControls(
        answer_with=gr.Radio(list(ANSWER_WITH), value="text", label="Answer with", visible=visible, render=render,
                             info="A picture is drawn from the fused inputs by Stable unCLIP, the question as its "
                                  "prompt"),
        steps=gr.Slider(1, 100, value=defaults.steps, step=1, label="Picture steps", visible=visible, render=render,
                        info="Time grows with the steps (s/step below)"),
        guidance=gr.Slider(0, 20, value=defaults.guidance, step=0.5, label="Picture guidance", visible=visible,
                           render=render, info="How closely the picture follows the question; ≤ 1 = off (2× faster)"),
        seed=gr.Number(-1 if defaults.seed is None else defaults.seed, precision=0, label="Picture seed",
                       info="-1 = a new random seed each time", visible=visible, render=render),
        noise_level=gr.Slider(0, 999, value=defaults.noise_level, step=1, label="Picture noise level",
                              visible=visible, render=render,
                              info="Noise added to the embedding: higher = looser variations"),
    )


def to_answer_form(answer_with: str, steps: float, guidance: float, seed: float | None,
                   noise_level: float) -> AnswerForm:
    """ValueError for an unknown ``answer_with``; the picture settings are checked where they are used, so an
    out-of-range one is reported in the chat (``PictureConfig.check``) rather than silently clamped."""
    if answer_with not in ANSWER_WITH:
        raise ValueError(f"answer_with must be one of {', '.join(ANSWER_WITH)}; got {answer_with!r}")
    if answer_with == "text":
        return AnswerForm(text=True, picture=None)
    seed_value = None if seed is None or int(seed) < 0 else int(seed)
    picture = PictureConfig(steps=int(steps), guidance=float(guidance), seed=seed_value, noise_level=int(noise_level))
    return AnswerForm(text=answer_with != "picture", picture=picture)
