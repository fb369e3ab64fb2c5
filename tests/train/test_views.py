"""Training inputs beyond single images: centroid views for the language side, trimmed caption ids for the text
tower, video clips in the image-text stage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ibllm.bind import fuse
from ibllm.cache import VisualCache
from ibllm.config import VisualCacheConfig, from_name
from ibllm.encoders import ImageBind
from ibllm.llm.tokenizer import Tokenizer
from ibllm.train import toyworld as tw
from ibllm.train.align import CaptionIds, train_image_text, trim_ids
from ibllm.train.language import (
    CENTROID_IMAGES,
    CENTROID_VIEWS,
    Centroids,
    Example,
    ServedCache,
    TextMaker,
    _features,
)
from tests.conftest import REPO

TOY_TOKENIZER = REPO / "assets" / "toy" / "tokenizer.model"


def _scenes(n: int, seed: int = 0) -> list[tw.Scene]:
    rng = np.random.default_rng(seed)
    return [tw.sample_scene(rng, "train") for _ in range(n)]


def test_centroid_views_cover_the_partial_modalities_only() -> None:
    assert set(CENTROID_VIEWS) == {"point", "audio", "depth", "thermal", "imu"}


@pytest.mark.parametrize("view", ["imu", "point", "audio"])
def test_centroid_is_the_mean_of_the_images_that_agree_on_what_the_view_carries(view: str) -> None:
    scenes = _scenes(60)
    emb = F.normalize(torch.randn(len(scenes), 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    centroids = Centroids(scenes, emb, torch.Generator().manual_seed(2))
    carried = tw.CARRIES[view]
    for i in (0, 7, 33):
        same = [j for j, s in enumerate(scenes) if all(getattr(s, n) == getattr(scenes[i], n) for n in carried)]
        assert len(same) <= CENTROID_IMAGES  # small groups: the centroid uses all of them
        expected = F.normalize(emb[same].mean(0), dim=-1)
        assert torch.allclose(centroids(i, view), expected, atol=1e-6)


def test_large_groups_are_subsampled_and_stay_unit_length() -> None:
    scenes = _scenes(400)
    emb = F.normalize(torch.randn(len(scenes), 8, generator=torch.Generator().manual_seed(3)), dim=-1)
    centroids = Centroids(scenes, emb, torch.Generator().manual_seed(4))
    a, b = centroids(0, "imu"), centroids(0, "imu")  # ~67 scenes share a motion: two different subsets
    assert not torch.allclose(a, b)
    assert torch.allclose(a.norm(), torch.tensor(1.0))


@pytest.mark.skipif(not TOY_TOKENIZER.is_file(), reason="the shipped toy tokenizer is absent")
@pytest.mark.parametrize("view", ["imu", "point", "audio"])
def test_centroid_examples_ask_and_answer_as_that_modality(view: str) -> None:
    tok = Tokenizer(TOY_TOKENIZER)
    scenes = _scenes(5)
    maker = TextMaker(tok, [{"scene": s, "caption_variants": [tw.caption_for(s)]} for s in scenes], seed=0)
    for k in range(30):
        i = k % len(scenes)
        ex = maker.qa(i, i, view=view)
        assert ex.view == view and ex.feature == i and ex.mix is None
        question = tok.decode(ex.prompt).split("### Instruction:")[1].split("###")[0].strip()
        (latent,) = [n for n in tw.ASKED if tw.unwrap(question) in tw.QUESTIONS[n]]
        assert tok.decode(ex.answer[:-1]) == tw.answer_for(scenes[i], latent, view, question)


def test_cached_examples_are_read_through_the_shipped_cache_as_the_chat_serves_it() -> None:
    scenes = _scenes(80)
    emb = F.normalize(torch.randn(len(scenes), 16, generator=torch.Generator().manual_seed(5)), dim=-1)
    options = VisualCacheConfig(top_k=5, temperature=20.0, weight=0.5)
    cache = VisualCache.build(emb[:50])  # as shipped: the first rows of the training images
    served = ServedCache(cache, options)
    centroids = Centroids(scenes, emb, torch.Generator().manual_seed(6))
    blank = torch.zeros(1, 16)
    examples = [Example([1], [2], 3, cached=True), Example([1], [2], 60, cached=True),
                Example([1], [2], 3), Example([1], [2], -1)]
    feats = _features(examples, emb, blank, centroids, served)
    # a cached training image leaves its own row out (no chat input is in the cache); one beyond the cache cannot
    assert torch.allclose(feats[0], cache.mix(emb[3:4], 5, 20.0, 0.5, exclude=[3])[0], atol=1e-6)
    assert not torch.allclose(feats[0], cache.mix(emb[3:4], 5, 20.0, 0.5)[0], atol=1e-3)
    assert torch.allclose(feats[1], cache.mix(emb[60:61], 5, 20.0, 0.5)[0], atol=1e-6)
    assert torch.equal(feats[2], emb[3]) and torch.equal(feats[3], blank[0])  # the rest untouched
    # a centroid view (and a mix) is the fused feature, then the cache, with nothing left out
    point = Example([1], [2], 7, view="point", cached=True)
    mixed = Example([1], [2], 7, view="point", mix=(9, "imu"), cached=True)
    assert served.exclude(point) == -1 and served.exclude(mixed) == -1
    f = _features([point, mixed], emb, blank, centroids, served)
    centre = centroids(7, "point")  # groups this small use all their images: the same centroid every time
    fused = fuse([centre[None], centroids(9, "imu")[None]], [1.0, 1.0])[0]  # as the chat fuses two inputs
    assert torch.allclose(f[0], cache.mix(centre[None], 5, 20.0, 0.5)[0], atol=1e-5)
    assert torch.allclose(f[1], cache.mix(fused[None], 5, 20.0, 0.5)[0], atol=1e-5)


def test_trimmed_caption_ids_give_the_same_text_embeddings() -> None:
    torch.manual_seed(0)
    ib = ImageBind(from_name("toy").imagebind).eval()
    captions = CaptionIds(ib.cfg.text_context)
    ids = torch.stack([captions(tw.caption_for(s, kind)) for s in _scenes(4)
                       for kind in ("text", "imu")])
    trimmed = trim_ids(ids)
    assert trimmed.shape[1] < ids.shape[1]
    assert bool((trimmed.argmax(1) == ids.argmax(1)).all())
    with torch.no_grad():
        assert torch.allclose(ib("text", trimmed), ib("text", ids), atol=1e-5)


def test_video_clips_join_the_image_text_batch() -> None:
    """Images alone keep the stem's two temporal slices equal (~1e-7 apart after three steps); clips in the batch
    train them apart (~5e-3)."""
    torch.manual_seed(0)
    cfg = from_name("toy").imagebind
    ib = ImageBind(cfg)
    scenes = _scenes(16, seed=5)
    s = cfg.image_size
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(len(scenes), 3, s, s, generator=gen)
    captions = CaptionIds(cfg.text_context)
    text_ids = torch.stack([captions(tw.caption_for(sc)) for sc in scenes])
    frames = torch.rand(8, 1, 3, 2, s, s, generator=gen)
    stem = ib.modality_preprocessors.vision.rgbt_stem.proj[1].weight
    kw = {"steps": 3, "batch": 16, "lr": 1e-3, "weight_decay": 0.0, "show": False}
    train_image_text(ib, images, text_ids, scenes, gen=torch.Generator().manual_seed(1), **kw)
    assert torch.allclose(stem[:, :, 0], stem[:, :, 1], atol=1e-6)
    log = train_image_text(ib, images, text_ids, scenes, gen=torch.Generator().manual_seed(1),
                           class_latents=("shape", "motion"), videos=frames, **kw)
    assert float((stem[:, :, 0] - stem[:, :, 1]).abs().max()) > 1e-4
    assert np.isfinite(log["loss_last"])
