"""ImageBind / Point-Bind encoders: shapes at non-default sizes, clip averaging, strict loading of every
accepted layout, meta-device loading, farthest point sampling, and parity with the reference fixture."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ibllm.checkpoint import CheckpointError
from ibllm.config import IMAGEBIND_HUGE, ImageBindConfig, PointConfig, TrunkConfig
from ibllm.encoders import (
    ImageBind,
    farthest_point_sample,
    group_points,
    input_shape,
    knn_indices,
    load_imagebind_weights,
    num_tokens,
)
from ibllm.kinds import ENCODER_BRANCHES
from tests.conftest import PARITY_A

FIXTURE = PARITY_A

# Two small configs with different widths, depths, heads and stem sizes, none of them the reference's.
TINY_A = ImageBindConfig(
    out_embed_dim=16,
    vision=TrunkConfig(24, 2, 3, 0.1), text=TrunkConfig(16, 1, 2), audio=TrunkConfig(12, 1, 3, 0.1),
    depth=TrunkConfig(8, 1, 2), thermal=TrunkConfig(16, 2, 4), imu=TrunkConfig(8, 2, 1, 0.7),
    point=PointConfig(trans_dim=16, depth=2, num_heads=2, group_size=8, num_group=12, encoder_dims=24,
                      proj_dim=20, num_points=96),
    image_size=32, video_frames=2, vision_kernel=(2, 8, 8), audio_kernel=8, audio_stride=6, audio_mel_bins=20,
    audio_target_len=30, depth_kernel=8, thermal_kernel=16, imu_channels=6, imu_length=40, imu_window=8,
    text_vocab_size=50, text_context=12,
)
TINY_B = ImageBindConfig(
    out_embed_dim=8,
    vision=TrunkConfig(12, 1, 2), text=TrunkConfig(24, 2, 4), audio=TrunkConfig(8, 2, 1),
    depth=TrunkConfig(12, 2, 3), thermal=TrunkConfig(8, 1, 2), imu=TrunkConfig(16, 1, 4, 0.3),
    point=PointConfig(trans_dim=8, depth=1, num_heads=1, group_size=4, num_group=6, encoder_dims=8,
                      proj_dim=12, num_points=40),
    image_size=28, video_frames=4, vision_kernel=(2, 7, 14), audio_kernel=10, audio_stride=10, audio_mel_bins=16,
    audio_target_len=25, depth_kernel=14, thermal_kernel=7, imu_channels=3, imu_length=36, imu_window=6,
    text_vocab_size=30, text_context=9,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        yield
    torch.set_num_threads(before)


def make_model(cfg: ImageBindConfig = TINY_A, seed: int = 0) -> ImageBind:
    torch.manual_seed(seed)
    return ImageBind(cfg).eval()


def random_input(cfg: ImageBindConfig, modality: str, batch: int = 2, clips: int | None = None,
                 seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = input_shape(cfg, modality)
    if modality == "text":
        ids = torch.randint(1, cfg.text_vocab_size - 1, (batch, *shape), generator=g)
        ids[:, 5:] = 0
        ids[:, 4] = cfg.text_vocab_size - 1  # end-of-text: the largest id
        return ids
    lead = (batch,) if clips is None else (batch, clips)
    return torch.randn(*lead, *shape, generator=g)


def embed_all(model: ImageBind, cfg: ImageBindConfig) -> dict[str, torch.Tensor]:
    start = torch.tensor([3, 7])
    return {m: model(m, random_input(cfg, m), fps_start=start if m == "point" else None) for m in ENCODER_BRANCHES}


# ----------------------------------------------------------------------------------------------------------
# Shapes and behaviour


@pytest.mark.parametrize("cfg", [TINY_A, TINY_B], ids=["tiny_a", "tiny_b"])
def test_every_modality_gives_one_embedding_per_sample(cfg: ImageBindConfig):
    model = make_model(cfg)
    for modality in ENCODER_BRANCHES:
        out = model.encode(modality, random_input(cfg, modality, batch=3))
        assert out.embedding.shape == (3, cfg.out_embed_dim), modality
        assert out.prenorm.shape == (3, cfg.out_embed_dim), modality
        assert torch.isfinite(out.embedding).all(), modality
    vision = model.modality_preprocessors["vision"].pos_embedding_helper.pos_embed
    assert vision.shape == (1, num_tokens(cfg, "vision"), cfg.vision.embed_dim)


def test_token_counts_of_imagebind_huge_follow_reference():
    with torch.device("meta"):
        model = ImageBind(IMAGEBIND_HUGE)
    pre = model.modality_preprocessors
    assert pre["vision"].pos_embedding_helper.pos_embed.shape == (1, 257, 1280)
    assert pre["audio"].pos_embedding_helper.pos_embed.shape == (1, 229, 768)
    assert pre["depth"].pos_embedding_helper.pos_embed.shape == (1, 197, 384)
    assert pre["thermal"].pos_embedding_helper.pos_embed.shape == (1, 197, 768)
    assert pre["imu"].pos_embed.shape == (1, 251, 512)
    assert model.point_trunk.pc_projection.shape == (768, 512)
    assert model.modality_trunks["audio"].blocks[0].attn.bias_k.shape == (1, 1, 768)
    assert model.modality_trunks["text"].blocks[0].attn.bias_k is None


def test_postprocessed_norms_are_the_logit_scales():
    model = make_model()
    emb = embed_all(model, TINY_A)
    scales = {"vision": 1.0, "text": 1 / 0.07, "audio": 20.0, "depth": 5.0, "thermal": 10.0, "imu": 5.0, "point": 1.0}
    for modality, scale in scales.items():
        torch.testing.assert_close(emb[modality].norm(dim=-1), torch.full((2,), scale), rtol=1e-5, atol=1e-5)


def test_image_equals_clip_of_repeated_frames():
    model = make_model()
    image = random_input(TINY_A, "vision")[:, :, 0]
    clip = image.unsqueeze(2).repeat(1, 1, TINY_A.video_frames, 1, 1)
    torch.testing.assert_close(model("vision", image), model("vision", clip))


@pytest.mark.parametrize("modality", ["vision", "audio"])
def test_clips_are_encoded_separately_then_averaged(modality: str):
    model = make_model()
    x = random_input(TINY_A, modality, batch=2, clips=3)
    per_clip = [model.encode(modality, x[:, s]) for s in range(3)]
    out = model.encode(modality, x)
    torch.testing.assert_close(out.embedding, torch.stack([o.embedding for o in per_clip]).mean(0))
    torch.testing.assert_close(out.prenorm, torch.stack([o.prenorm for o in per_clip]).mean(0))


def test_text_pools_the_end_of_text_position():
    model = make_model()
    ids = random_input(TINY_A, "text")
    changed = ids.clone()
    changed[:, 6:] = 3  # tokens after the EOT cannot reach it through the causal mask
    torch.testing.assert_close(model("text", ids), model("text", changed))


def test_drop_path_only_in_training():
    model = make_model()
    x = random_input(TINY_A, "imu")
    torch.testing.assert_close(model("imu", x), model("imu", x))
    trunk = model.modality_trunks["imu"]
    assert [b.drop_path.p for b in trunk.blocks] == pytest.approx([0.0, 0.7])  # linear from 0 to the rate
    assert [b.drop_path.p for b in ImageBind(TINY_B).modality_trunks["imu"].blocks] == [0.0]
    model.train()
    tokens = torch.randn(8, num_tokens(TINY_A, "imu"), TINY_A.imu.embed_dim)
    torch.manual_seed(0)
    a = trunk(tokens)
    torch.manual_seed(1)
    assert not torch.equal(a, trunk(tokens))


def test_wrong_input_shapes_are_explained():
    model = make_model()
    with pytest.raises(ValueError, match="tokens"):
        model("depth", torch.randn(2, 1, 48, 48))
    with pytest.raises(ValueError, match="IMU input"):
        model("imu", torch.randn(2, 6, 41))
    with pytest.raises(ValueError, match=r"expected \(B, 3, 32, 32\)"):
        model("vision", torch.randn(2, 3))
    with pytest.raises(ValueError, match="unknown modality"):
        model("smell", torch.randn(2, 3))


# ----------------------------------------------------------------------------------------------------------
# Farthest point sampling and grouping


def brute_force_fps(xyz: torch.Tensor, n: int, start: int) -> list[int]:
    pts = xyz.double().tolist()
    chosen = [start]
    nearest = [math.inf] * len(pts)
    for _ in range(n - 1):
        c = pts[chosen[-1]]
        dist = [sum((a - b) ** 2 for a, b in zip(p, c, strict=True)) for p in pts]
        nearest = [min(d, e) for d, e in zip(nearest, dist, strict=True)]
        chosen.append(max(range(len(pts)), key=lambda i: (nearest[i], -i)))
    return chosen


def test_fps_is_deterministic_and_matches_brute_force():
    xyz = torch.randn(2, 60, 3, generator=torch.Generator().manual_seed(5))
    idx = farthest_point_sample(xyz, 10)
    assert torch.equal(idx, farthest_point_sample(xyz, 10))
    assert (idx[:, 0] == 0).all()
    for b in range(2):
        assert idx[b].tolist() == brute_force_fps(xyz[b], 10, 0)
    start = torch.tensor([17, 42])
    idx = farthest_point_sample(xyz, 10, start)
    for b in range(2):
        assert idx[b].tolist() == brute_force_fps(xyz[b], 10, int(start[b]))


def test_groups_are_the_nearest_points_recentred():
    xyz = torch.randn(2, 80, 3, generator=torch.Generator().manual_seed(6))
    groups = group_points(xyz, num_group=5, group_size=7)
    assert groups.center.shape == (2, 5, 3) and groups.knn_idx.shape == (2, 5, 7)
    brute = torch.cdist(groups.center.double(), xyz.double()).argsort(dim=-1)[..., :7]
    assert torch.equal(groups.knn_idx.sort(-1).values, brute.sort(-1).values)
    rows = torch.arange(2)[:, None, None]
    torch.testing.assert_close(groups.neighborhood + groups.center[:, :, None], xyz[rows, groups.knn_idx])
    assert torch.equal(knn_indices(xyz, groups.center, 1)[..., 0], groups.fps_idx)  # a centre is its own nearest


# ----------------------------------------------------------------------------------------------------------
# Loading


def to_pointbind_naming(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The standalone Point-Bind names of the point-branch tensors."""
    renames = (("point_trunk.point_encoder.", "point_encoder."), ("point_trunk.pc_projection", "pc_projection"),
               ("modality_heads.point.", "bind.modality_head_point."),
               ("modality_postprocessors.point.", "bind.modality_postprocessor_point."))
    out = {}
    for key, value in state.items():
        for src, dst in renames:
            if key.startswith(src):
                out[dst + key[len(src):]] = value
    return out


