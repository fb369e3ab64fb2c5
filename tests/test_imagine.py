"""Picture answers (ibllm/imagine.py, ChatEngine.imagine) with a tiny random unCLIP pipeline written to a tmp folder.

The engine is the embedded toy model; the pipeline takes its 128-d embeddings (the real one takes 1024-d OpenCLIP
ViT-H embeddings, which the toy model cannot offer: see test_the_toy_model_is_told_why_not).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ibllm.config import PictureConfig, VisualCacheConfig
from ibllm.imagine import UNCLIP_URL, PictureError, locate, picture_status, target_norm
from ibllm.types import Attachment
from tests.app_helpers import toy_file
from tests.conftest import REPO

pytestmark = pytest.mark.slow
FAST = PictureConfig(steps=3, seed=7)


@pytest.fixture(scope="module")
def engine(tiny_unclip: Path):
    from ibllm import create_engine

    return create_engine(unclip=str(tiny_unclip))


def picture(engine, question: str, attachments, **kwargs):
    events = list(engine.imagine(question, attachments=attachments, **kwargs))
    assert events[-1].done and all(not e.done for e in events[:-1])
    return events


def pixels(event) -> np.ndarray:
    return np.asarray(event.image)


def test_the_embedding_reaches_the_pipeline_unchanged(engine):
    """Shape, length, device, dtype and direction of what the pipeline gets, computed here from the parts."""
    sound = Attachment(str(toy_file("audio")), "audio")
    shape = Attachment(str(toy_file("point")), "point", weight=0.5)
    cache = VisualCacheConfig(enabled=True, top_k=5, temperature=20.0, weight=0.5)
    pipe = engine.painter.pipeline()
    received = []
    noise = pipe.noise_image_embeddings

    def spy(*, image_embeds, **kwargs):  # records what the pipeline itself was handed, then runs as usual
        received.append(image_embeds.clone())
        return noise(image_embeds=image_embeds, **kwargs)

    pipe.noise_image_embeddings = spy
    try:
        drawn = picture(engine, "What would it look like?", [sound, shape], visual_cache=cache, picture=FAST)[-1]
    finally:
        del pipe.noise_image_embeddings
    (got,) = received

    # Expected, from the parts: the weighted mean of unit embeddings, mixed with its cache neighbours, at the length
    # of the embeddings the normaliser was fitted on.
    unit = [F.normalize(engine.embed(a), dim=-1) for a in (sound, shape)]
    fused = unit[0] * (1 / 1.5) + unit[1] * (0.5 / 1.5)
    mixed, _ = engine.visual_cache.mix_with_neighbours(fused[None], 5, 20.0, 0.5)
    norm = target_norm(pipe.image_normalizer.mean.detach(), pipe.image_normalizer.std.detach())
    assert got.shape == (1, engine.cfg.imagebind.out_embed_dim)
    assert got.device == engine.device and got.dtype == engine.dtype
    assert got.norm().item() == pytest.approx(norm, rel=1e-5)
    assert norm != pytest.approx(engine.cfg.imagebind.out_embed_dim ** 0.5, rel=0.01)  # the stats are not 0/1
    torch.testing.assert_close(got.cpu(), F.normalize(mixed.float(), dim=-1) * norm, rtol=1e-5, atol=1e-5)

    # The cache is really mixed in: without it the embedding (and so the picture) differs.
    plain = picture(engine, "What would it look like?", [sound, shape], visual_cache=VisualCacheConfig(enabled=False),
                    picture=FAST)[-1]
    assert not np.array_equal(pixels(plain), pixels(drawn))

    # And it is the picture the pipeline draws from that embedding with that seed and prompt, called directly.
    direct = pipe(prompt="What would it look like?", image_embeds=got, num_inference_steps=FAST.steps,
                  guidance_scale=FAST.guidance, generator=torch.Generator().manual_seed(FAST.seed)).images[0]
    assert np.array_equal(np.asarray(direct), pixels(drawn))


def test_seeds_repeat_and_differ(engine):
    image = [Attachment(str(toy_file("image")), "image")]
    first = picture(engine, "Draw it.", image, picture=FAST)
    again = picture(engine, "Draw it.", image, picture=FAST)[-1]
    other = picture(engine, "Draw it.", image, picture=PictureConfig(steps=3, seed=8))[-1]
    assert np.array_equal(pixels(first[-1]), pixels(again))
    assert not np.array_equal(pixels(first[-1]), pixels(other))
    # A random seed is reported, and drawing with it gives the same picture.
    drawn = picture(engine, "Draw it.", image, picture=PictureConfig(steps=3))[-1]
    assert drawn.seed is not None
    repeat = picture(engine, "Draw it.", image, picture=PictureConfig(steps=3, seed=drawn.seed))[-1]
    assert np.array_equal(pixels(drawn), pixels(repeat))
    # Progress: one event per step, in order, with the time per step measured.
    steps = [e.step for e in first if e.step and not e.done]
    assert steps == [1, 2, 3] and first[-1].timings.seconds_per_step > 0
    height, width = pixels(first[-1]).shape[:2]
    assert (height, width) == (32, 32)  # the tiny pipeline's size (UNet 16×16 latents, VAE ×2)


@pytest.mark.parametrize(("settings", "named"), [
    (PictureConfig(steps=0), "steps"),
    (PictureConfig(steps=2.5), "steps"),  # type: ignore[arg-type]
    (PictureConfig(guidance=-1.0), "guidance"),
    (PictureConfig(seed=-3), "seed"),
    (PictureConfig(noise_level=1000), "noise level"),
])
def test_bad_settings_are_clear_errors(engine, settings, named):
    with pytest.raises(ValueError, match=named):
        next(engine.imagine("Draw it.", attachments=[Attachment(str(toy_file("image")), "image")], picture=settings))


def test_a_picture_needs_an_input(engine):
    with pytest.raises(PictureError, match="attach at least one file"):
        next(engine.imagine("Draw a cube.", attachments=[]))


def test_a_stopped_picture_ends_and_frees_the_pipeline(engine):
    image = [Attachment(str(toy_file("image")), "image")]
    steps = 0

    def stop() -> bool:
        return steps >= 2

    for event in engine.imagine("Draw it.", attachments=image, picture=PictureConfig(steps=50, seed=1),
                                should_stop=stop):
        steps = max(steps, event.step)
        assert not event.done
    assert steps < 50
    assert picture(engine, "Draw it.", image, picture=FAST)[-1].image is not None  # the next one is drawn


def test_the_text_chat_is_unaffected_when_the_pipeline_is_missing(tmp_path):
    from ibllm import create_engine

    engine = create_engine(unclip=str(tmp_path / "no-such-folder"))
    status = engine.picture_status()
    assert not status.available and "no-such-folder" in status.note and "huggingface-cli download" in status.note
    image = [Attachment(str(toy_file("image")), "image")]
    with pytest.raises(PictureError, match="huggingface-cli download"):
        next(engine.imagine("Draw it.", attachments=image))
    assert engine.answer("What shape is it?", attachments=image).strip()  # the text answer still comes
    assert not engine.painter.loaded


def test_offline_a_missing_hub_pipeline_is_named_with_where_to_get_it(tmp_path):
    note = picture_status("someone/unclip-not-in-the-cache", 1024, offline=True).note
    assert "not here" in note and "HF_HUB_OFFLINE" in note
    with pytest.raises(PictureError, match="HF_HUB_OFFLINE") as caught:
        locate("someone/unclip-not-in-the-cache", offline=True)
    assert "huggingface-cli download" in str(caught.value)
    with pytest.raises(PictureError, match="model_index.json"):
        locate(tmp_path)  # a folder, but not a pipeline


def test_the_toy_model_is_told_why_not():
    """The default pipeline takes 1024-d OpenCLIP embeddings; the toy model's space is 128-d."""
    from ibllm import create_engine

    status = create_engine().picture_status()
    assert not status.available
    assert "128-d" in status.note and "1024-d" in status.note and "official ImageBind weights" in status.note
    assert UNCLIP_URL.endswith("stable-diffusion-2-1-unclip")


