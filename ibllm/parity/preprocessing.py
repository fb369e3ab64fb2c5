"""Parity of the media loaders (ibllm.media) with the reference's ImageBind/data.py loaders.

Compares our outputs on the fixture's media files with ``preprocessing/preprocessed.safetensors``, and our
tokens of ``config.inputs.text_strings`` with ``inputs.safetensors['text']``. Only the preprocessing sizes of
the fixture matter here (image 224, 128 mel bins, 204 frames, 8192 points in the file), and they equal the
ImageBind-Huge defaults, so the default ``ImageBindConfig`` is used with the point count of the file.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ibllm.config import ImageBindConfig, PointConfig
from ibllm.media.audio import load_audio, load_waveform_16k
from ibllm.media.image import load_image
from ibllm.media.point import load_point, normalize_points, read_points
from ibllm.media.text import tokenize
from ibllm.media.video import decode_clip_frames, load_video
from ibllm.parity.fixture import Comparison, Fixture, point_input_case

# decord and the reference's PyAV both convert YUV -> RGB with FFmpeg's swscale; on the fixture they agree
# exactly (max diff 0). Another FFmpeg build could round a few pixels differently (1/255 on a pixel, ~0.015
# after CLIP normalisation), which is the budget allowed here for the float video tensor.
VIDEO_TOL = 0.02
VIDEO_UINT8_TOL = 1.0


def checks(fx: Fixture) -> Iterator[Comparison]:
    pre = fx.preprocessed
    media = fx.media_dir
    prep = fx.raw_config["preprocessing"]
    points = int(prep.get("media", {}).get("points", 8192))
    cfg = ImageBindConfig(point=PointConfig(num_points=points))
    video_kw = prep.get("video_kwargs", {})
    clips = int(video_kw.get("clips_per_video", 5))
    clip_seconds = int(video_kw.get("clip_duration", 2))

    yield Comparison("preprocessing.vision_png", load_image(media / prep["image"], cfg)[None],
                     pre["vision_png"], tol=1e-6)
    yield Comparison("preprocessing.audio_wav_resampled_16k", load_waveform_16k(media / prep["audio"]),
                     pre["audio_wav_resampled_16k"], tol=1e-6)
    yield Comparison("preprocessing.audio_wav", load_audio(media / prep["audio"], cfg)[None], pre["audio_wav"],
                     tol=1e-5, note="in-place per-clip mean subtraction on the shared waveform")
    unchanged, note = point_input_case(read_points(media / prep["points"]))
    expected = pre["point_npy"] if unchanged else \
        torch.from_numpy(normalize_points(pre["point_npy"][0].double().numpy())).float()[None]
    yield Comparison("preprocessing.point_npy", load_point(media / prep["points"], cfg)[None], expected,
                     tol=0.0 if unchanged else 1e-6, note=note)
    frames = decode_clip_frames(media / prep["video"], clips, clip_seconds, cfg.video_frames)
    sampled = torch.from_numpy(np.stack(frames)).permute(0, 4, 1, 2, 3).contiguous()  # (clips, C, T, H, W)
    yield Comparison("preprocessing.video_mp4_sampled_frames_uint8", sampled,
                     pre["video_mp4_sampled_frames_uint8"], tol=VIDEO_UINT8_TOL,
                     note="decord vs the reference's PyAV decode")
    yield Comparison("preprocessing.video_mp4", load_video(media / prep["video"], cfg, clips=clips,
                     clip_seconds=clip_seconds)[None], pre["video_mp4"], tol=VIDEO_TOL,
                     note=f"clips_per_video={clips}; tolerance covers 1/255 decoder rounding")
    yield Comparison("preprocessing.text_strings", tokenize(prep["text_strings"], cfg.text_context),
                     pre["text_strings"], tol=0.0)
    long_ours = tokenize(prep["text_strings_long"], cfg.text_context)
    yield Comparison("preprocessing.text_strings_long[:76]", long_ours[:, :76], pre["text_strings_long"][:, :76],
                     tol=0.0, note="first 76 positions only: we keep EOT at position 76, the reference cuts it")
    yield Comparison("inputs.text", tokenize(fx.raw_config["inputs"]["text_strings"], cfg.text_context),
                     fx.inputs["text"], tol=0.0)


__all__ = ["checks"]