POINT_PREFIXES = ("point_trunk.", "modality_heads.point.", "modality_postprocessors.point.")


def test_every_layout_loads_to_identical_outputs(tmp_path: Path):
    source = make_model(seed=1)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    expected = embed_all(source, TINY_A)

    torch.save(state, tmp_path / "imagebind_w3D.pth")
    save_file({f"image_bind.{k}": v for k, v in state.items()}, tmp_path / "prefixed.safetensors")
    torch.save({k: v for k, v in state.items() if not k.startswith(POINT_PREFIXES)}, tmp_path / "huge.pth")
    torch.save(to_pointbind_naming(state), tmp_path / "pointbind.pt")

    layouts = {
        "plain .pth": tmp_path / "imagebind_w3D.pth",
        "image_bind. prefix": tmp_path / "prefixed.safetensors",
        "ImageBind + standalone Point-Bind": [tmp_path / "huge.pth", tmp_path / "pointbind.pt"],
        "state dict": state,
    }
    for what, src in layouts.items():
        model = make_model(seed=2)
        assert load_imagebind_weights(model, src) == [], what
        got = embed_all(model, TINY_A)
        for modality in ENCODER_BRANCHES:
            assert torch.equal(got[modality], expected[modality]), (what, modality)


def test_meta_device_model_is_assigned_from_the_mapped_file(tmp_path: Path):
    source = make_model(seed=1)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    with torch.device("meta"):
        model = ImageBind(TINY_A)
    assert all(t.is_meta for t in model.state_dict().values())
    load_imagebind_weights(model, tmp_path / "w.pth")
    assert not any(t.is_meta for t in model.state_dict().values())
    model.eval()
    got, expected = embed_all(model, TINY_A), embed_all(source, TINY_A)
    for modality in ENCODER_BRANCHES:
        assert torch.equal(got[modality], expected[modality]), modality


