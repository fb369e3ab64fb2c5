"""The toy world: seeded scenes described by a few latents, rendered consistently into every modality.

The embedded default model is trained on this world (DESIGN.md, "The toy world"): one latent description per
scene, drawn into files in the same standard formats a user uploads, so training reads them through the same
media loaders the chat uses. Everything here is numpy + PIL (+ PyAV or imageio-ffmpeg for mp4); no GPU.

Every public name is importable from here (``from ibllm.train import toyworld as tw; tw.Scene``). Modules, each
importing only those above it:

- ``formats``: the files a scene becomes: extension per modality, image size, frame and sample rates, counts.
- ``latents``: the latents and :class:`Scene`, which latents each modality carries (``CARRIES``), the
  train / held-out split, ``SEED_ORDER`` and the per-modality random streams.
- ``questions``: the question grammar: templates per latent in a training, a validation and a held-out part.
- ``captions``: captions, answers (including "I cannot tell ..."), and how an answer is judged.
- ``geometry``: the 3D shapes: signed distances, surface samples, rotations.
- ``sprite``: one object sphere-traced into a sprite; ``compositing``: stamps pasted onto the canvas.
- ``render``: image, video, depth and thermal maps (one renderer per scene).
- ``points``, ``sound``, ``imu``: the point cloud, audio and IMU recording of a scene.
- ``files``: PNG, WAV, ply and mp4 writers (and a ply reader).
- ``dataset``: a scene to its files (``write_scene``), n scenes to a data set with a manifest, read back.
- ``cli``: ``python -m ibllm.train.toyworld`` (and ``benchmark``).
"""

from ibllm.train.toyworld.captions import (
    QUESTIONS,
    answer_for,
    answer_is_correct,
    cannot_tell,
    caption_for,
    carried_by,
    expected_words,
    judge,
    mixed_scene,
    questions_for,
    value_words,
)
from ibllm.train.toyworld.cli import benchmark, main
from ibllm.train.toyworld.dataset import make_dataset, manifest_record, read_manifest, sample_scenes, write_scene
from ibllm.train.toyworld.files import read_ply, write_mp4, write_ply, write_png, write_wav
from ibllm.train.toyworld.formats import (
    AUDIO_RATE,
    AUDIO_SECONDS,
    DEPTH_BACKGROUND_MM,
    EXTENSIONS,
    GRAVITY,
    IMAGE_SIZE,
    IMU_RATE,
    IMU_SAMPLES,
    MOTION_PX,
    POINTS,
    SPIN_DEG,
    VIDEO_FPS,
    VIDEO_FRAMES,
)
from ibllm.train.toyworld.geometry import surface_points
from ibllm.train.toyworld.imu import render_imu
from ibllm.train.toyworld.latents import (
    CARRIES,
    COLOURS,
    COUNTS,
    HELDOUT_FRACTION,
    LATENTS,
    MODALITIES,
    MOTIONS,
    POSITIONS,
    SEED_ORDER,
    SHAPES,
    SIZES,
    SPLITS,
    Scene,
    all_latent_combinations,
    sample_scene,
    split_of,
)
from ibllm.train.toyworld.points import render_points
from ibllm.train.toyworld.questions import (
    ASKED,
    CLOSERS,
    INPUT_NOUNS,
    IT,
    NOUNS,
    OPENERS,
    PARTS,
    draw,
    drop_words,
    insert_words,
    is_yes_no,
    key_words,
    part_of,
    phrasings,
    templates,
    unwrap,
    wrap,
)
from ibllm.train.toyworld.render import render_depth, render_image, render_thermal, render_video
from ibllm.train.toyworld.sound import render_audio

__all__ = [
    # latents
    "SHAPES", "COLOURS", "SIZES", "POSITIONS", "COUNTS", "MOTIONS", "LATENTS", "SEED_ORDER", "MODALITIES", "CARRIES",
    "HELDOUT_FRACTION", "SPLITS", "Scene", "split_of", "all_latent_combinations", "sample_scene",
    # formats
    "EXTENSIONS", "IMAGE_SIZE", "VIDEO_FPS", "VIDEO_FRAMES", "MOTION_PX", "SPIN_DEG", "AUDIO_RATE", "AUDIO_SECONDS",
    "POINTS", "IMU_RATE", "IMU_SAMPLES", "DEPTH_BACKGROUND_MM", "GRAVITY",
    # captions
    "QUESTIONS", "caption_for", "answer_for", "expected_words", "questions_for", "answer_is_correct", "cannot_tell",
    "carried_by", "judge", "mixed_scene", "value_words",
    # the question grammar
    "ASKED", "INPUT_NOUNS", "IT", "NOUNS", "OPENERS", "CLOSERS", "PARTS", "draw", "drop_words", "insert_words",
    "key_words", "is_yes_no", "part_of", "phrasings",
    "templates", "unwrap", "wrap",
    # geometry and the renderers
    "surface_points", "render_image", "render_video", "render_depth", "render_thermal", "render_points",
    "render_audio", "render_imu",
    # files
    "write_png", "write_wav", "write_ply", "read_ply", "write_mp4",
    # dataset and command line
    "write_scene", "sample_scenes", "manifest_record", "make_dataset", "read_manifest", "benchmark", "main",
]