def test_the_app_runs_and_explains_without_diffusers():
    """With diffusers and transformers unimportable the app still builds and answers; importing it never loads
    diffusers (it takes seconds), and asking for a picture says what to install."""
    script = """
import sys
sys.modules["diffusers"] = None  # as if not installed
sys.modules["transformers"] = None
from ibllm import create_engine
from ibllm.ui import build_demo
from ibllm.types import Attachment
engine = create_engine(unclip=sys.argv[1])
build_demo(engine, gallery=None)
print("status:", engine.picture_status().note)
image = [Attachment(sys.argv[2], "image")]
print("answer:", engine.answer("What shape is it?", attachments=image).strip())
try:
    next(engine.imagine("Draw it.", attachments=image))
except RuntimeError as exc:
    print("picture:", exc)
"""
    probe = "import sys, ibllm.ui, ibllm.cli; print(sorted(m for m in sys.modules if m.split('.')[0] == 'diffusers'))"
    env = {"HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PATH": "/usr/bin:/bin"}
    imported = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, env=env,
                              timeout=300)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "[]"
    out = subprocess.run([sys.executable, "-c", script, "stabilityai/stable-diffusion-2-1-unclip",
                          str(toy_file("image"))], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)
    assert "requirements-image.txt" in lines["status"] and "diffusers" in lines["status"]
    assert lines["answer"]
    assert "requirements-image.txt" in lines["picture"]


def test_the_memory_check_counts_the_weights_and_refuses_before_loading(engine, tiny_unclip, monkeypatch):
    import ibllm.imagine as imagine

    pipe = engine.painter.pipeline()
    loaded = sum(p.numel() for part in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.image_normalizer)
                 for p in part.parameters())
    assert imagine.weights_bytes(tiny_unclip, torch.float32) == 4 * loaded
    assert imagine.weights_bytes(tiny_unclip, torch.bfloat16) == 2 * loaded

    monkeypatch.setattr(imagine, "WORKING_MARGIN", 1 << 60)  # more room than any machine has
    painter = imagine.Painter(str(tiny_unclip), engine.device, engine.dtype, engine.cfg.imagebind.out_embed_dim)
    with pytest.raises(PictureError, match="needs about .* GB available"):
        painter.pipeline()
    assert not painter.loaded
