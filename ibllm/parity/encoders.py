"""Parity of the encoders: every per-modality embedding, the point-encoder intermediates and the end-to-end
embeddings of the reference-preprocessed media (fixture README, "How they were produced" 1, 2 and 6).

The reference draws the FPS start point at random; its draw is taken from the stored ``fps_idx[:, 0]``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ibllm.encoders import ImageBind, load_imagebind_weights
from ibllm.parity.fixture import Comparison, Fixture

FLOAT_TOL = 1e-4

# Input tensor name -> branch. "video" is the vision branch with a clip axis.
INPUTS = (("vision", "vision"), ("video", "vision"), ("text", "text"), ("audio", "audio"), ("depth", "depth"),
          ("thermal", "thermal"), ("imu", "imu"), ("point", "point"))

# e2e tensor -> branch, from preprocessing/preprocessed.safetensors. Not here: e2e.video_mp4_default5 (its input
# tensor is not stored) and e2e.text_strings_long (covered with the project's own tokenizer, which keeps the EOT).
E2E = (("vision_png", "vision"), ("video_mp4", "vision"), ("audio_wav", "audio"), ("text_strings", "text"),
       ("point_npy", "point"))


def build_model(fx: Fixture) -> ImageBind:
    """The fixture's ImageBind, built on the meta device and assigned from its ``image_bind.*`` tensors."""
    with torch.device("meta"):
        model = ImageBind(fx.config.imagebind)
    load_imagebind_weights(model, {k: v for k, v in fx.state_dict.items() if k.startswith("image_bind.")})
    return model.eval()


def checks(fx: Fixture) -> Iterator[Comparison]:
    model = build_model(fx)
    exp = fx.expected
    fps_start = exp["point.fps_idx"][:, 0]

    with torch.no_grad():
        for name, modality in INPUTS:
            out = model.encode(modality, fx.inputs[name], fps_start=fps_start if modality == "point" else None)
            yield Comparison(f"emb.{name}", out.embedding, exp[f"emb.{name}"], FLOAT_TOL)
            yield Comparison(f"emb_prenorm.{name}", out.prenorm, exp[f"emb_prenorm.{name}"], FLOAT_TOL)
            yield Comparison(f"emb_normalized.{name}", F.normalize(out.embedding, dim=-1),
                             exp[f"emb_normalized.{name}"], FLOAT_TOL)

        points = fx.inputs["point"]
        gen = torch.Generator().manual_seed(fx.fps_seed)
        yield Comparison("point.fps_start_from_seed", torch.randint(0, points.shape[1], (points.shape[0],),
                                                                     generator=gen),
                         exp["point.fps_start_from_seed"], 0, note="torch RNG convention of the reference")
        feats = model.point_trunk.features(points, fps_start)
        yield Comparison("point.fps_idx", feats.groups.fps_idx, exp["point.fps_idx"], 0)
        yield Comparison("point.center", feats.groups.center, exp["point.center"], FLOAT_TOL)
        yield Comparison("point.group_idx_sorted", feats.groups.knn_idx.sort(dim=-1).values,
                         exp["point.group_idx_sorted"], 0)
        yield Comparison("point.point_feat", feats.point_feat, exp["point.point_feat"], FLOAT_TOL)
        yield Comparison("point.pc_embed", feats.pc_embed, exp["point.pc_embed"], FLOAT_TOL)

        for name, modality in E2E:
            x = fx.preprocessed[name]
            start = exp[f"e2e.{name}.fps_idx"][:, 0] if modality == "point" else None
            if modality == "point":
                groups = model.point_trunk.point_encoder.group(x, start)
                yield Comparison(f"e2e.{name}.fps_idx", groups.fps_idx, exp[f"e2e.{name}.fps_idx"], 0)
                yield Comparison(f"e2e.{name}.center", groups.center, exp[f"e2e.{name}.center"], FLOAT_TOL)
            yield Comparison(f"e2e.{name}", model(modality, x, fps_start=start), exp[f"e2e.{name}"], FLOAT_TOL,
                             note="from the stored reference-preprocessed tensor")
