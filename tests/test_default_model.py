"""The shipped default (``assets/toy``, trained by ``python -m ibllm.train run``) answers its own gallery.

Every gallery example, including zero-shot ones (audio, point cloud, IMU, video never met the language side in
training) and the mixes. Greedy decoding, so the answers are deterministic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

ASSETS = REPO / "assets" / "toy"
GALLERY = REPO / "examples" / "toy" / "gallery.json"

# Gallery entries the shipped model must answer correctly: all 16, one or more per input kind and the three mixes
# (README's evaluation table says how often each modality is right on held-out scenes).
CHECKED = ("red_cube", "green_spheres", "cone_moving_left", "spinning_torus", "bell_torus", "knocking_cube",
           "pyramid", "cylinder", "blue_cube", "white_cone", "going_up", "spinning_sensor", "green_cylinder",
           "purple_sphere", "yellow_torus", "orange_cube")

pytestmark = pytest.mark.skipif(
    not (ASSETS / "model.safetensors").is_file(),
    reason=f"no trained default model in {ASSETS} (train and ship it: python -m ibllm.train run --out runs/toy "
           "--ship assets/toy)")


@pytest.fixture(scope="module")
def engine() -> Any:
    from ibllm.factory import load_default

    return load_default(ASSETS)


@pytest.fixture(scope="module")
def gallery() -> dict[str, dict[str, Any]]:
    if not GALLERY.is_file():
        pytest.skip(f"{GALLERY} is missing (python examples/make_examples.py)")
    return {e["name"]: e for e in json.loads(GALLERY.read_text())["examples"]}


def _ask(engine: Any, entry: dict[str, Any], cache: bool = True, question: str | None = None,
         history: tuple[Any, ...] = ()) -> str:
    from ibllm.config import GenerationConfig, VisualCacheConfig
    from ibllm.types import Attachment

    files = [Attachment(str(GALLERY.parent / f["path"]), f["modality"], f["weight"]) for f in entry["files"]]
    return engine.answer(question or entry["question"], history=history, attachments=files,
                         visual_cache=VisualCacheConfig(enabled=cache),
                         generation=GenerationConfig(temperature=0.0, max_new_tokens=32))


def test_default_is_the_trained_toy_model(engine: Any) -> None:
    assert engine.info.trained and engine.info.is_default
    assert engine.info.cache_entries > 0
    assert sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file()) <= 50 * 2**20


@pytest.mark.parametrize("name", CHECKED)
def test_gallery_answer_names_the_right_thing(engine: Any, gallery: dict[str, dict[str, Any]], name: str) -> None:
    if name not in gallery:
        pytest.skip(f"{name} is not in {GALLERY.name}")
    entry = gallery[name]
    answer = _ask(engine, entry)
    low = answer.lower()
    assert all(word.lower() in low for word in entry["expect"]), f"{name}: {entry['question']!r} -> {answer!r}"


TWO_TURN = ("red_cube", "cone_moving_left", "bell_torus", "pyramid")
# Known wrong: after "It is red." the shipped model calls the red cube a cylinder (README's evaluation: image shape
# in follow-ups is not at its target). Strict: the test fails once the answer is right, so this list stays honest.
WRONG_FOLLOW_UPS = {"red_cube"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(
    strict=True, reason="known wrong follow-up answer of the shipped model")) if n in WRONG_FOLLOW_UPS else n
    for n in TWO_TURN])
def test_two_turn_example_follow_up_is_answered_in_context(engine: Any, gallery: dict[str, dict[str, Any]],
                                                           name: str) -> None:
    """The example's question, the model's own answer as history, then the follow-up (another latent, or one
    the inputs do not carry: then the right answer says it cannot tell)."""
    from ibllm.types import Turn

    entry = gallery[name]
    first = _ask(engine, entry)
    followup = entry["followup"]
    answer = _ask(engine, entry, question=followup["question"], history=(Turn(entry["question"], first),))
    low = answer.lower()
    assert all(w.lower() in low for w in followup["expect"]), f"{name}: {first!r}, {followup['question']!r} -> " \
                                                              f"{answer!r}"


def test_two_turn_examples_are_the_gallery_ones(gallery: dict[str, dict[str, Any]]) -> None:
    assert {name for name, e in gallery.items() if "followup" in e} == set(TWO_TURN)


def test_text_only_question_gets_an_answer(engine: Any) -> None:
    from ibllm.config import GenerationConfig

    answer = engine.answer("What colour is it?", generation=GenerationConfig(temperature=0.0, max_new_tokens=16))
    assert answer.strip()


def test_assets_are_small_and_fp16() -> None:
    from ibllm.checkpoint import read_state_dict

    state = read_state_dict(ASSETS / "model.safetensors")
    assert {str(v.dtype) for v in state.values() if v.is_floating_point()} == {"torch.float16"}
    assert Path(ASSETS / "config.json").is_file() and Path(ASSETS / "tokenizer.model").is_file()
    assert (ASSETS / "cache" / "index.faiss").is_file()


def test_every_gallery_example_is_checked(gallery: dict[str, dict[str, Any]]) -> None:
    assert set(gallery) == set(CHECKED)
