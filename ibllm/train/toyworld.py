"""The toy world: seeded scenes described by a few latents, rendered consistently into every modality.

The embedded default model is trained on this world (DESIGN.md, "The toy world"): one latent description per
scene, drawn into files in the same standard formats a user uploads, so training reads them through the same
media loaders the chat uses. Everything here is numpy + PIL (+ PyAV or imageio-ffmpeg for mp4); no GPU.

Latents (a frozen :class:`Scene`): shape, colour, size, position, count, motion, plus ``seed`` for the
nuisance (exact size, orientation, lighting, background, noise, timing) so a Scene renders to the same bytes
every time.

Which latents each modality carries (what a person could read off that file alone). Questions for a
modality-only evaluation come from :func:`questions_for` and ask only about these:

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

Files written by :func:`write_scene` (the formats the media loaders accept):

- ``image.png``: RGB 224x224.
- ``video.mp4``: H.264, yuv420p, 224x224, 12 fps, 24 frames (2 s). Position is the objects' place at the
  middle of the clip; they travel ``MOTION_PX`` pixels from start to end; spinning turns 135 degrees.
- ``point.ply``: binary little-endian ply, ``x y z`` float32, 8192 points, centred, max radius 1, y up.
- ``audio.wav``: 16 kHz mono PCM-16, 3 s.
- ``depth.png``: 16-bit grayscale, distance from the camera in millimetres (objects ~1700-2300, background wall
  4000). Larger value = farther.
- ``thermal.png``: 8-bit grayscale, brighter = hotter (objects ~150-240, background ~25-60).
- ``imu.npy``: float32 (6, 2000), 200 Hz for 10 s: accelerometer x y z in m/s^2 then gyroscope x y z in rad/s.
  Sensor axes: x = right, y = forward (away from the viewer), z = up; gravity reads +9.81 on z at rest. Left /
  right / up / down are three strokes (speed up then slow down) along -x / +x / +z / -z; spinning is a steady
  counter-clockwise turn about z (gyro z ~ +4 rad/s); still is gravity and noise.
- ``text.txt``: the full caption.

Train / held-out: :func:`split_of` hashes the latent combination (not the seed), so every held-out scene is a
combination of shape, colour, size, position, count and motion never drawn for training, while every single
value of every latent still appears in training.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ibllm.media import pointio
from ibllm.media.limits import DEFAULT_LIMITS

# ----------------------------------------------------------------------------------------------------------
# Latents

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

MODALITIES = ("image", "video", "point", "audio", "depth", "thermal", "imu", "text")
EXTENSIONS = {
    "image": ".png", "video": ".mp4", "point": ".ply", "audio": ".wav", "depth": ".png", "thermal": ".png",
    "imu": ".npy", "text": ".txt",
}
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

# Rendering constants (exported so loaders / tests can check shapes).
IMAGE_SIZE = 224
VIDEO_FPS = 12
VIDEO_FRAMES = 24  # 2 s: the video loader's 2 s clips then span the whole motion (first and last frame)
MOTION_PX = 50.0  # nominal travel from the first to the last video frame
SPIN_DEG = 135.0  # first-to-last turn: not a multiple of the cube's / stripes' 90 degree symmetry
AUDIO_RATE = 16000
AUDIO_SECONDS = 3.0
POINTS = 8192
IMU_RATE = 200
IMU_SAMPLES = 2000
DEPTH_BACKGROUND_MM = 4000
GRAVITY = 9.81


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


# ----------------------------------------------------------------------------------------------------------
# Language: captions and instruction Q&A

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


# ----------------------------------------------------------------------------------------------------------
# 3D shapes: signed distances (for rendering) and surface samples (for point clouds). Object space is y-up,
# every shape fits in a radius of about 1.15 so sizes are comparable across shapes.

_CUBE_HALF = 0.62
_CYL_R, _CYL_H = 0.62, 0.68
_CONE_R, _CONE_TOP, _CONE_BOT = 0.8, 0.9, -0.7
_PYR_B, _PYR_TOP, _PYR_BOT = 0.72, 0.85, -0.55
_TOR_R, _TOR_r = 0.68, 0.3
_SPRITE_EXTENT = 1.2


def _sdf(shape: str, p: np.ndarray) -> np.ndarray:
    """Signed distance (or a lower bound of it, which sphere tracing also accepts) from points (N, 3)."""
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    if shape == "sphere":
        return np.sqrt(x * x + y * y + z * z) - 0.95
    if shape == "cube":
        qx, qy, qz = np.abs(x) - _CUBE_HALF, np.abs(y) - _CUBE_HALF, np.abs(z) - _CUBE_HALF
        outside = np.sqrt(np.maximum(qx, 0.0) ** 2 + np.maximum(qy, 0.0) ** 2 + np.maximum(qz, 0.0) ** 2)
        return outside + np.minimum(np.maximum(np.maximum(qx, qy), qz), 0.0)
    if shape == "cylinder":
        dr = np.sqrt(x * x + z * z) - _CYL_R
        dy = np.abs(y) - _CYL_H
        return np.minimum(np.maximum(dr, dy), 0.0) + np.sqrt(np.maximum(dr, 0) ** 2 + np.maximum(dy, 0) ** 2)
    if shape == "cone":
        h = _CONE_TOP - _CONE_BOT
        side = (np.sqrt(x * x + z * z) * h + (y - _CONE_TOP) * _CONE_R) / math.hypot(h, _CONE_R)
        return np.maximum(side, _CONE_BOT - y)
    if shape == "pyramid":
        h = _PYR_TOP - _PYR_BOT
        norm = math.hypot(h, _PYR_B)
        sx = (np.abs(x) * h + (y - _PYR_TOP) * _PYR_B) / norm
        sz = (np.abs(z) * h + (y - _PYR_TOP) * _PYR_B) / norm
        return np.maximum(np.maximum(sx, sz), _PYR_BOT - y)
    if shape == "torus":
        return np.sqrt((np.sqrt(x * x + z * z) - _TOR_R) ** 2 + y * y) - _TOR_r
    raise ValueError(shape)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _triangle_samples(rng: np.random.Generator, tris: np.ndarray, n: int) -> np.ndarray:
    """n points uniform over the union of triangles (T, 3, 3), area-weighted."""
    areas = 0.5 * np.linalg.norm(np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0]), axis=1)
    idx = rng.choice(len(tris), n, p=areas / areas.sum())
    r1, r2 = rng.random(n), rng.random(n)
    flip = r1 + r2 > 1
    r1[flip], r2[flip] = 1 - r1[flip], 1 - r2[flip]
    t = tris[idx]
    return t[:, 0] + r1[:, None] * (t[:, 1] - t[:, 0]) + r2[:, None] * (t[:, 2] - t[:, 0])


def surface_points(shape: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """n points uniform over the surface of ``shape`` in object space (same dimensions as the renders)."""
    if shape == "sphere":
        return 0.95 * _unit(rng.standard_normal((n, 3)))
    if shape == "cube":
        a = _CUBE_HALF
        axis, sign = rng.integers(0, 3, n), rng.choice([-1.0, 1.0], n)
        p = rng.uniform(-a, a, (n, 3))
        p[np.arange(n), axis] = sign * a
        return p
    if shape in ("cylinder", "cone"):
        if shape == "cylinder":
            r, side_area, cap_area = _CYL_R, 2 * math.pi * _CYL_R * 2 * _CYL_H, 2 * math.pi * _CYL_R**2
        else:
            r = _CONE_R
            side_area = math.pi * r * math.hypot(r, _CONE_TOP - _CONE_BOT)
            cap_area = math.pi * r**2
        on_side = rng.random(n) < side_area / (side_area + cap_area)
        theta = rng.uniform(0, 2 * math.pi, n)
        u = rng.random(n)
        if shape == "cylinder":
            rad = np.where(on_side, r, r * np.sqrt(u))
            y = np.where(on_side, rng.uniform(-_CYL_H, _CYL_H, n), rng.choice([-_CYL_H, _CYL_H], n))
        else:
            # Uniform on a cone's side: the distance from the apex goes as sqrt(u).
            frac = np.sqrt(u)
            rad = np.where(on_side, r * frac, r * np.sqrt(u))
            y = np.where(on_side, _CONE_TOP - frac * (_CONE_TOP - _CONE_BOT), _CONE_BOT)
        return np.stack([rad * np.cos(theta), y, rad * np.sin(theta)], axis=1)
    if shape == "pyramid":
        b, top, bot = _PYR_B, _PYR_TOP, _PYR_BOT
        apex = np.array([0.0, top, 0.0])
        c = np.array([[b, bot, b], [-b, bot, b], [-b, bot, -b], [b, bot, -b]])
        tris = [np.stack([c[i], c[(i + 1) % 4], apex]) for i in range(4)]
        tris += [np.stack([c[0], c[1], c[2]]), np.stack([c[0], c[2], c[3]])]
        return _triangle_samples(rng, np.stack(tris), n)
    if shape == "torus":
        # Area element is proportional to (R + r cos v): rejection-sample v to stay uniform on the surface.
        out = np.empty((0, 3))
        while len(out) < n:
            m = 2 * (n - len(out)) + 16
            u, v = rng.uniform(0, 2 * math.pi, m), rng.uniform(0, 2 * math.pi, m)
            keep = rng.random(m) < (_TOR_R + _TOR_r * np.cos(v)) / (_TOR_R + _TOR_r)
            u, v = u[keep], v[keep]
            ring = _TOR_R + _TOR_r * np.cos(v)
            out = np.concatenate([out, np.stack([ring * np.cos(u), _TOR_r * np.sin(v), ring * np.sin(u)], 1)])
        return out[:n]
    raise ValueError(shape)


def _rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_y(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


# ----------------------------------------------------------------------------------------------------------
# Rendering: an orthographic sphere tracer per object "sprite", composited onto the canvas.


@dataclass
class _Sprite:
    """One object rendered around its own centre; arrays are (2S, 2S)."""

    alpha: np.ndarray  # coverage 0..1 (anti-aliased from the closest approach of missing rays)
    shade: np.ndarray  # diffuse light x surface stripes, multiplies the colour
    spec: np.ndarray  # specular highlight, added as white
    z: np.ndarray  # camera-space height towards the camera, in object units
    nz: np.ndarray  # normal's component towards the camera (thermal limb darkening)


def _render_sprite(shape: str, rot: np.ndarray, radius_px: float, light: np.ndarray) -> _Sprite:
    half = int(math.ceil(_SPRITE_EXTENT * radius_px)) + 1
    coords = (np.arange(2 * half) + 0.5 - half) / radius_px
    u, v = np.meshgrid(coords, -coords)  # v up, rows down
    n_pix = u.size
    # Camera space: the camera looks down -z from z = 2. p_obj = rot^T p_cam, i.e. row vectors times rot.
    origin = np.stack([u.ravel(), v.ravel(), np.full(n_pix, 2.0)], axis=1) @ rot
    direction = np.array([0.0, 0.0, -1.0]) @ rot
    # March only inside the object's bounding sphere: rays outside it are skipped (a third of the sprite),
    # the others start where they enter it and stop where they leave it.
    r2 = u.ravel() ** 2 + v.ravel() ** 2
    chord = np.sqrt(np.maximum(_SPRITE_EXTENT**2 - r2, 0.0))
    t = 2.0 - chord
    t_exit = 2.0 + chord
    dmin = np.full(n_pix, np.inf)
    t_at_min = t.copy()
    hit = np.zeros(n_pix, dtype=bool)
    eps = 0.2 / radius_px
    idx = np.flatnonzero(r2 < _SPRITE_EXTENT**2)
    for _ in range(48):
        if idx.size == 0:
            break
        d = _sdf(shape, origin[idx] + t[idx, None] * direction)
        better = d < dmin[idx]
        dmin[idx[better]] = d[better]
        t_at_min[idx[better]] = t[idx[better]]
        done = d < eps
        hit[idx[done]] = True
        t[idx] += np.maximum(d, 0.25 * eps)
        idx = idx[~done & (t[idx] < t_exit[idx])]
    # Coverage: a full pixel on a hit, else how close the ray passed (half a pixel either side of the edge).
    alpha = np.where(hit, 1.0, np.clip(0.5 - dmin * radius_px, 0.0, 1.0))
    shade = np.zeros(n_pix)
    spec = np.zeros(n_pix)
    zc = np.full(n_pix, -10.0)
    nzc = np.zeros(n_pix)
    lit = np.flatnonzero(alpha > 0)
    if lit.size:
        p = origin[lit] + t_at_min[lit, None] * direction
        # Normal from the tetrahedron of finite differences (4 evaluations instead of 6).
        h = 1e-3
        taps = np.array([[1, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, 1, 1]], dtype=float)
        grad = sum(k * _sdf(shape, p + h * k)[:, None] for k in taps)
        n_cam = _unit(grad) @ rot.T
        lambert = np.clip(n_cam @ light, 0.0, 1.0)
        half_vec = _unit(light + np.array([0.0, 0.0, 1.0]))
        # Stripes around the object's own axis: they make a spinning sphere visibly spin.
        stripe = np.where((np.floor(np.arctan2(p[:, 2], p[:, 0]) / (math.pi / 4)) % 2) == 0, 1.0, 0.8)
        shade[lit] = (0.28 + 0.8 * lambert) * stripe
        spec[lit] = 0.45 * np.clip(n_cam @ half_vec, 0.0, 1.0) ** 30
        zc[lit] = 2.0 - t_at_min[lit]
        nzc[lit] = np.clip(n_cam[:, 2], 0.0, 1.0)
    shape2 = (2 * half, 2 * half)
    return _Sprite(alpha.reshape(shape2), shade.reshape(shape2), spec.reshape(shape2), zc.reshape(shape2),
                   nzc.reshape(shape2))


@dataclass(frozen=True)
class _Nuisance:
    """Everything about a scene's look that is not a latent, drawn once from scene.seed."""

    radius_px: float
    elevation: float
    yaw: float
    light: np.ndarray
    centres: tuple[tuple[float, float], ...]
    colour: np.ndarray
    bg_top: np.ndarray
    bg_bottom: np.ndarray
    noise: float
    travel: float


