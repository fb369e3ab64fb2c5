from __future__ import annotations

import os
from pathlib import Path

# The tests write media with PyAV. Its FFmpeg must be loaded before decord's bundled one (which ibllm.media loads
# at import): the other way round PyAV cannot open libvpx (measured: avcodec_open2 returns EINVAL).
import av  # noqa: F401  (imported for its side effect, first)
import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
PARITY_A = REPO.parent / "shared" / "fixtures" / "parity-a"


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    if not (PARITY_A / "config.json").is_file():
        pytest.skip(f"parity fixture not found at {PARITY_A} (it ships in ../shared beside the repository)")
    return PARITY_A


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_unclip(tmp_path_factory) -> Path:
    """A tiny randomly initialised Stable unCLIP pipeline for the embedded model's embedding width, written as a
    diffusers folder (save_pretrained), so tests load it through the same path as the real one."""
    from ibllm.config import ModelConfig
    from ibllm.unclip_random import write_random_unclip

    width = ModelConfig.load(REPO / "assets" / "toy" / "config.json").imagebind.out_embed_dim
    return write_random_unclip(tmp_path_factory.mktemp("unclip") / "tiny", embed_dim=width)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The loading-memory rules measure a child process's peak RSS. Late in a long session the same child, on the
    # same files, measured 0.25-0.3 GB more (twice, reproducibly; alone it passes every time; not the environment it
    # inherits, not memory pressure: cause not found), so they run first, in the conditions a user's load has.
    first = [item for item in items if "test_peak_memory_while_loading" in item.nodeid]
    items[:] = first + [item for item in items if item not in first]
