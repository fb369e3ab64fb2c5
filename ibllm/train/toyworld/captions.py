"""Language: captions and instruction Q&A about a scene, naming only what a modality carries."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ibllm.train.toyworld.latents import CARRIES, COLOURS, COUNTS, LATENTS, MODALITIES, SHAPES, SIZES, Scene
from ibllm.train.toyworld.questions import ASKED, draw, is_yes_no, phrasings

_NUMBER = {1: "one", 2: "two", 3: "three"}
_PLURAL = {"sphere": "spheres", "cube": "cubes", "cylinder": "cylinders", "cone": "cones", "torus": "toruses",
           "pyramid": "pyramids"}
_POSITION_PHRASE = {"left": "on the left", "centre": "in the centre", "right": "on the right"}
_MOTION_PHRASE = {"still": "standing still", "left": "moving left", "right": "moving right", "up": "moving up",
                  "down": "moving down", "spinning": "spinning"}

# The training part of the question grammar (``questions``), per latent and "describe".
QUESTIONS: dict[str, tuple[str, ...]] = {latent: phrasings(latent, "train") for latent in ASKED}

# How a "can't tell" answer names a latent ("I cannot tell its colour from this input").
_WHAT = {"shape": "its shape", "colour": "its colour", "size": "its size", "position": "where it is",
         "count": "how many there are", "motion": "how it moves"}
_CARRIED_NAME = {"shape": "shape", "colour": "colour", "size": "size", "position": "position", "count": "number",
                 "motion": "motion"}

_CAPTION_TEMPLATES = ("{NP}{rest}.", "There {be} {np}{rest}.", "A picture of {np}{rest}.")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def carried_by(modality: str | tuple[str, ...]) -> tuple[str, ...]:
    """The latents a modality carries; a tuple of latent names is taken as it is (a mix of inputs)."""
    return CARRIES[modality] if isinstance(modality, str) else modality


def mixed_scene(parts: Sequence[tuple[Scene, str | tuple[str, ...]]]) -> tuple[Scene, tuple[str, ...]]:
    """What several inputs show together: each latent from the first input that carries it (the rest from the
    first input), and the latents any of them carries. Inputs of different scenes should carry disjoint latents
    (a point cloud of one scene and an IMU trace of another), else the later ones' values are not told."""
    carried_sets = [carried_by(m) for _, m in parts]
    values = {}
    for name in LATENTS:
        source = next((s for (s, _), c in zip(parts, carried_sets, strict=True) if name in c), parts[0][0])
        values[name] = getattr(source, name)
    if values["count"] > 1:
        values["position"] = "centre"
    union = tuple(n for n in LATENTS if any(n in c for c in carried_sets))
    return Scene(**values, seed=parts[0][0].seed), union


def caption_for(scene: Scene, modality: str | tuple[str, ...] = "text", template: int = 0) -> str:
    """A sentence naming exactly the latents ``modality`` carries ("A large red cube on the left, moving left.")."""
    carried = carried_by(modality)
    plural = "count" in carried and scene.count > 1
    adjectives = [getattr(scene, n) for n in ("size", "colour") if n in carried]
    noun = (_PLURAL[scene.shape] if plural else scene.shape) if "shape" in carried else (
        "objects" if plural else "object")
    words = [*adjectives, noun]
    np_ = " ".join([_NUMBER[scene.count] if plural else _article(words[0]), *words])
    rest = ""
    if "position" in carried:
        rest += " " + _POSITION_PHRASE[scene.position]
    if "motion" in carried:
        rest += ", " + _MOTION_PHRASE[scene.motion] if rest else " " + _MOTION_PHRASE[scene.motion]
    text = _CAPTION_TEMPLATES[template % len(_CAPTION_TEMPLATES)]
    return text.format(NP=np_[0].upper() + np_[1:], np=np_, be="are" if plural else "is", rest=rest)


def cannot_tell(latent: str, modality: str | tuple[str, ...]) -> str:
    """The honest answer about a latent the input does not carry, naming what it does carry."""
    carried = [_CARRIED_NAME[n] for n in carried_by(modality)]
    shows = carried[0] if len(carried) == 1 else ", ".join(carried[:-1]) + " and " + carried[-1]
    return f"I cannot tell {_WHAT[latent]} from this input; it only shows the {shows}."


