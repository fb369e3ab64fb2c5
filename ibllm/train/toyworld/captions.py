"""Language: captions and instruction Q&A about a scene, naming only what a modality carries."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from ibllm.train.toyworld.latents import CARRIES, MODALITIES, Scene

_NUMBER = {1: "one", 2: "two", 3: "three"}
_PLURAL = {"sphere": "spheres", "cube": "cubes", "cylinder": "cylinders", "cone": "cones", "torus": "toruses",
           "pyramid": "pyramids"}
_POSITION_PHRASE = {"left": "on the left", "centre": "in the centre", "right": "on the right"}
_MOTION_PHRASE = {"still": "standing still", "left": "moving left", "right": "moving right", "up": "moving up",
                  "down": "moving down", "spinning": "spinning"}

QUESTIONS: dict[str, tuple[str, ...]] = {
    "shape": ("What shape is it?", "What is the shape of the object?", "What kind of object is this?",
              "Which shape do you see?", "What object is this?"),
    "colour": ("What colour is it?", "What is the colour of the object?", "Which colour is the object?",
               "What color is it?"),
    "size": ("How big is it?", "Is it large or small?", "What size is the object?"),
    "position": ("Where is it?", "Where is the object?", "Is it on the left, in the centre or on the right?"),
    "count": ("How many objects are there?", "How many are there?", "How many things do you see?"),
    "motion": ("Which way does it move?", "How is it moving?", "Is it moving?", "What is the object doing?"),
    "describe": ("Describe it.", "Describe the scene.", "What do you see?", "Describe what you see."),
}

_CAPTION_TEMPLATES = ("{NP}{rest}.", "There {be} {np}{rest}.", "A picture of {np}{rest}.")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_for(scene: Scene, modality: str = "text", template: int = 0) -> str:
    """A sentence naming exactly the latents ``modality`` carries ("A large red cube on the left, moving left.")."""
    carried = CARRIES[modality]
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


def answer_for(scene: Scene, latent: str, modality: str = "text", question: str = "") -> str:
    """The answer a trained model should give; one fixed style per latent keeps the tiny LM's job easy."""
    plural = scene.count > 1 and "count" in CARRIES[modality]
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
        noun = (_PLURAL[scene.shape] if scene.count > 1 else scene.shape) if "shape" in CARRIES[modality] else (
            "objects" if scene.count > 1 else "object")
        return f"There {'are' if scene.count > 1 else 'is'} {_NUMBER[scene.count]} {noun}."
    if latent == "motion":
        sentence = f"{they} {_MOTION_PHRASE[scene.motion]}."
        if question.startswith("Is it moving"):
            sentence = ("No, " if scene.motion == "still" else "Yes, ") + sentence[0].lower() + sentence[1:]
        return sentence
    if latent == "describe":
        return caption_for(scene, modality)
    raise ValueError(f"unknown latent {latent!r}")


def expected_words(scene: Scene, latent: str, modality: str = "text") -> list[str]:
    """Words a correct answer must contain (lower-case; plural forms contain the singular).

    Position and motion are phrases ("on the left", "moving left"), so one cannot pass for the other.
    """
    if latent == "describe":
        # A caption says "a cube", not "one cube": the count is only checked when it is more than one.
        return [w for n in CARRIES[modality] if not (n == "count" and scene.count == 1)
                for w in expected_words(scene, n, modality)]
    if latent == "count":
        return [_NUMBER[scene.count]]
    if latent == "position":
        return [_POSITION_PHRASE[scene.position]]
    if latent == "motion":
        return ["still" if scene.motion == "still" else _MOTION_PHRASE[scene.motion]]
    return [str(getattr(scene, latent))]


def questions_for(modality: str, scene: Scene, rng: np.random.Generator | None = None,
                  per_latent: int = 1) -> list[dict[str, Any]]:
    """Q&A about what ``modality`` carries, plus one "describe" item.

    Each item: ``{"latent", "question", "answer", "expected"}``. Without ``rng`` the first ``per_latent``
    phrasings are used (deterministic, for evaluation); with it, ``per_latent`` distinct random ones.
    """
    if modality not in CARRIES:
        raise ValueError(f"unknown modality {modality!r}; known: {MODALITIES}")
    items = []
    for latent in (*CARRIES[modality], "describe"):
        phrasings = QUESTIONS[latent]
        k = min(per_latent, len(phrasings))
        chosen = phrasings[:k] if rng is None else [phrasings[i] for i in rng.choice(len(phrasings), k, False)]
        for q in chosen:
            items.append({"latent": latent, "question": q, "answer": answer_for(scene, latent, modality, q),
                          "expected": expected_words(scene, latent, modality)})
    return items


def answer_is_correct(answer: str, expected: Iterable[str]) -> bool:
    """Every expected word appears in the answer (case-insensitive, substring: 'cubes' counts for 'cube')."""
    low = answer.lower()
    return all(w.lower() in low for w in expected)
