"""The whole training pipeline on a handful of scenes for a few steps per stage: every stage runs, losses are
finite (and the language model's falls), checkpoints round-trip strictly through ``ImageBindLLM.load_official``,
the exported model loads with ``load_default`` and answers, and a rerun resumes instead of retraining."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from ibllm.checkpoint import read_state_dict
from ibllm.config import from_name
from ibllm.model import ImageBindLLM
from ibllm.train.data import load_tensor
from ibllm.train.pipeline import PRESETS, TRAINING_STAGES, Pipeline

pytestmark = pytest.mark.slow

SMOKE = PRESETS["smoke"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Pipeline, dict[str, Any]]:
    out = tmp_path_factory.mktemp("toyrun")
    pipe = Pipeline(out, SMOKE, show=False)
    report = pipe.run_all(evaluate=True)
    return out, pipe, report


def test_every_stage_ran_with_finite_losses(run: tuple[Path, Pipeline, dict[str, Any]]) -> None:
    out, pipe, report = run
    stages = report["stages"]
    for stage in ("data", "tokenizer", *TRAINING_STAGES, "embed", "export", "eval"):
        assert stage in stages, stage
    for stage in TRAINING_STAGES:
        assert math.isfinite(stages[stage]["loss_first"]) and math.isfinite(stages[stage]["loss_last"]), stage
        assert stages[stage]["trainable"] > 0
        assert (out / "ckpt" / f"{stage}.safetensors").is_file()
    # The one stage where a few steps must already help: a language model learning a tiny corpus.
    assert stages["lm"]["loss_last"] < 0.8 * stages["lm"]["loss_first"]
    assert set(stages["embed"]["retrieval"]) == {"text", "video", "audio", "depth", "thermal", "imu", "point"}
    size = pipe.cfg.imagebind.image_size  # training scenes carry one video clip each for the image-text stage
    assert load_tensor(out / "data", "train", "video", half=True).shape == (SMOKE.n_train, 1, 3, 2, size, size)


def test_trainable_sets_follow_the_reference(run: tuple[Path, Pipeline, dict[str, Any]]) -> None:
    out, pipe, _ = run
    before = read_state_dict(out / "ckpt" / "lm.safetensors")
    after1 = read_state_dict(out / "ckpt" / "stage1.safetensors")
    after2 = read_state_dict(out / "ckpt" / "stage2.safetensors")

    def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
        return {k for k in a if not torch.equal(a[k], b[k])}

    stage1 = changed(before, after1)
    assert stage1 and all(k.startswith(("image_bind_", "prefix_query")) or k.endswith(".attention.gate")
                          for k in stage1), sorted(stage1)[:5]
    stage2 = changed(after1, after2)
    assert stage2 and all(k.startswith("llama.") and (".lora_" in k or k.endswith((".bias", "norm.weight")))
                          for k in stage2), sorted(stage2)[:5]
    assert not any(k.startswith("image_bind.") for k in stage1 | stage2)  # encoders stay frozen


def test_checkpoints_round_trip_through_load_official(run: tuple[Path, Pipeline, dict[str, Any]]) -> None:
    out, pipe, _ = run
    for stage in TRAINING_STAGES:
        state = read_state_dict(out / "ckpt" / f"{stage}.safetensors")
        net = ImageBindLLM(pipe.cfg)
        assert net.load_official(state, what=stage) == []  # strict: nothing missing, nothing unexpected
        again = net.to_official()
        assert again.keys() == state.keys()
        assert all(torch.equal(again[k], state[k]) for k in state), stage
    final = read_state_dict(out / "ckpt" / f"{TRAINING_STAGES[-1]}.safetensors")
    live = pipe.net.to_official()
    assert all(torch.equal(live[k].cpu(), final[k]) for k in final)


def test_exported_model_loads_and_answers(run: tuple[Path, Pipeline, dict[str, Any]]) -> None:
    from ibllm.config import GenerationConfig
    from ibllm.factory import load_default
    from ibllm.types import Attachment

    out, _, _ = run
    model = out / "model"
    weights = read_state_dict(model / "model.safetensors")
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float16}
    engine = load_default(model)
    assert engine.info.trained and engine.info.cache_entries == SMOKE.n_train + SMOKE.n_extra
    # served at the run's cache weight (what the app's Cache tab starts at), not the preset's training mix
    assert engine.cfg.visual_cache.weight == SMOKE.served_cache_weight != from_name("toy").visual_cache.weight
    image = next((out / "data" / "heldout").rglob("image.png"))
    ask = dict(attachments=[Attachment(str(image), "image")], generation=GenerationConfig.greedy(8))
    answer = engine.answer("What colour is it?", **ask)
    assert engine.answer("What colour is it?", **ask) == answer  # greedy through the exported weights: repeatable
    assert len(engine.tokenizer.encode(answer, bos=False, eos=False)) <= 8 + 1  # the token budget is honoured
    thumbs = [n.thumbnail for n in engine.neighbours([Attachment(str(image), "image")])]
    assert thumbs and all(Path(t).is_file() for t in thumbs)
    assert (out / "eval.md").read_text().count("| image |") == 3  # every suite, per latent, questions naming it


def test_rerun_resumes_without_retraining(run: tuple[Path, Pipeline, dict[str, Any]]) -> None:
    out, _, _ = run
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "ckpt").glob("*.safetensors")}
    report = Pipeline(out, SMOKE, show=False).run_all(evaluate=True)
    assert all(report["stages"][s].get("resumed") for s in TRAINING_STAGES)
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (out / "ckpt").glob("*.safetensors")}


def test_eval_of_a_validation_split_reads_it_as_it_is(run: tuple[Path, Pipeline, dict[str, Any]],
                                                      tmp_path: Path) -> None:
    """``train eval --split train`` on a folder of validation scenes asks them and generates no held-out set."""
    from ibllm.train.__main__ import main

    out, _, _ = run
    val = tmp_path / "val"
    val.mkdir()
    (val / "train.jsonl").write_text((out / "data" / "train.jsonl").read_text())
    (val / "train").symlink_to(out / "data" / "train")
    md = tmp_path / "val.md"
    assert main(["eval", "--model", str(out / "model"), "--data", str(val), "--split", "train", "--part",
                 "validation", "--n", "2", "--threads", "1", "--md", str(md)]) == 0
    assert sorted(p.name for p in val.iterdir()) == ["train", "train.jsonl"]
    assert md.read_text().count("| image |") == 3


def test_language_from_moves_only_the_towers_it_centres(run: tuple[Path, Pipeline, dict[str, Any]],
                                                         tmp_path: Path) -> None:
    """``run --language-from MODEL``: every weight and the tokenizer of MODEL, then only the centring runs, and
    only the towers ``centre_steps`` names move."""
    moved = _moved_by(run, tmp_path, "--language-from", 'centre_steps={"text": 3}')
    assert moved and all(k.startswith("image_bind.modality_") and ".text." in k for k in moved), sorted(moved)[:5]


def _moved_by(run: tuple[Path, Pipeline, dict[str, Any]], tmp_path: Path, flag: str, setting: str) -> set[str]:
    """The weights a smoke run started with ``flag`` from the run's model (and ``--set setting``) changed; it
    must keep the model's tokenizer byte for byte and train nothing before the stage it starts at."""
    from ibllm.train.__main__ import main

    model = run[0] / "model"
    again = tmp_path / "again"
    assert main(["run", "--out", str(again), "--smoke", flag, str(model), "--no-eval", "--threads", "1",
                 "--set", setting]) == 0
    before = read_state_dict(model / "model.safetensors")
    after = read_state_dict(again / "model" / "model.safetensors")
    assert before.keys() == after.keys()
    assert (again / "model" / "tokenizer.model").read_bytes() == (model / "tokenizer.model").read_bytes()
    assert not (again / "ckpt" / "lm.safetensors").exists()  # the language model was not trained again
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_stage2_from_trains_only_what_stage_2_trains(run: tuple[Path, Pipeline, dict[str, Any]],
                                                     tmp_path: Path) -> None:
    """``run --stage2-from MODEL``: every weight and the tokenizer of MODEL, then stage 2 goes on from it (its
    LoRA, biases and norms move; nothing else) and, with ``centre_steps`` empty, no tower moves."""
    moved = _moved_by(run, tmp_path, "--stage2-from", "centre_steps={}")
    assert moved and all(not k.startswith("image_bind") and (".lora_" in k or "norm" in k or k.endswith(".bias"))
                         for k in moved), sorted(moved)[:5]
