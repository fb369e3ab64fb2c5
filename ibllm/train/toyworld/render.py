"""Rendering: a scene's objects (sprites) composited onto the canvas into image, video, depth and thermal maps.

The image, video, depth and thermal maps of one scene share a :class:`_Renderer` (its sprites are cached).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from ibllm.train.toyworld.compositing import _arc_stamp, _clip, _compose, _corner, _paste, _Stamp
from ibllm.train.toyworld.formats import DEPTH_BACKGROUND_MM, IMAGE_SIZE, MOTION_PX, SPIN_DEG, VIDEO_FPS, VIDEO_FRAMES
from ibllm.train.toyworld.geometry import _rot_x, _rot_y, _unit
from ibllm.train.toyworld.latents import COLOURS, Scene, _modality_rng
from ibllm.train.toyworld.sprite import _render_sprite, _Sprite


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

    def _regions(self, size: int):
        """For each object copy: (canvas rows/cols, sprite rows/cols) of the part of a size x size sprite in view."""
        for cx, cy in self.nz.centres:
            region = _clip(size, size, *_corner(size, cx, cy))
            if region is not None:
                yield region

    def depth_mm(self) -> np.ndarray:
        depth = np.full((IMAGE_SIZE, IMAGE_SIZE), float(DEPTH_BACKGROUND_MM))
        spr = self.sprite(self.nz.yaw)
        mm_per_unit = self.nz.radius_px * 7.0  # 7 mm per pixel: a 224 px view is ~1.6 m wide
        obj = 2000.0 - spr.z * mm_per_unit
        for (r0, r1, c0, c1), (s0, s1, t0, t1) in self._regions(spr.alpha.shape[0]):
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
        for (r0, r1, c0, c1), (s0, s1, t0, t1) in self._regions(spr.alpha.shape[0]):
            a = spr.alpha[s0:s1, t0:t1]
            heat[r0:r1, c0:c1] = heat[r0:r1, c0:c1] * (1 - a) + obj_heat[s0:s1, t0:t1] * a
            cover[r0:r1, c0:c1] = cover[r0:r1, c0:c1] * (1 - a) + a
        return heat, cover


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
