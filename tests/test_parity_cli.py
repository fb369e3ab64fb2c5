"""``python -m ibllm parity DIR`` as a user runs it: every group on parity-a, and a failing exit on a bad fixture."""

from __future__ import annotations

import subprocess
import sys

import pytest
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
