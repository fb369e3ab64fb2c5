"""The toy world: deterministic, readable by standard decoders, and every latent visible where it should be."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from ibllm.media.open3d_reader import import_open3d
from ibllm.train import toyworld as tw
from ibllm.train.toyworld import Scene

SCENE = Scene("cube", "red", "large", "left", 1, "left", seed=7)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tw.write_scene(SCENE, tmp_path_factory.mktemp("scene"))


def test_same_scene_same_bytes(written: dict[str, Path], tmp_path: Path) -> None:
    again = tw.write_scene(SCENE, tmp_path / "again")
    assert set(again) == set(tw.MODALITIES)
    for m, path in written.items():
        assert path.read_bytes() == again[m].read_bytes(), m
    # Asking for fewer modalities must not change the ones asked for (each has its own random stream).
    alone = tw.write_scene(SCENE, tmp_path / "alone", ["audio", "thermal"])
    assert alone["audio"].read_bytes() == written["audio"].read_bytes()
    assert alone["thermal"].read_bytes() == written["thermal"].read_bytes()
    assert tw.sample_scenes(5, 3, "train") == tw.sample_scenes(5, 3, "train")
    assert tw.sample_scenes(5, 3, "train") != tw.sample_scenes(5, 4, "train")


def test_image_depth_thermal_decode(written: dict[str, Path]) -> None:
    image = Image.open(written["image"])
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (224, 224))
    depth = np.asarray(Image.open(written["depth"]))
    assert depth.dtype == np.uint16 and depth.shape == (224, 224)
    thermal = Image.open(written["thermal"])
    assert thermal.mode == "L" and thermal.size == (224, 224)
    rgb = np.asarray(image).astype(int)
    red = (rgb[..., 0] - rgb[..., 1]) > 60
    near = depth < 3000
    hot = np.asarray(thermal) > 120
    # The same object, in the same place, in all three maps (the image adds its motion trail).
    for mask in (red, near, hot):
        assert mask.sum() > 500
        assert np.argwhere(mask)[:, 1].mean() < 112  # on the left
    assert abs(np.argwhere(near)[:, 1].mean() - np.argwhere(hot)[:, 1].mean()) < 3
    assert np.median(depth[~near]) == pytest.approx(tw.DEPTH_BACKGROUND_MM, abs=5)


def test_video_decodes_and_moves(written: dict[str, Path]) -> None:
    import av

    with av.open(str(written["video"])) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert stream.codec_context.pix_fmt == "yuv420p"
    assert len(frames) == tw.VIDEO_FRAMES and frames[0].shape == (224, 224, 3)

    def red_x(frame: np.ndarray) -> float:
        f = frame.astype(int)
        return float(np.argwhere((f[..., 0] - f[..., 1]) > 60)[:, 1].mean())

    travel = red_x(frames[0]) - red_x(frames[-1])
    assert travel > 0.6 * tw.MOTION_PX  # moving left


def test_audio_points_imu_text_decode(written: dict[str, Path]) -> None:
    audio, rate = soundfile.read(written["audio"])
    assert rate == tw.AUDIO_RATE and audio.ndim == 1 and len(audio) == int(tw.AUDIO_SECONDS * tw.AUDIO_RATE)
    assert 0.05 < audio.std() < 0.5
    points = tw.read_ply(written["point"])
    assert points.shape == (tw.POINTS, 3) and points.dtype == np.float32
    assert np.linalg.norm(points, axis=1).max() == pytest.approx(1.0, abs=1e-5)
    assert np.abs(points.mean(axis=0)).max() < 1e-3
    imu = np.load(written["imu"], allow_pickle=False)
    assert imu.shape == (6, tw.IMU_SAMPLES) and imu.dtype == np.float32
    assert written["text"].read_text().strip() == "A large red cube on the left, moving left."


def test_ply_reads_in_open3d(written: dict[str, Path]) -> None:
    try:
        o3d = import_open3d()
    except ImportError as exc:
        pytest.skip(f"open3d is not importable here: {exc}")
    pts = np.asarray(o3d.io.read_point_cloud(str(written["point"])).points)
    np.testing.assert_allclose(pts, tw.read_ply(written["point"]), atol=1e-6)


def _nearest_centroid_accuracy(features: dict[str, list[np.ndarray]], n_fit: int) -> float:
    """Fit class centroids on the first n_fit examples of each class, score on the rest."""
    allx = np.concatenate([np.stack(v) for v in features.values()])
    mu, sd = allx.mean(0), allx.std(0) + 1e-9
    cents = {k: ((np.stack(v[:n_fit]) - mu) / sd).mean(0) for k, v in features.items()}
    right = total = 0
    for k, v in features.items():
        for x in v[n_fit:]:
            pred = min(cents, key=lambda c: np.sum(((x - mu) / sd - cents[c]) ** 2))
            right += pred == k
            total += 1
    return right / total


def _audio_features(x: np.ndarray) -> np.ndarray:
    """Spectral shape (log energy in log-spaced bands, like a mel filterbank) and rhythm (envelope periodicity)."""
    hop = 160  # 10 ms frames, as the audio loader's fbank
    frames = x[: len(x) // hop * hop].reshape(-1, hop)
    spectrum = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / tw.AUDIO_RATE)
    edges = np.geomspace(100, 8000, 25)
    bands = np.log([spectrum[(freqs >= lo) & (freqs < hi)].sum() + 1e-6 for lo, hi in
                    zip(edges[:-1], edges[1:], strict=True)])
    envelope = np.sqrt((frames**2).mean(1))
    envelope = (envelope - envelope.mean()) / (envelope.std() + 1e-9)
    lags = (17, 25, 33, 50, 120)  # 6 Hz tremolo, 4 knocks/s, 3 pulses/s, 2 sweeps/s, a bell every 1.2 s
    rhythm = [float(np.mean(envelope[:-lag] * envelope[lag:])) for lag in lags]
    return np.concatenate([bands - bands.max(), rhythm])


def test_audio_tells_shapes_and_sizes_apart() -> None:
    feats: dict[str, list[np.ndarray]] = {}
    for shape in tw.SHAPES:
        for size in tw.SIZES:
            feats[f"{shape}/{size}"] = [_audio_features(tw.render_audio(Scene(shape, "red", size, "centre", 1,
                                                                              "still", seed=s))) for s in range(4)]
    assert _nearest_centroid_accuracy(feats, 2) == 1.0
    # Size is pitch: the spectral centroid of a large object's sound is lower.
    def centroid(s: Scene) -> float:
        p = np.abs(np.fft.rfft(tw.render_audio(s))) ** 2
        return float((p * np.arange(len(p))).sum() / p.sum())
    for shape in tw.SHAPES:
        small, large = (Scene(shape, "red", z, "centre", 1, "still", seed=1) for z in ("small", "large"))
        assert centroid(large) < centroid(small), shape


def test_point_clouds_tell_shapes_apart() -> None:
    def features(p: np.ndarray) -> np.ndarray:
        radial = np.histogram(np.linalg.norm(p, axis=1), bins=10, range=(0, 1))[0] / len(p)
        return np.concatenate([radial, np.sort(np.linalg.eigvalsh(np.cov(p.T)))])

    feats = {shape: [features(tw.render_points(Scene(shape, "blue", "small", "centre", 1, "still", seed=s), 2048))
                     for s in range(5)] for shape in tw.SHAPES}
    assert _nearest_centroid_accuracy(feats, 2) == 1.0


def _imu_motion(imu: np.ndarray) -> str:
    """Read the motion back from a trace: spin from the gyro, direction from the integrated velocity."""
    if imu[5].mean() > 1.0:
        return "spinning"
    acc = imu[:3] - imu[:3].mean(axis=1, keepdims=True)  # gravity and bias out
    velocity = np.cumsum(acc, axis=1) / tw.IMU_RATE
    drift = velocity.mean(axis=1)
    axis = int(np.argmax(np.abs(drift)))
    if np.abs(drift[axis]) < 0.2:
        return "still"
    return {(0, True): "right", (0, False): "left", (2, True): "up", (2, False): "down"}.get(
        (axis, bool(drift[axis] > 0)), "?")


def test_imu_signatures_differ_by_motion() -> None:
    for motion in tw.MOTIONS:
        for seed in range(3):
            imu = tw.render_imu(Scene("sphere", "red", "small", "centre", 1, motion, seed=seed))
            assert _imu_motion(imu) == motion, (motion, seed)
            assert abs(np.median(imu[2]) - tw.GRAVITY) < 1.5  # gravity on z


def test_split_is_disjoint_and_covers_every_value() -> None:
    combos = tw.all_latent_combinations()
    held = {c for c in combos if tw.split_of(Scene(*c)) == "heldout"}
    assert 0.08 < len(held) / len(combos) < 0.25
    train = tw.sample_scenes(300, 0, "train")
    heldout = tw.sample_scenes(100, 0, "heldout")
    assert all(s.split == "train" for s in train) and all(s.split == "heldout" for s in heldout)
    assert not {s.key() for s in train} & {s.key() for s in heldout}
    train_combos = [c for c in combos if c not in held]
    for i, name in enumerate(tw.LATENTS):
        assert {c[i] for c in train_combos} == {c[i] for c in combos}, name


@pytest.mark.parametrize("modality", tw.MODALITIES)
def test_questions_only_ask_what_the_modality_carries(modality: str) -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        scene = tw.sample_scene(rng)
        items = tw.questions_for(modality, scene, rng, per_latent=2)
        assert {q["latent"] for q in items} == {*tw.CARRIES[modality], "describe"}
        for q in items:
            assert tw.answer_is_correct(q["answer"], q["expected"]), q
        answers = {q["latent"]: q["answer"].lower() for q in items}
        if "colour" in answers:
            assert scene.colour in answers["colour"]
        if "shape" in answers:
            assert scene.shape in answers["shape"]
        if "motion" in answers:
            assert tw.expected_words(scene, "motion")[0] in answers["motion"]
        describe = answers["describe"]
        for latent in ("colour", "shape", "size"):  # the caption names what is carried, and nothing else
            assert (str(getattr(scene, latent)) in describe) == (latent in tw.CARRIES[modality]), (latent, describe)


def test_position_and_motion_answers_cannot_pass_for_each_other() -> None:
    scene = Scene("cone", "green", "small", "left", 1, "right", seed=0)
    position = tw.answer_for(scene, "position")
    motion = tw.answer_for(scene, "motion")
    assert tw.answer_is_correct(position, tw.expected_words(scene, "position"))
    assert not tw.answer_is_correct(motion, tw.expected_words(scene, "position"))
    assert not tw.answer_is_correct(position, tw.expected_words(scene, "motion"))


def test_make_dataset_and_cli(tmp_path: Path) -> None:
    manifest = tw.make_dataset(tmp_path, 3, seed=1, split="heldout", modalities=("image", "imu", "text"),
                               progress=False)
    records = tw.read_manifest(manifest)
    assert len(records) == 3
    for rec in records:
        assert rec["split"] == "heldout" and rec["scene"].split == "heldout"
        assert set(rec["files"]) == {"image", "imu", "text"} and all(p.is_file() for p in rec["files"].values())
        assert rec["caption"] == rec["files"]["text"].read_text().strip()
        assert rec["qa"] and all(tw.answer_is_correct(q["answer"], q["expected"]) for q in rec["qa"])
    assert json.loads(manifest.read_text().splitlines()[0])["files"]["image"].endswith("image.png")
    assert tw.main(["--out", str(tmp_path / "cli"), "--n", "2", "--split", "train", "--modalities", "audio"]) == 0
    assert len((tmp_path / "cli" / "train.jsonl").read_text().splitlines()) == 2
