"""Where the audio and video clips start: the reference's constant-clips sampler, shared by both loaders."""

from __future__ import annotations

from fractions import Fraction


def clip_step(duration: float, clips: int, clip_seconds: float) -> Fraction:
    """Seconds between clip starts, as an exact fraction of the float duration.

    The pytorchvideo commit the reference pins (28fe037) spreads ``clips`` starts evenly over ``[0, d - clip]``
    (``i * (d - clip) / max(clips - 1, 1)``): the first clip starts at 0 and the last one ends at the end of the
    file. (PyPI's pytorchvideo 0.1.5 divides by ``clips`` instead and never reaches the last third of a file.)
    A file shorter than one clip gives every clip the start 0.
    """
    return Fraction(max(duration - clip_seconds, 0)) / max(clips - 1, 1)


def clip_starts(duration: float, clips: int, clip_seconds: float) -> list[Fraction]:
    """The start time of each clip, in seconds."""
    step = clip_step(duration, clips, clip_seconds)
    return [step * i for i in range(clips)]