def test_unexpected_and_missing_keys_are_named():
    state = dict(make_model(seed=1).state_dict())
    del state["modality_trunks.audio.blocks.0.attn.bias_k"]
    state["modality_heads.smell.0.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as err:
        load_imagebind_weights(make_model(), state)
    assert "modality_trunks.audio.blocks.0.attn.bias_k" in str(err.value)
    assert "modality_heads.smell.0.weight" in str(err.value)

    state = dict(make_model(seed=1).state_dict())
    state["modality_heads.vision.2.weight"] = torch.zeros(5, 5)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_imagebind_weights(make_model(), state)

    state = dict(make_model(seed=1).state_dict())
    state["image_bind.modality_heads.vision.2.weight"] = state["modality_heads.vision.2.weight"]
    with pytest.raises(CheckpointError, match="already provided"):
        load_imagebind_weights(make_model(), state)


def test_checkpoint_without_point_branch_needs_consent():
    source = make_model(seed=1)
    huge = {k: v for k, v in source.state_dict().items() if not k.startswith(POINT_PREFIXES)}
    with pytest.raises(CheckpointError, match="point_trunk.pc_projection.*require_point=False"):
        load_imagebind_weights(make_model(), huge)

    partial = dict(huge, **{"point_trunk.pc_projection": source.point_trunk.pc_projection})
    with pytest.raises(CheckpointError, match="missing keys"):
        load_imagebind_weights(make_model(), partial, require_point=False)

    with torch.device("meta"):
        model = ImageBind(TINY_A)
    skipped = load_imagebind_weights(model, huge, require_point=False)
    assert "point_trunk.pc_projection" in skipped
    assert not any(t.is_meta for t in model.state_dict().values())
    model.eval()
    torch.testing.assert_close(model("audio", random_input(TINY_A, "audio")),
                               source("audio", random_input(TINY_A, "audio")), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="no point encoder"):
        model("point", random_input(TINY_A, "point"))


# ----------------------------------------------------------------------------------------------------------
# Parity with the reference


@pytest.mark.skipif(not (FIXTURE / "config.json").is_file(), reason=f"parity fixture not found at {FIXTURE}")
def test_parity_with_reference_fixture():
    from ibllm import parity

    results = parity.run(FIXTURE, only="encoders")
    names = {r.name for r in results}
    for m in ("vision", "video", "text", "audio", "depth", "thermal", "imu", "point"):
        assert {f"emb.{m}", f"emb_prenorm.{m}", f"emb_normalized.{m}"} <= names
    assert {"point.fps_idx", "point.group_idx_sorted", "point.pc_embed", "e2e.point_npy", "e2e.audio_wav"} <= names
    failed = [f"{r.name}: {r.max_abs_diff:.3e} > {r.tol:.0e}" for r in results if not r.ok]
    assert not failed, failed
    # Well inside the tolerance: float32 rounding only.
    assert max(r.max_abs_diff for r in results) < 2e-5