def _nuisance(scene: Scene) -> _Nuisance:
    rng = np.random.default_rng([scene.seed, 0])
    radius = {"small": 24.0, "large": 40.0}[scene.size] * rng.uniform(0.93, 1.07)
    # The torus is tilted towards the camera (see _object_rotation); a wide yaw would turn its hole edge-on.
    yaw = rng.uniform(-0.45, 0.45) if scene.shape == "torus" else rng.uniform(0, 2 * math.pi)
    light = _unit(np.array([rng.uniform(-0.7, -0.2), rng.uniform(0.4, 0.9), rng.uniform(0.5, 0.9)]))
    jx, jy = rng.uniform(-6, 6, 2)
    c = IMAGE_SIZE / 2
    if scene.count == 1:
        layout = [({"left": c - 50, "centre": c, "right": c + 50}[scene.position], c)]
    elif scene.count == 2:
        layout = [(c - 52, c), (c + 52, c)]
    else:
        layout = [(c, c - 38), (c - 54, c + 30), (c + 54, c + 30)]  # back (top) one first: drawn behind
    centres = tuple((x + jx, y + jy) for x, y in layout)
    colour = np.clip(np.array(COLOURS[scene.colour], float) * rng.uniform(0.92, 1.06, 3), 0, 255)
    grey = rng.uniform(45, 105)
    tint = rng.uniform(-10, 10, 3)
    bg_top = grey + tint + rng.uniform(-12, 12)
    bg_bottom = grey + tint + rng.uniform(-12, 12)
    return _Nuisance(radius, math.radians(rng.uniform(22, 36)), yaw, light, centres, colour, bg_top, bg_bottom,
                     float(rng.uniform(1.0, 3.5)), MOTION_PX * float(rng.uniform(0.9, 1.1)))


