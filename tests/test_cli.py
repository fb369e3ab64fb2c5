"""The command line as a user runs it: every command of ``python -m ibllm``."""

from __future__ import annotations

import json
import subprocess
import sys

import faiss
import numpy as np
import torch

from ibllm.cache import VisualCache
from ibllm.doctor import run_checks
from ibllm.parity import Fixture
from tests.conftest import REPO
from tests.official_layout import write_official_files

EXAMPLES = REPO / "examples" / "toy"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ibllm", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_generate_streams_an_answer_for_a_mix():
    result = run_cli("generate", "--image", str(EXAMPLES / "red_cube_image.png"),
                     "--audio", f"{EXAMPLES / 'bell_torus_audio.wav'}@0.5", "--max-new-tokens", "6",
                     "--temperature", "0", "What is it?")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "no answer text on stdout"
    assert "prefill" in result.stderr and "decode" in result.stderr  # the timing line


def test_generate_reports_a_broken_file_without_traceback(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    result = run_cli("generate", "--image", str(broken), "What is it?")
    assert result.returncode == 2
    assert "broken.png" in result.stderr and "Traceback" not in result.stderr


def test_doctor_accepts_a_complete_setup_and_warns_about_plain_llama(parity_dir, tmp_path):
    fx = Fixture(parity_dir)
    files = write_official_files(fx, tmp_path)
    checks = list(run_checks(str(files["llama_dir"]), str(files["adapter"]), str(files["imagebind"]),
                             str(files["knn_index"]), imagebind_config=fx.config.imagebind))
    levels = {c.what: c.level for c in checks}
    assert all(level != "FAIL" for level in levels.values()), checks
    assert levels["base LLaMA version"] == "warn"  # no 7B_chinese marker


def test_doctor_names_what_is_missing(tmp_path):
    result = run_cli("doctor", "--llama-dir", str(tmp_path), "--adapter", str(tmp_path / "7B.pth"))
    assert result.returncode == 1
    assert "params.json" in result.stdout and "7B.pth" in result.stdout


def test_merge_chinese_writes_the_sum_in_half_precision(tmp_path):
    params = {"dim": 8, "n_layers": 1, "n_heads": 2, "multiple_of": 8, "norm_eps": 1e-6, "vocab_size": -1}
    gen = torch.Generator().manual_seed(0)
    base = {"tok_embeddings.weight": torch.randn(5, 8, generator=gen), "norm.weight": torch.ones(8)}
    delta = {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in base.items()}
    for name, state in (("7B", base), ("delta", delta)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "params.json").write_text(json.dumps(params))
        torch.save({k: v.half() for k, v in state.items()}, tmp_path / name / "consolidated.00.pth")
    result = run_cli("merge-chinese", "--llama-dir", str(tmp_path / "7B"), "--delta-dir", str(tmp_path / "delta"),
                     "--out", str(tmp_path / "7B_chinese"))
    assert result.returncode == 0, result.stderr
    merged = torch.load(tmp_path / "7B_chinese" / "consolidated.00.pth", weights_only=True)
    for k in base:
        assert merged[k].dtype == torch.float16
        torch.testing.assert_close(merged[k], (base[k].half().float() + delta[k].half().float()).half())
    assert json.loads((tmp_path / "7B_chinese" / "params.json").read_text()) == params
    # a delta of another model is refused with a message, not a traceback
    torch.save({"other.weight": torch.zeros(2)}, tmp_path / "delta" / "consolidated.00.pth")
    result = run_cli("merge-chinese", "--llama-dir", str(tmp_path / "7B"), "--delta-dir", str(tmp_path / "delta"),
                     "--out", str(tmp_path / "bad"))
    assert result.returncode == 2 and "does not match" in result.stderr and "Traceback" not in result.stderr


def test_build_cache_from_images_and_from_an_index(tmp_path):
    images = tmp_path / "photos"
    images.mkdir()
    for name in ("red_cube_image.png", "purple_sphere_image.png", "green_spheres_image.png"):
        (images / name).write_bytes((EXAMPLES / name).read_bytes())
    (images / "red_cube_image.txt").write_text("a red cube\n")
    result = run_cli("build-cache", "--images", str(images), "--out", str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    cache = VisualCache.load(tmp_path / "cache")
    assert len(cache) == 3 and cache.dim == 128  # the embedded model's embedding width
    found = cache.search(cache.vectors(np.array([[1]]))[0], 1)  # an entry is its own nearest neighbour
    assert int(found.rows[0][0]) == 1
    assert sorted(c for c in cache.captions) == sorted(["a red cube", "purple_sphere_image", "green_spheres_image"])
    index = faiss.IndexFlatIP(16)
    index.add(np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32))
    faiss.write_index(index, str(tmp_path / "knn.index"))
    result = run_cli("build-cache", "--from-index", str(tmp_path / "knn.index"), "--out", str(tmp_path / "hnsw"))
    assert result.returncode == 0, result.stderr
    hnsw = VisualCache.load(tmp_path / "hnsw")
    assert hnsw.kind == "hnsw" and len(hnsw) == 300
