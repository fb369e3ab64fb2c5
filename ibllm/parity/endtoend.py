"""End-to-end parity: the whole model as the app runs it, from files and raw inputs to tokens.

The other groups check each stage on the reference's own intermediate tensors. This one chains ours: the media
loaders on the fixture's files -> our encoders (``e2e.*``), and the raw input tensors -> our encoders -> fuse ->
visual cache -> bind network -> gated LLaMA -> greedy tokens (``mix*``, ``gen.*``), all through ``ImageBindLLM``
loaded from the official-layout state dict.

Not compared: ``e2e.text_strings_long``. The reference cuts an over-long text after appending the end token, so
its text head pools position 0; we keep the end token on purpose (the preprocessing group shows the first 76 ids
agree).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace

import torch

from ibllm.bind import fuse
from ibllm.cache import VisualCache
from ibllm.config import GenerationConfig
from ibllm.llm.generate import generate_tokens
from ibllm.media import load_media
from ibllm.media.point import read_points
from ibllm.media.text import tokenize
from ibllm.model import ImageBindLLM
from ibllm.parity.fixture import Comparison, Fixture, build_network, point_input_case

TOL = 1e-4
# Mix entry name -> encoder branch (the fixture's "Image"/"Video" both use the vision tower).
BRANCH = {"Image": "vision", "Video": "vision", "Audio": "audio", "Point": "point", "Text": "text",
          "Depth": "depth", "Thermal": "thermal", "IMU": "imu"}


def _media_checks(fx: Fixture, net: ImageBindLLM) -> Iterator[Comparison]:
    exp, cfg, media = fx.expected, fx.config.imagebind, fx.media_dir
    files = fx.raw_config["preprocessing"]
    image = load_media(media / files["image"], "image", cfg)[None]
    yield Comparison("e2e.vision_png", net.image_bind("vision", image), exp["e2e.vision_png"], TOL,
                     note="our image loader + encoder")
    audio = load_media(media / files["audio"], "audio", cfg)[None]
    yield Comparison("e2e.audio_wav", net.image_bind("audio", audio), exp["e2e.audio_wav"], TOL,
                     note="our audio loader + encoder")
    video = load_media(media / files["video"], "video", cfg)[None]  # default: 5 clips x 3 crops
    yield Comparison("e2e.video_mp4_default5", net.image_bind("vision", video), exp["e2e.video_mp4_default5"], TOL,
                     note="our video loader (5 clips x 3 crops) + encoder")
    # The reference feeds the file's 8192 points as they are (config: preprocessing.media.points).
    n_points = fx.raw_config["preprocessing"]["media"]["points"]
    point_cfg = replace(cfg, point=replace(cfg.point, num_points=n_points))
    unchanged, case = point_input_case(read_points(media / files["points"]))
    if unchanged:
        points, note = load_media(media / files["points"], "point", point_cfg)[None], "our point loader + encoder"
    else:  # the reference embedded the raw cloud: feed it as the reference did (the loader would normalise it)
        points = torch.from_numpy(read_points(media / files["points"])).float()[None]
        note = f"encoder on the file's points as the reference fed them; loader: {case}"
    start = exp["e2e.point_npy.fps_idx"][:, 0]
    yield Comparison("e2e.point_npy", net.image_bind("point", points, fps_start=start), exp["e2e.point_npy"], TOL,
                     note=f"{note} (reference FPS start)")
    text = tokenize(fx.raw_config["preprocessing"]["text_strings"])
    yield Comparison("e2e.text_strings", net.image_bind("text", text), exp["e2e.text_strings"], TOL,
                     note="our CLIP tokenizer + encoder")


def _embeddings(fx: Fixture, net: ImageBindLLM, entries: list, fps_start: torch.Tensor | None,
                rows: slice) -> list[torch.Tensor]:
    out = []
    for name, tensor, _ in entries:
        branch = BRANCH[name]
        start = fps_start if branch == "point" else None
        out.append(net.image_bind(branch, fx.inputs[tensor][rows], fps_start=start))
    return out


def _chain_checks(fx: Fixture, net: ImageBindLLM) -> Iterator[Comparison]:
    exp, knn = fx.expected, fx.raw_config["knn"]
    cache = VisualCache.build(fx.knn_vectors, kind="flat")
    batch = fx.inputs["vision"].shape[0]
    knn_queries: dict[str, torch.Tensor] = {}
    for mix, entries in fx.raw_config["mixes"].items():
        weights = [w for _, _, w in entries]
        fused = fuse(_embeddings(fx, net, entries, exp["point.fps_idx"][:, 0], slice(None)), weights)
        yield Comparison(f"e2e:{mix}.fused", fused, exp[f"{mix}.fused"], TOL, note="inputs -> encoders -> fuse")
        yield Comparison(f"e2e:{mix}.visual_query_noknn", net.bind(fused), exp[f"{mix}.visual_query_noknn"], TOL)
        # The reference's cache branch runs one sample at a time, each with its own FPS start draw.
        starts = exp.get(f"{mix}.knn.point_fps_idx", exp["point.fps_idx"])[:, 0]
        mixed = torch.cat([
            cache.mix(fuse(_embeddings(fx, net, entries, starts[b:b + 1], slice(b, b + 1)), weights),
                      knn["cache_size"], knn["cache_t"], knn["cache_weight"])
            for b in range(batch)])
        yield Comparison(f"e2e:{mix}.knn.fused_after_knn", mixed, exp[f"{mix}.knn.fused_after_knn"], TOL)
        knn_queries[mix] = mixed
        yield Comparison(f"e2e:{mix}.knn.visual_query", net.bind(mixed), exp[f"{mix}.knn.visual_query"], TOL)

    decoded = json.loads((fx.root / "run_info.json").read_text())["generation_decoded_token_ids"]
    for name, spec in fx.raw_config["generation"].items():
        entries = fx.raw_config["mixes"][spec["mix"]]
        weights = [w for _, _, w in entries]
        ids = []
        for sample, prompt in zip(spec["samples"], spec["prompts"], strict=True):
            if spec["knn"]:
                feature = knn_queries[spec["mix"]][sample:sample + 1]
            else:
                start = exp["point.fps_idx"][sample:sample + 1, 0]
                feature = fuse(_embeddings(fx, net, entries, start, slice(sample, sample + 1)), weights)
            greedy = GenerationConfig.greedy(spec["max_gen_len"])
            tokens = generate_tokens(net.llama, prompt, net.injection(feature), greedy,
                                     eos_id=fx.raw_config["stub_tokenizer"]["eos_id"])
            ids.append(list(tokens))
        yield Comparison(f"e2e:gen.{name}.greedy_tokens", torch.tensor(ids), torch.tensor(decoded[name]), 0,
                         note="files-free chain: inputs -> ... -> tokens, batch 1 per sample")


def checks(fx: Fixture) -> Iterator[Comparison]:
    net = build_network(fx)
    net.llama.setup_cache(1, fx.config.llama.max_seq_len)
    yield from _media_checks(fx, net)
    yield from _chain_checks(fx, net)