def _object_rotation(shape: str, elevation: float, yaw: float) -> np.ndarray:
    canon = _rot_x(math.radians(45)) if shape == "torus" else np.eye(3)  # show the ring's hole
    return _rot_x(elevation) @ _rot_y(yaw) @ canon


@dataclass
class _Stamp:
    """A premultiplied RGBA patch with the object's centre at (ay, ax); composited with the "over" operator."""

    premul: np.ndarray  # (h, w, 3) float32: colour x alpha
    alpha: np.ndarray  # (h, w) float32
    ay: int
    ax: int


def _clip(h: int, w: int, top: int, left: int) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]] | None:
    """Canvas and patch (rows, cols) where an (h, w) patch with its corner at (top, left) meets the canvas."""
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + h, IMAGE_SIZE), min(left + w, IMAGE_SIZE)
    if r0 >= r1 or c0 >= c1:
        return None
    return (r0, r1, c0, c1), (r0 - top, r1 - top, c0 - left, c1 - left)


def _corner(size: int, cx: float, cy: float) -> tuple[int, int]:
    return int(round(cy)) - size // 2, int(round(cx)) - size // 2


def _compose(parts: Sequence[tuple[_Stamp, int, int]]) -> _Stamp:
    """Stamps drawn in order at integer offsets (dy, dx) from a shared anchor, flattened into one stamp."""
    tops = [dy - s.ay for s, dy, _ in parts]
    lefts = [dx - s.ax for s, _, dx in parts]
    top, left = min(tops), min(lefts)
    h = max(t + s.alpha.shape[0] for t, (s, _, _) in zip(tops, parts, strict=True)) - top
    w = max(lf + s.alpha.shape[1] for lf, (s, _, _) in zip(lefts, parts, strict=True)) - left
    premul = np.zeros((h, w, 3), np.float32)
    alpha = np.zeros((h, w), np.float32)
    for (s, _, _), t, lf in zip(parts, tops, lefts, strict=True):
        r0, c0 = t - top, lf - left
        r1, c1 = r0 + s.alpha.shape[0], c0 + s.alpha.shape[1]
        keep = 1.0 - s.alpha
        premul[r0:r1, c0:c1] = premul[r0:r1, c0:c1] * keep[..., None] + s.premul
        alpha[r0:r1, c0:c1] = alpha[r0:r1, c0:c1] * keep + s.alpha
    return _Stamp(premul, alpha, -top, -left)


