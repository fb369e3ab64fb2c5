"""The command line as a user runs it: ``python -m ibllm generate|doctor``."""

from __future__ import annotations

import subprocess
import sys

from ibllm.doctor import run_checks
from ibllm.parity import Fixture
from tests.conftest import REPO
from tests.test_factory import write_official_files

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