def answer_for(scene: Scene, latent: str, modality: str | tuple[str, ...] = "text", question: str = "") -> str:
    """The answer a trained model should give; one fixed style per latent keeps the tiny LM's job easy.

    A latent the modality does not carry gets ``cannot_tell``; a yes/no question about the motion ("Is it
    moving?") starts with "Yes," or "No,"."""
    carried = carried_by(modality)
    if latent != "describe" and latent not in carried:
        return cannot_tell(latent, carried)
    plural = scene.count > 1 and "count" in carried
    they = "They are" if plural else "It is"
    if latent == "shape":
        return f"{they} {_PLURAL[scene.shape]}." if plural else f"It is {_article(scene.shape)} {scene.shape}."
    if latent == "colour":
        return f"{they} {scene.colour}."
    if latent == "size":
        return f"{they} {scene.size}."
    if latent == "position":
        return f"{they} {_POSITION_PHRASE[scene.position]}."
    if latent == "count":
        noun = (_PLURAL[scene.shape] if scene.count > 1 else scene.shape) if "shape" in carried else (
            "objects" if scene.count > 1 else "object")
        return f"There {'are' if scene.count > 1 else 'is'} {_NUMBER[scene.count]} {noun}."
    if latent == "motion":
        sentence = f"{they} {_MOTION_PHRASE[scene.motion]}."
        if is_yes_no(question):
            sentence = ("No, " if scene.motion == "still" else "Yes, ") + sentence[0].lower() + sentence[1:]
        return sentence
    if latent == "describe":
        return caption_for(scene, carried)
    raise ValueError(f"unknown latent {latent!r}")


def expected_words(scene: Scene, latent: str, modality: str | tuple[str, ...] = "text") -> list[str]:
    """Words a correct answer must contain (lower-case; plural forms contain the singular).

    Position and motion are phrases ("on the left", "moving left"), so one cannot pass for the other.
    """
    carried = carried_by(modality)
    if latent == "describe":
        # A caption says "a cube", not "one cube": the count is only checked when it is more than one.
        return [w for n in carried if not (n == "count" and scene.count == 1)
                for w in expected_words(scene, n, carried)]
    if latent == "count":
        return [_NUMBER[scene.count]]
    if latent == "position":
        return [_POSITION_PHRASE[scene.position]]
    if latent == "motion":
        return ["still" if scene.motion == "still" else _MOTION_PHRASE[scene.motion]]
    return [str(getattr(scene, latent))]


def value_words(latent: str) -> tuple[str, ...]:
    """Every value of ``latent`` as an answer names it (for the strict judge: no *other* value may appear)."""
    if latent == "shape":
        return SHAPES
    if latent == "colour":
        return tuple(COLOURS)
    if latent == "size":
        return SIZES
    if latent == "position":
        return tuple(_POSITION_PHRASE.values())
    if latent == "count":
        return tuple(_NUMBER[c] for c in COUNTS)
    if latent == "motion":
        return ("still", *(p for m, p in _MOTION_PHRASE.items() if m != "still"))
    raise ValueError(f"unknown latent {latent!r}")


def questions_for(modality: str, scene: Scene, rng: np.random.Generator | None = None,
                  per_latent: int = 1, part: str = "train") -> list[dict[str, Any]]:
    """Q&A about what ``modality`` carries, plus one "describe" item.

    Each item: ``{"latent", "question", "answer", "expected"}``. Without ``rng`` the first ``per_latent``
    phrasings of ``part`` are used (deterministic); with it, ``per_latent`` random ones (``questions.draw``).
    """
    if modality not in CARRIES:
        raise ValueError(f"unknown modality {modality!r}; known: {MODALITIES}")
    items = []
    for latent in (*CARRIES[modality], "describe"):
        if rng is None:
            chosen = list(phrasings(latent, part)[:per_latent])
        else:
            chosen = list(dict.fromkeys(draw(latent, rng, part) for _ in range(per_latent)))
        for q in chosen:
            items.append({"latent": latent, "question": q, "answer": answer_for(scene, latent, modality, q),
                          "expected": expected_words(scene, latent, modality)})
    return items


def answer_is_correct(answer: str, expected: Iterable[str]) -> bool:
    """Every expected word appears in the answer (case-insensitive, substring: 'cubes' counts for 'cube')."""
    low = answer.lower()
    return all(w.lower() in low for w in expected)


def _names_other_value(low: str, scene: Scene, latent: str) -> bool:
    right = expected_words(scene, latent)[0].lower()
    return any(v.lower() in low for v in value_words(latent) if v.lower() != right)


def judge(answer: str, scene: Scene, latent: str, modality: str | tuple[str, ...] = "text") -> bool:
    """The strict judge: every carried latent asked about is named right and no other value of it is named.

    For a latent the input does not carry, right means saying so ("cannot tell" / "can't tell") and naming no
    value of it. "Describe" is right when every carried latent is (the count only when more than one)."""
    low = answer.lower()
    carried = carried_by(modality)
    if latent == "describe":
        names = [n for n in carried if not (n == "count" and scene.count == 1)]
        return all(answer_is_correct(answer, expected_words(scene, n, carried)) and
                   not _names_other_value(low, scene, n) for n in names)
    if latent not in carried:
        said = "cannot tell" in low or "can't tell" in low
        return said and not any(v.lower() in low for v in value_words(latent))
    return answer_is_correct(answer, expected_words(scene, latent, carried)) and not _names_other_value(
        low, scene, latent)