def _paste(canvas: np.ndarray, stamp: _Stamp, cx: float, cy: float) -> None:
    h, w = stamp.alpha.shape
    region = _clip(h, w, int(round(cy)) - stamp.ay, int(round(cx)) - stamp.ax)
    if region is None:
        return
    (r0, r1, c0, c1), (s0, s1, t0, t1) = region
    keep = 1.0 - stamp.alpha[s0:s1, t0:t1, None]
    canvas[r0:r1, c0:c1] = canvas[r0:r1, c0:c1] * keep + stamp.premul[s0:s1, t0:t1]


def _arc_stamp(radius: float) -> _Stamp:
    """Two curved strokes around a spinning object (a comic-style rotation cue), as a stamp."""
    width = max(2, int(radius / 12))
    r = 1.3 * radius
    size = 2 * int(math.ceil(r + width)) + 4
    c = size / 2
    overlay = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for start, end in ((200, 290), (20, 110)):
        draw.arc((c - r, c - r, c + r, c + r), start, end, fill=(235, 235, 235, 210), width=width)
    rgba = np.asarray(overlay, np.float32)
    alpha = rgba[..., 3] / 255.0
    return _Stamp(rgba[..., :3] * alpha[..., None], alpha, size // 2, size // 2)


_DIRECTIONS = {"still": (0.0, 0.0), "spinning": (0.0, 0.0), "left": (-1.0, 0.0), "right": (1.0, 0.0),
               "up": (0.0, -1.0), "down": (0.0, 1.0)}  # image rows grow downwards
_CLIP_SECONDS = (VIDEO_FRAMES - 1) / VIDEO_FPS
_SPIN_RATE = math.radians(SPIN_DEG) / _CLIP_SECONDS  # rad/s
_TRAIL_GHOSTS = 6
_TRAIL_STEP = 0.1  # of the clip: the trail spans the last 60 % of the travel
_SPIN_GHOSTS = 3
_SPIN_GHOST_FRAMES = 3  # whole frames, so the video's frames share sprites with their ghosts


class _Renderer:
    """Renders one scene at any time t in [0, _CLIP_SECONDS]; caches sprites by yaw."""

    def __init__(self, scene: Scene) -> None:
        self.scene = scene
        self.nz = _nuisance(scene)
        self._sprites: dict[float, _Sprite] = {}
        self._stamps: dict[float, _Stamp] = {}
        self._trail: _Stamp | None = None
        self._arcs: _Stamp | None = None
        rows = np.linspace(0.0, 1.0, IMAGE_SIZE, dtype=np.float32)[:, None, None]
        top, bottom = self.nz.bg_top.astype(np.float32), self.nz.bg_bottom.astype(np.float32)
        self.background = np.ascontiguousarray(np.broadcast_to(top * (1 - rows) + bottom * rows,
                                                               (IMAGE_SIZE, IMAGE_SIZE, 3)))

    def sprite(self, yaw: float) -> _Sprite:
        key = round(yaw, 6)
        if key not in self._sprites:
            rot = _object_rotation(self.scene.shape, self.nz.elevation, yaw)
            self._sprites[key] = _render_sprite(self.scene.shape, rot, self.nz.radius_px, self.nz.light)
        return self._sprites[key]

    def stamp(self, yaw: float) -> _Stamp:
        key = round(yaw, 6)
        if key not in self._stamps:
            spr = self.sprite(yaw)
            colour = self.nz.colour.astype(np.float32)
            rgb = np.clip(colour * spr.shade[..., None] + 255.0 * spr.spec[..., None], 0, 255)
            alpha = spr.alpha.astype(np.float32)
            half = alpha.shape[0] // 2
            self._stamps[key] = _Stamp((rgb * alpha[..., None]).astype(np.float32), alpha, half, half)
        return self._stamps[key]

    def offset(self, t: float) -> tuple[float, float]:
        dx, dy = _DIRECTIONS[self.scene.motion]
        s = self.nz.travel * (t / _CLIP_SECONDS - 0.5)
        return dx * s, dy * s

    def yaw(self, t: float) -> float:
        if self.scene.motion != "spinning":
            return self.nz.yaw
        return self.nz.yaw + _SPIN_RATE * (t - _CLIP_SECONDS / 2)

    def object_stamp(self, t: float) -> _Stamp:
        """One object at time t with its long-exposure motion cue, anchored at the object's centre."""
        motion = self.scene.motion
        if motion in ("left", "right", "up", "down"):
            # The trail's shape relative to the object does not change with t: build it once.
            if self._trail is None:
                head = self.stamp(self.nz.yaw)
                dx, dy = _DIRECTIONS[motion]
                parts = []
                for k in range(_TRAIL_GHOSTS, 0, -1):
                    back = self.nz.travel * k * _TRAIL_STEP
                    opacity = 0.5 * (1 - k / (_TRAIL_GHOSTS + 1))
                    ghost = _Stamp(head.premul * opacity, head.alpha * opacity, head.ay, head.ax)
                    parts.append((ghost, int(round(-dy * back)), int(round(-dx * back))))
                self._trail = _compose([*parts, (head, 0, 0)])
            return self._trail
        if motion == "spinning":
            parts = []
            for k in range(_SPIN_GHOSTS, 0, -1):
                ghost = self.stamp(self.yaw(t - _SPIN_GHOST_FRAMES * k / VIDEO_FPS))
                parts.append((_Stamp(ghost.premul * 0.45, ghost.alpha * 0.45, ghost.ay, ghost.ax), 0, 0))
            if self._arcs is None:
                self._arcs = _arc_stamp(self.nz.radius_px)
            return _compose([*parts, (self.stamp(self.yaw(t)), 0, 0), (self._arcs, 0, 0)])
        return self.stamp(self.nz.yaw)

    def rgb(self, t: float) -> np.ndarray:
        """(224, 224, 3) float32 in [0, 255]."""
        canvas = self.background.copy()
        obj = self.object_stamp(t)
        ox, oy = self.offset(t)
        for cx, cy in self.nz.centres:
            _paste(canvas, obj, cx + ox, cy + oy)
        return canvas

    def depth_mm(self) -> np.ndarray:
        depth = np.full((IMAGE_SIZE, IMAGE_SIZE), float(DEPTH_BACKGROUND_MM))
        spr = self.sprite(self.nz.yaw)
        mm_per_unit = self.nz.radius_px * 7.0  # 7 mm per pixel: a 224 px view is ~1.6 m wide
        obj = 2000.0 - spr.z * mm_per_unit
        size = spr.alpha.shape[0]
        for cx, cy in self.nz.centres:
            region = _clip(size, size, *_corner(size, cx, cy))
            if region is None:
                continue
            (r0, r1, c0, c1), (s0, s1, t0, t1) = region
            mask = spr.alpha[s0:s1, t0:t1] >= 0.5
            view = depth[r0:r1, c0:c1]
            depth[r0:r1, c0:c1] = np.where(mask, np.minimum(view, obj[s0:s1, t0:t1]), view)
        return depth

    def heat(self) -> tuple[np.ndarray, np.ndarray]:
        """(temperature where covered, coverage), both (224, 224)."""
        heat = np.zeros((IMAGE_SIZE, IMAGE_SIZE))
        cover = np.zeros((IMAGE_SIZE, IMAGE_SIZE))
        spr = self.sprite(self.nz.yaw)
        # Hotter where the surface faces the sensor (emissivity falls off at grazing angles).
        obj_heat = 165.0 + 70.0 * spr.nz
        size = spr.alpha.shape[0]
        for cx, cy in self.nz.centres:
            region = _clip(size, size, *_corner(size, cx, cy))
            if region is None:
                continue
            (r0, r1, c0, c1), (s0, s1, t0, t1) = region
            a = spr.alpha[s0:s1, t0:t1]
            heat[r0:r1, c0:c1] = heat[r0:r1, c0:c1] * (1 - a) + obj_heat[s0:s1, t0:t1] * a
            cover[r0:r1, c0:c1] = cover[r0:r1, c0:c1] * (1 - a) + a
        return heat, cover

def _modality_rng(scene: Scene, modality: str) -> np.random.Generator:
    # One stream per modality, so the modalities requested never change what any one of them contains.
    return np.random.default_rng([scene.seed, 1 + MODALITIES.index(modality)])


def render_image(scene: Scene, renderer: _Renderer | None = None) -> np.ndarray:
    """(224, 224, 3) uint8: the scene at the middle of its clip, with its motion cue."""
    r = renderer or _Renderer(scene)
    rgb = r.rgb(_CLIP_SECONDS / 2)
    rng = _modality_rng(scene, "image")
    rgb = rgb + np.float32(r.nz.noise) * rng.standard_normal(rgb.shape, dtype=np.float32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def render_video(scene: Scene, renderer: _Renderer | None = None) -> np.ndarray:
    """(VIDEO_FRAMES, 224, 224, 3) uint8."""
    r = renderer or _Renderer(scene)
    frames = np.empty((VIDEO_FRAMES, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for k in range(VIDEO_FRAMES):
        np.clip(np.rint(r.rgb(k / VIDEO_FPS)), 0, 255, out=frames[k], casting="unsafe")
    return frames


def render_depth(scene: Scene, renderer: _Renderer | None = None) -> np.ndarray:
    """(224, 224) uint16 millimetres."""
    r = renderer or _Renderer(scene)
    rng = _modality_rng(scene, "depth")
    depth = r.depth_mm() + rng.normal(0.0, 2.0, (IMAGE_SIZE, IMAGE_SIZE))
    return np.clip(np.rint(depth), 0, 65535).astype(np.uint16)


def render_thermal(scene: Scene, renderer: _Renderer | None = None) -> np.ndarray:
    """(224, 224) uint8, brighter = hotter; blurred like a low-resolution thermal sensor."""
    r = renderer or _Renderer(scene)
    rng = _modality_rng(scene, "thermal")
    heat, cover = r.heat()
    # Cold background with smooth blotches: upsampled coarse noise.
    coarse = rng.uniform(0, 1, (8, 8))
    blotch = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((IMAGE_SIZE, IMAGE_SIZE),
                                                                                   Image.BICUBIC), float) / 255
    base = rng.uniform(25, 45) + 15 * blotch
    img = base * (1 - cover) + heat * cover + rng.normal(0, 1.5, heat.shape)
    out = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2))
    return np.asarray(out)


def render_points(scene: Scene, n: int = POINTS) -> np.ndarray:
    """(n, 3) float32: one object's surface, random yaw, centred at the mean, max radius 1 (Point-Bind's norm)."""
    rng = _modality_rng(scene, "point")
    pts = surface_points(scene.shape, n, rng) @ _rot_y(rng.uniform(0, 2 * math.pi)).T
    pts = pts + rng.normal(0.0, 0.004, pts.shape)
    pts = pts - pts.mean(axis=0)
    pts = pts / np.linalg.norm(pts, axis=1).max()
    return pts.astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Audio: shape -> timbre and rhythm, size -> pitch (small objects sound higher).

_BASE_HZ = {"small": 620.0, "large": 210.0}


def _partials(t: np.ndarray, f0: float, ratios: Sequence[float], amps: Sequence[float],
              phase: np.ndarray | float = 0.0) -> np.ndarray:
    return sum(a * np.sin(2 * math.pi * f0 * r * t + phase) for r, a in zip(ratios, amps, strict=True))


def _strikes(t: np.ndarray, period: float, first: float, decay: float) -> np.ndarray:
    """Envelope of repeated strikes: instant attack, exponential decay, every ``period`` seconds."""
    since = np.mod(t - first, period)
    return np.where(t >= first, np.exp(-since / decay), 0.0)


def render_audio(scene: Scene) -> np.ndarray:
    """(48000,) float32 in [-1, 1] at 16 kHz."""
    rng = _modality_rng(scene, "audio")
    n = int(AUDIO_RATE * AUDIO_SECONDS)
    t = np.arange(n) / AUDIO_RATE
    f0 = _BASE_HZ[scene.size] * rng.uniform(0.94, 1.06)
    shape = scene.shape
    if shape == "sphere":  # a smooth hum: nearly pure tone with gentle vibrato, sustained
        vib = 0.004 * np.sin(2 * math.pi * rng.uniform(4, 6) * t)
        phase = 2 * math.pi * f0 * np.cumsum(1 + vib) / AUDIO_RATE
        sig = np.sin(phase) + 0.12 * np.sin(2 * phase)
        env = np.minimum(1, t / 0.15) * np.minimum(1, (AUDIO_SECONDS - t) / 0.2)
    elif shape == "cube":  # wooden knocks: short, odd harmonics, four a second
        sig = _partials(t, f0, (1, 3, 5, 7), (1, 0.5, 0.3, 0.2))
        env = _strikes(t, 0.25, rng.uniform(0, 0.05), 0.035)
    elif shape == "cylinder":  # a buzzing organ: every harmonic (sawtooth-like), tremolo
        sig = _partials(t, f0, range(1, 13), [1 / k for k in range(1, 13)])
        env = (0.65 + 0.35 * np.sin(2 * math.pi * 6 * t)) * np.minimum(1, t / 0.05)
    elif shape == "cone":  # a whistle sweeping up, twice a second
        period = 0.5
        frac = np.mod(t, period) / period
        # Phase restarts each sweep; the envelope closes before the jump so it does not click.
        phase = 2 * math.pi * f0 * period * (3.0**frac - 1) / math.log(3.0)
        sig = np.sin(phase) + 0.2 * np.sin(2 * phase)
        env = np.sin(math.pi * frac) ** 2
    elif shape == "torus":  # a bell: inharmonic partials, long ring, struck every 1.2 s
        ratios, amps, decays = (1.0, 2.76, 5.40, 8.93), (1.0, 0.6, 0.35, 0.2), (1.0, 0.6, 0.35, 0.2)
        first = rng.uniform(0, 0.1)
        sig = sum(a * np.sin(2 * math.pi * f0 * r * t) * _strikes(t, 1.2, first, d)
                  for r, a, d in zip(ratios, amps, decays, strict=True))
        env = np.ones_like(t)
    elif shape == "pyramid":  # a shaker: band-passed noise around 4 f0 in sharp pulses, three a second
        spec = np.fft.rfft(rng.standard_normal(n))
        freqs = np.fft.rfftfreq(n, 1 / AUDIO_RATE)
        spec *= np.exp(-0.5 * ((freqs - 4 * f0) / (0.25 * f0)) ** 2)
        sig = np.fft.irfft(spec, n)
        sig /= np.abs(sig).max() + 1e-9
        env = _strikes(t, 1 / 3, rng.uniform(0, 0.05), 0.07)
    else:
        raise ValueError(shape)
    out = sig * env
    out = out / (np.sqrt(np.mean(out**2)) + 1e-9) * 0.18 * rng.uniform(0.7, 1.3)
    out = out + rng.normal(0, 0.003, n)  # a quiet room, so silence is not digital zero
    return np.clip(out, -1.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# IMU: a sensor carried along the scene's motion.

_IMU_AXIS = {"left": (0, -1.0), "right": (0, 1.0), "up": (2, 1.0), "down": (2, -1.0)}


def render_imu(scene: Scene) -> np.ndarray:
    """(6, 2000) float32: accelerometer xyz (m/s^2), gyroscope xyz (rad/s), 200 Hz."""
    rng = _modality_rng(scene, "imu")
    t = np.arange(IMU_SAMPLES) / IMU_RATE
    acc = np.zeros((3, IMU_SAMPLES))
    gyr = np.zeros((3, IMU_SAMPLES))
    acc[2] += GRAVITY
    motion = scene.motion
    if motion in _IMU_AXIS:
        axis, sign = _IMU_AXIS[motion]
        # Three strokes (velocity 0 -> peak -> 0 over `dur`): acceleration +pulse then -pulse along the axis.
        peak = rng.uniform(1.2, 1.8)  # m/s
        for start in (0.6, 3.6, 6.6):
            start += rng.uniform(-0.2, 0.2)
            dur = rng.uniform(1.8, 2.4)
            inside = (t >= start) & (t < start + dur)
            phase = (t[inside] - start) / dur
            acc[axis, inside] += sign * peak * math.pi / dur * np.sin(2 * math.pi * phase)
        # A hand-held sensor wobbles a little about its axes while it moves.
        gyr += 0.05 * np.sin(2 * math.pi * rng.uniform(0.5, 1.5, (3, 1)) * t + rng.uniform(0, 6.3, (3, 1)))
    elif motion == "spinning":
        rate = rng.uniform(3.0, 5.0)  # rad/s, counter-clockwise seen from above
        ramp = np.clip(t / 0.8, 0, 1) * np.clip((t[-1] - t) / 0.8, 0, 1)
        gyr[2] += rate * ramp * (1 + 0.03 * np.sin(2 * math.pi * 0.7 * t))
        radius = rng.uniform(0.03, 0.08)  # the sensor sits off the spin axis: centripetal pull inwards
        acc[1] -= radius * (rate * ramp) ** 2
    # Mounting: a small random tilt mixes the axes, as a real strap would; then bias and white noise.
    tilt = _rot_x(rng.uniform(-0.12, 0.12)) @ _rot_y(rng.uniform(-0.12, 0.12))
    acc, gyr = tilt @ acc, tilt @ gyr
    acc += rng.normal(0, 0.05, (3, 1)) + rng.normal(0, 0.08, acc.shape)
    gyr += rng.normal(0, 0.01, (3, 1)) + rng.normal(0, 0.02, gyr.shape)
    return np.concatenate([acc, gyr]).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Writers


def write_png(path: Path, array: np.ndarray) -> None:
    # The sensor noise makes PNGs nearly incompressible: level 1 is 4x faster than 6 and only ~15 % larger.
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def write_wav(path: Path, audio: np.ndarray, rate: int = AUDIO_RATE) -> None:
    import soundfile

    soundfile.write(str(path), audio, rate, subtype="PCM_16", format="WAV")


def write_ply(path: Path, points: np.ndarray) -> None:
    """Binary little-endian ply with float x y z (what open3d and every point-cloud viewer read)."""
    pointio.write_ply(path, points)


def read_ply(path: str | Path) -> np.ndarray:
    """(N, 3) float32 points of a ply file, through the media package's parser (the one PLY reader)."""
    return pointio.read_ply(Path(path), DEFAULT_LIMITS).astype(np.float32)


def write_mp4(path: Path, frames: np.ndarray, fps: int = VIDEO_FPS) -> None:
    """H.264 yuv420p mp4, one encoder thread (the machine's cores are shared; x264 is deterministic then)."""
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError("yuv420p needs even dimensions")
    try:
        import av
    except ImportError:
        av = None
    if av is not None:
        with av.open(str(path), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps, 1))
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"crf": "23", "preset": "veryfast", "threads": "1"}
            stream.codec_context.thread_count = 1
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return
    import imageio_ffmpeg

    writer = imageio_ffmpeg.write_frames(str(path), (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
                                         quality=None, macro_block_size=2,
                                         output_params=["-crf", "23", "-preset", "veryfast", "-threads", "1"])
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()


def write_scene(scene: Scene, out_dir: str | Path, modalities: Iterable[str] = MODALITIES,
                stem: str = "") -> dict[str, Path]:
    """Render ``scene`` into one file per modality in ``out_dir``; returns {modality: path}.

    Files are named ``{stem}_{modality}{ext}`` (``{modality}{ext}`` with no stem). The image, video, depth
    and thermal maps share one renderer, so asking for several of them costs little more than the slowest.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wanted = list(dict.fromkeys(modalities))
    unknown = sorted(set(wanted) - set(MODALITIES))
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; known: {MODALITIES}")
    renderer = _Renderer(scene) if {"image", "video", "depth", "thermal"} & set(wanted) else None
    paths: dict[str, Path] = {}
    for m in wanted:
        path = out / f"{stem + '_' if stem else ''}{m}{EXTENSIONS[m]}"
        if m == "image":
            write_png(path, render_image(scene, renderer))
        elif m == "video":
            write_mp4(path, render_video(scene, renderer))
        elif m == "depth":
            write_png(path, render_depth(scene, renderer))
        elif m == "thermal":
            write_png(path, render_thermal(scene, renderer))
        elif m == "point":
            write_ply(path, render_points(scene))
        elif m == "audio":
            write_wav(path, render_audio(scene))
        elif m == "imu":
            np.save(path, render_imu(scene), allow_pickle=False)
        elif m == "text":
            path.write_text(caption_for(scene, "text") + "\n")
        paths[m] = path
    return paths


# ----------------------------------------------------------------------------------------------------------
# Datasets


def _split_seed(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), 0x70C])


def sample_scenes(n: int, seed: int, split: str) -> list[Scene]:
    """The n scenes of ``make_dataset(…, n, seed, split)`` (a prefix of any larger n with the same seed)."""
    rng = _split_seed(seed, split)
    return [sample_scene(rng, split) for _ in range(n)]


def manifest_record(scene: Scene, index: int, files: dict[str, Path], root: Path,
                    rng: np.random.Generator | None = None) -> dict[str, Any]:
    """One manifest line: latents, files relative to ``root``, captions, Q&A (2 phrasings per latent)."""
    rng = rng or np.random.default_rng([scene.seed, 99])
    return {
        "id": f"{split_of(scene)}-{index:06d}",
        "split": split_of(scene),
        "scene": scene.to_dict(),
        "files": {m: p.relative_to(root).as_posix() for m, p in files.items()},
        "caption": caption_for(scene, "text"),
        "captions": {m: caption_for(scene, m) for m in MODALITIES},
        "caption_variants": [caption_for(scene, "text", k) for k in range(len(_CAPTION_TEMPLATES))],
        # Tagged by latent: filter with CARRIES[modality], or call questions_for(modality, scene) directly.
        "qa": questions_for("text", scene, rng, per_latent=2),
    }


def _write_one(job: tuple[int, Scene], root: Path, split: str, modalities: tuple[str, ...]) -> dict[str, Any]:
    index, scene = job
    files = write_scene(scene, root / split / f"{index:06d}", modalities)
    return manifest_record(scene, index, files, root)


def make_dataset(out_dir: str | Path, n: int, seed: int, split: str = "train",
                 modalities: Iterable[str] = MODALITIES, workers: int = 1, progress: bool = True) -> Path:
    """Write n scenes of ``split`` under ``out_dir/split/NNNNNN/`` and ``out_dir/{split}.jsonl``; returns it.

    Deterministic in (n, seed, split): rerunning rewrites identical files. ``workers`` > 1 uses processes.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    mods = tuple(dict.fromkeys(modalities))
    scenes = sample_scenes(n, seed, split)
    job = partial(_write_one, root=root, split=split, modalities=mods)
    bar = _progress(total=n, desc=f"toyworld {split}", disable=not progress)
    records: list[dict[str, Any]] = []
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for rec in pool.imap(job, enumerate(scenes), chunksize=4):
                records.append(rec)
                bar.update()
    else:
        for item in enumerate(scenes):
            records.append(job(item))
            bar.update()
    bar.close()
    manifest = root / f"{split}.jsonl"
    tmp = manifest.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(manifest)  # a crash mid-write never leaves a truncated manifest behind
    return manifest


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """Manifest lines with ``files`` made absolute and ``scene`` a :class:`Scene`."""
    root = Path(path).parent
    out = []
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        rec["files"] = {m: root / p for m, p in rec["files"].items()}
        rec["scene"] = Scene.from_dict(rec["scene"])
        out.append(rec)
    return out


def _progress(total: int, desc: str, disable: bool) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a runtime requirement, but generation should never die for a progress bar
        class _Null:
            def update(self, n: int = 1) -> None: ...
            def close(self) -> None: ...
        return _Null()
    return tqdm(total=total, desc=desc, unit="scene", disable=disable)


def benchmark(n: int = 20, seed: int = 0, out_dir: str | Path | None = None) -> dict[str, float]:
    """Scenes per second for each modality alone (one process), writing real files to a temporary folder."""
    import tempfile

    scenes = sample_scenes(n, seed, "train")
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        no_video = tuple(m for m in MODALITIES if m != "video")
        for m in (*MODALITIES, "all-but-video", "all"):
            mods = {"all": MODALITIES, "all-but-video": no_video}.get(m, (m,))
            start = time.perf_counter()
            for i, scene in enumerate(scenes):
                write_scene(scene, Path(tmp) / m / str(i), mods)
            rates[m] = n / (time.perf_counter() - start)
    return rates


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ibllm.train.toyworld", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="output folder (manifest: OUT/<split>.jsonl)")
    parser.add_argument("--n", type=int, default=100, help="scenes per split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=(*SPLITS, "both"), default="both")
    parser.add_argument("--modalities", default=",".join(MODALITIES), help="comma-separated subset of "
                        + ",".join(MODALITIES))
    parser.add_argument("--workers", type=int, default=1, help="processes (the cores are shared: be modest)")
    parser.add_argument("--bench", type=int, metavar="N", default=0,
                        help="instead of writing a data set, time N scenes per modality and print scenes/s")
    args = parser.parse_args(argv)
    if args.bench:
        for m, rate in benchmark(args.bench).items():
            print(f"{m:14s} {rate:8.1f} scenes/s")
        return 0
    if args.out is None:
        parser.error("--out is required")
    mods = tuple(m.strip() for m in args.modalities.split(",") if m.strip())
    for split in SPLITS if args.split == "both" else (args.split,):
        path = make_dataset(args.out, args.n, args.seed, split, mods, workers=args.workers)
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
