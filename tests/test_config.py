"""Request settings given as JSON (the API's extension field, batch files) become checked config objects."""

from __future__ import annotations

import pytest

from ibllm.config import GenerationConfig, VisualCacheConfig, with_settings


def test_given_settings_replace_the_defaults_and_the_rest_stay():
    base = GenerationConfig(max_new_tokens=48, temperature=0.0)
    got = with_settings(base, {"temperature": 1, "seed": 7, "top_p": 0.9}, "generation")
    assert got == GenerationConfig(max_new_tokens=48, temperature=1.0, top_p=0.9, seed=7)
    assert isinstance(got.temperature, float)
    assert with_settings(base, None, "generation") is base
    assert with_settings(base, {"seed": None}, "generation").seed is None
    assert with_settings(VisualCacheConfig(), {"enabled": False, "top_k": 3}, "visual_cache") == \
        VisualCacheConfig(enabled=False, top_k=3)


@pytest.mark.parametrize(("values", "says"), [
    ({"temprature": 1.0}, "unknown generation setting 'temprature'"),
    ({"max_new_tokens": 2.5}, "whole number"),
    ({"max_new_tokens": True}, "whole number"),
    ({"temperature": "hot"}, "number >= 0"),
    ({"temperature": -1}, ">= 0"),
    ({"temperature": float("nan")}, "finite"),  # passed every comparison: sampling then failed (a 500 from the API)
    ({"temperature": float("inf")}, "finite"),
    ({"max_new_tokens": float("nan")}, "whole number"),
    ({"top_p": 1.5}, "(0, 1]"),
    ({"top_p": 0}, "(0, 1]"),
    ("greedy", "object of settings"),
])
def test_wrong_settings_are_named_with_what_they_accept(values, says):
    with pytest.raises(ValueError) as e:
        with_settings(GenerationConfig(), values, "generation")
    assert says in str(e.value)


def test_a_switch_takes_a_boolean_only():
    with pytest.raises(ValueError, match="true or false"):
        with_settings(VisualCacheConfig(), {"enabled": 1}, "visual_cache")
