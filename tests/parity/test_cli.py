"""``python -m ibllm parity DIR`` as a user runs it: every group on parity-a, and a failing exit on a bad fixture."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import REPO


def run_parity(directory, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ibllm", "parity", str(directory), *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_parity_a_passes_every_group(parity_dir):
    result = run_parity(parity_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    done, total = int(last.split()[0]), int(last.split()[2])
    assert done == total and total >= 120, last
    for name in ("emb.point", "vision_png", "llama.logits_steps", "e2e.video_mp4_default5",
                 "e2e:gen.single_knn.greedy_tokens"):
        assert name in result.stdout


def test_preprocessing_parity(parity_dir):
    # Not marked slow: the loaders' rows alone take seconds. The command pins MKL's numerical path first.
    result = run_parity(parity_dir, "--only", "preprocessing")
    assert result.returncode == 0, result.stdout
    assert result.stdout.strip().splitlines()[-1] == "9 of 9 tensors within tolerance"


def test_a_wrong_expected_tensor_fails(parity_dir, tmp_path):
    for item in parity_dir.iterdir():
        (tmp_path / item.name).symlink_to(item)
    expected = load_file(parity_dir / "expected.safetensors")
    expected["e2e.vision_png"] = expected["e2e.vision_png"] + 1e-3
    (tmp_path / "expected.safetensors").unlink()
    save_file(expected, tmp_path / "expected.safetensors")
    result = run_parity(tmp_path, "--only", "end-to-end")
    assert result.returncode == 1
    assert "FAIL e2e.vision_png" in result.stdout


def test_a_fixture_whose_cloud_is_not_normalised(parity_dir, tmp_path):
    # Another fixture: the same cloud at radius 1.4 around an offset centroid. The reference fed it as it is; the
    # loader normalises it, as README documents. Both rows must pass and say which case applied.
    import numpy as np

    from ibllm.parity.fixture import Fixture, build_network

    for item in parity_dir.iterdir():
        if item.name not in ("preprocessing", "expected.safetensors"):
            (tmp_path / item.name).symlink_to(item)
    media = tmp_path / "preprocessing"
    media.mkdir()
    for item in (parity_dir / "preprocessing").iterdir():
        if item.name not in ("points.npy", "preprocessed.safetensors"):
            (media / item.name).symlink_to(item)
    raw = np.load(parity_dir / "preprocessing" / "points.npy") * 1.4 + np.array([0.3, -0.2, 0.5], np.float32)
    np.save(media / "points.npy", raw.astype(np.float32))
    pre = load_file(parity_dir / "preprocessing" / "preprocessed.safetensors")
    pre["point_npy"] = torch.from_numpy(raw.astype(np.float32))[None]  # the reference passes it through
    save_file(pre, media / "preprocessed.safetensors")
    expected = load_file(parity_dir / "expected.safetensors")
    net = build_network(Fixture(parity_dir))
    with torch.no_grad():  # the reference's embedding of the raw cloud (our encoder has parity with it)
        expected["e2e.point_npy"] = net.image_bind("point", pre["point_npy"],
                                                   fps_start=expected["e2e.point_npy.fps_idx"][:, 0])
    save_file(expected, tmp_path / "expected.safetensors")
    for group in ("preprocessing", "end-to-end"):
        result = run_parity(tmp_path, "--only", group)
        assert result.returncode == 0, result.stdout
        row = next(line for line in result.stdout.splitlines() if " e2e.point_npy " in line or
                   "preprocessing.point_npy" in line)
        radius = float(np.sqrt(((raw - raw.mean(axis=0)) ** 2).sum(axis=1)).max())
        offset = float(np.linalg.norm(raw.mean(axis=0)))
        assert f"not normalised (radius {radius:.3g} about a centroid {offset:.3g}" in row, row
