"""IMU: accelerometer and gyroscope of a sensor carried along the scene's motion."""

from __future__ import annotations

import math

import numpy as np

from ibllm.train.toyworld.formats import GRAVITY, IMU_RATE, IMU_SAMPLES
from ibllm.train.toyworld.geometry import _rot_x, _rot_y
from ibllm.train.toyworld.latents import Scene, _modality_rng

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
