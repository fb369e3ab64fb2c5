"""Audio: shape -> timbre and rhythm, size -> pitch (small objects sound higher)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ibllm.train.toyworld.formats import AUDIO_RATE, AUDIO_SECONDS
from ibllm.train.toyworld.latents import Scene, _modality_rng

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
