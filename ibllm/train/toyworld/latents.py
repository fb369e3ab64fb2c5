"""The latents: what a scene is (a frozen :class:`Scene`), which latents each modality carries, the split.

Latents (a frozen :class:`Scene`): shape, colour, size, position, count, motion, plus ``seed`` for the
nuisance (exact size, orientation, lighting, background, noise, timing) so a Scene renders to the same bytes
every time.

Which latents each modality carries (what a person could read off that file alone). Questions for a
modality-only evaluation come from :func:`~ibllm.train.toyworld.captions.questions_for` and ask only about these:

============  =====  ======  ====  ========  =====  ======  ==================================================
modality      shape  colour  size  position  count  motion  how
============  =====  ======  ====  ========  =====  ======  ==================================================
image         yes    yes     yes   yes       yes    yes     shaded 3D render; a moving object leaves a fading
                                                            trail behind it, a spinning one is blurred with
                                                            arcs around it (a long-exposure photo)
video         yes    yes     yes   yes       yes    yes     2 s at 12 fps, the objects moving; every frame has
                                                            the image's motion cues (motion blur)
point         yes    no      no    no        no     no      8192 surface samples of one object, unit sphere
audio         yes    no      yes   no        no     no      shape -> timbre / envelope, size -> pitch
depth         yes    no      yes   yes       yes    no      distance from the camera, a snapshot (no trail)
thermal       yes    no      yes   yes       yes    no      hot objects on a cold background, a snapshot
imu           no     no      no    no        no     yes     accelerometer + gyroscope of a sensor moving so
text          yes    yes     yes   yes       yes    yes     the caption
============  =====  ======  ====  ========  =====  ======  ==================================================

Train / held-out: :func:`split_of` hashes the latent combination (not the seed), so every held-out scene is a
combination of shape, colour, size, position, count and motion never drawn for training, while every single
value of every latent still appears in training.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from ibllm.kinds import MEDIA_KINDS

SHAPES = ("sphere", "cube", "cylinder", "cone", "torus", "pyramid")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 38, 38),
    "green": (40, 175, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 215, 40),
    "purple": (145, 60, 195),
    "orange": (245, 130, 25),
    "white": (238, 238, 238),
}
SIZES = ("small", "large")
POSITIONS = ("left", "centre", "right")
COUNTS = (1, 2, 3)
MOTIONS = ("still", "left", "right", "up", "down", "spinning")
LATENTS = ("shape", "colour", "size", "position", "count", "motion")


# The order that numbers each modality's random stream (_modality_rng): changing it would change every generated
# file, so it is kept as it was, not in the project's vocabulary order (ibllm.kinds.MEDIA_KINDS). Same set, though:
SEED_ORDER = ("image", "video", "point", "audio", "depth", "thermal", "imu", "text")
assert len(set(SEED_ORDER)) == len(SEED_ORDER) and set(SEED_ORDER) == set(MEDIA_KINDS), \
    f"toyworld.SEED_ORDER {SEED_ORDER} and ibllm.kinds.MEDIA_KINDS {MEDIA_KINDS} name different media kinds"
# Every modality the toy world renders, in SEED_ORDER: files, manifest keys and captions are written in this order.
MODALITIES = SEED_ORDER


CARRIES: dict[str, tuple[str, ...]] = {
    "image": LATENTS,
    "video": LATENTS,
    "point": ("shape",),
    "audio": ("shape", "size"),
    "depth": ("shape", "size", "position", "count"),
    "thermal": ("shape", "size", "position", "count"),
    "imu": ("motion",),
    "text": LATENTS,
}

HELDOUT_FRACTION = 0.15
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Scene:
    """One scene: the latents plus the seed of everything that is not a latent (the nuisance)."""

    shape: str
    colour: str
    size: str
    position: str
    count: int
    motion: str
    seed: int = 0

    def __post_init__(self) -> None:
        for name, allowed in (("shape", SHAPES), ("colour", tuple(COLOURS)), ("size", SIZES),
                              ("position", POSITIONS), ("count", COUNTS), ("motion", MOTIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        # Several objects are laid out around the centre, so "on the left" would be a lie for them.
        if self.count > 1 and self.position != "centre":
            raise ValueError("scenes with more than one object have position 'centre'")

    def latents(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in LATENTS}

    def key(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in LATENTS)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def split(self) -> str:
        return split_of(self)


def split_of(scene: Scene) -> str:
    """'train' or 'heldout', from a stable hash of the latent combination (never Python's salted hash())."""
    digest = hashlib.sha256(repr(scene.key()).encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "little") / 2**64 < HELDOUT_FRACTION else "train"


def all_latent_combinations() -> list[tuple[Any, ...]]:
    """Every (shape, colour, size, position, count, motion) a Scene can have."""
    out = []
    for shape in SHAPES:
        for colour in COLOURS:
            for size in SIZES:
                for count in COUNTS:
                    for position in POSITIONS if count == 1 else ("centre",):
                        for motion in MOTIONS:
                            out.append((shape, colour, size, position, count, motion))
    return out


def sample_scene(rng: np.random.Generator, split: str | None = None) -> Scene:
    """Draw latents uniformly (count 1 half the time); with ``split``, redraw until the scene falls in it."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    while True:
        count = int(rng.choice(COUNTS, p=[0.5, 0.25, 0.25]))
        scene = Scene(
            shape=str(rng.choice(SHAPES)),
            colour=str(rng.choice(list(COLOURS))),
            size=str(rng.choice(SIZES)),
            position=str(rng.choice(POSITIONS)) if count == 1 else "centre",
            count=count,
            motion=str(rng.choice(MOTIONS)),
            seed=int(rng.integers(0, 2**31 - 1)),
        )
        if split is None or split_of(scene) == split:
            return scene


def _modality_rng(scene: Scene, modality: str) -> np.random.Generator:
    # One stream per modality, so the modalities requested never change what any one of them contains.
    return np.random.default_rng([scene.seed, 1 + SEED_ORDER.index(modality)])
