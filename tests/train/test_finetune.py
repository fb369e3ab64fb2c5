"""Fine-tuning on your own pairs (ibllm/train/finetune.py): real toy-world image files, the real toy model, the
real command; the adapter it writes is then served through the normal factory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ibllm.factory import create_engine, load_official
from ibllm.parity import Fixture
from ibllm.train import toyworld as tw
from ibllm.train.__main__ import main as train_main
from ibllm.train.finetune import DataError, finetune, read_pairs
from ibllm.types import Attachment
from tests.conftest import REPO
from tests.official_layout import write_official_files

QUESTION = "What shape is it?"
NEW_WORD = "It is a blok."


def _scene(shape: str, seed: int, rng: np.random.Generator) -> tw.Scene:
    return tw.Scene(shape=shape, colour=str(rng.choice(list(tw.COLOURS))), size=str(rng.choice(tw.SIZES)),
                    position=str(rng.choice(tw.POSITIONS)), count=1, motion="still", seed=seed)


def write_pairs(root: Path, n: int, seed: int = 0) -> Path:
    """n image pairs, every other one a cube answered with the new word, the rest their true shape."""
    rng = np.random.default_rng(seed)
    others = [s for s in tw.SHAPES if s != "cube"]
    lines = []
    for i in range(n):
        scene = _scene("cube" if i % 2 == 0 else str(rng.choice(others)), 1000 + i, rng)
        path = tw.write_scene(scene, root, ["image"], stem=f"pair{i}")["image"]
        answer = NEW_WORD if scene.shape == "cube" else tw.answer_for(scene, "shape")
        lines.append(json.dumps({"image": path.name, "question": QUESTION, "answer": answer}))
    data = root / "pairs.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data


def _ask(engine, path: Path) -> str:
    return "".join(event.delta for event in engine.chat(QUESTION, attachments=[Attachment(str(path), "image")]))


# ----------------------------------------------------------------------------------------------------------
# The pairs file


@pytest.mark.parametrize("line, expected", [
    ('{"image": "gone.png", "question": "q", "answer": "a"}', "line 2: file not found"),
    ('{"files": ["ok.png"], "audio": 3, "question": "q", "answer": "a"}', "line 2: a file is a path string, got 3"),
    ('{"files": [{"path": "ok.png", "modality": "smell"}], "question": "q", "answer": "a"}',
     "line 2: unknown modality 'smell'; accepted: image, video"),
    ('{"image": "ok.png", "question": "q"', "line 2: not valid JSON"),
    ('{"image": "ok.png", "question": "q"}', "line 2: 'answer' must be a non-empty string"),
    ('{"image": "ok.png", "question": "q", "anwser": "a"}', "line 2: unknown keys ['anwser']"),
])
def test_a_bad_line_is_named(tmp_path, line, expected):
    tw.write_scene(_scene("cube", 1, np.random.default_rng(0)), tmp_path, ["image"], stem="x")["image"].rename(
        tmp_path / "ok.png")
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"image": "ok.png", "question": "q", "answer": "a"}\n' + line + "\n")
    with pytest.raises(DataError) as err:
        read_pairs(data)
    assert f"{data}, {expected}" in str(err.value)


def test_every_bad_line_is_named_and_good_files_are_not_encoded_again(tmp_path):
    """A file that only its decoder can tell is broken fails while encoding, before any training; the rerun after
    the fix encodes only the fixed file."""
    data = write_pairs(tmp_path, 4)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG signature, then nothing
    lines = data.read_text().splitlines()
    lines[1] = lines[1].replace("pair1_image.png", "broken.png")
    data.write_text("\n".join([*lines, '{"image": "missing.png", "question": "q", "answer": "a"}']) + "\n")
    with pytest.raises(DataError, match="line 5: file not found"):
        finetune(data, tmp_path / "run", steps=1, show=False)
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"line 2: broken\.png"):
        finetune(data, tmp_path / "run", steps=1, show=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    data.write_text("\n".join(lines).replace("broken.png", "pair1_image.png") + "\n")
    report = finetune(data, tmp_path / "run", steps=1, batch=2, show=False)
    assert (report["encoded_files"], report["reused_files"], report["finished"]) == (1, 3, True)


def test_pairs_accept_every_way_of_naming_files(tmp_path):
    files = tw.write_scene(_scene("cone", 5, np.random.default_rng(0)), tmp_path / "media", ["image", "audio", "point"])
    lines = [
        {"image": "media/image.png", "question": "q", "answer": "a"},
        {"files": ["media/audio.wav", {"path": "media/image.png", "modality": "thermal", "weight": 0.5}],
         "point": ["media/point.ply"], "question": "q", "answer": "a"},
        {"question": "Say hello.", "answer": "Hello."},
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    pairs = read_pairs(tmp_path / "pairs.jsonl")
    assert [p.line for p in pairs] == [1, 2, 3]
    assert pairs[0].attachments == (Attachment(str(files["image"].resolve()), "image"),)
    assert [(Path(a.path).name, a.modality, a.weight) for a in pairs[1].attachments] == [
        ("audio.wav", "audio", 1.0), ("image.png", "thermal", 0.5), ("point.ply", "point", 1.0)]
    assert pairs[2].attachments == ()


# ----------------------------------------------------------------------------------------------------------
# End to end on the toy model


def test_teaches_a_new_word_for_one_shape(tmp_path):
    data = write_pairs(tmp_path / "data", 24)
    out = tmp_path / "run"
    # 60 steps: 20 passes over the pairs, to a converged validation loss (at 30 the cube's word still spread to a
    # held-out cylinder that the base model places near cubes).
    args = ["finetune", "--data", str(data), "--out", str(out), "--steps", "60", "--save-every", "10",
            "--eval-every", "10", "--threads", "1"]

    # Interrupted after 12 steps: a checkpoint and no adapter yet; the rerun continues from it without re-encoding.
    assert train_main([*args, "--stop-after", "12"]) == 0
    first = json.loads((out / "report.json").read_text())
    assert (first["finished"], first["steps_done"], first["encoded_files"]) == (False, 12, 24)
    assert (out / "checkpoint.pt").is_file() and not (out / "adapter.pth").exists()
    assert train_main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert (report["finished"], report["resumed_from"], report["steps_done"]) == (True, 12, 60)
    assert (report["encoded_files"], report["reused_files"]) == (0, 24)
    assert report["val_pairs"] == 2
    val = dict((step, loss) for step, loss in report["val_loss"])
    assert sorted(val) == [0, 10, 20, 30, 40, 50, 60]
    assert val[60] < 0.5 * val[0]

    # The adapter in 7B.pth's layout: the bind network, prefix queries and gates as they were, LoRA trained.
    adapter = torch.load(out / "adapter.pth", map_location="cpu", weights_only=True)["model"]
    base = create_engine(max_batch=1)
    official = base.net.to_official()
    for key in ("image_bind_f1_1.weight", "prefix_query.weight", "llama.layers.3.attention.gate"):
        torch.testing.assert_close(adapter[key], official[key], rtol=0, atol=0)
    assert not any(k.startswith("image_bind.") for k in adapter)
    assert "llama.layers.0.attention.lora_wq_l1.weight" in adapter and "llama.norm.weight" in adapter

    # Held-out images (seeds never trained on): cubes the base model recognises now get the new word; shapes it
    # names correctly keep their names.
    rng = np.random.default_rng(7)
    held = {}
    for i, shape in enumerate(["cube", "sphere", "cube", "cone", "cube", "torus", "cube", "cylinder"]):
        path = tw.write_scene(_scene(shape, 50_000 + i, rng), tmp_path / "held", ["image"], stem=f"h{i}")["image"]
        held[path] = shape
    before = {path: _ask(base, path) for path in held}
    base.close()
    tuned = create_engine(adapter=str(out / "adapter.pth"), max_batch=1)
    after = {path: _ask(tuned, path) for path in held}
    tuned.close()
    cubes = [p for p, shape in held.items() if shape == "cube" and "cube" in before[p]]
    others = [p for p, shape in held.items() if shape != "cube" and shape in before[p]]
    assert len(cubes) >= 2 and len(others) >= 2, before
    for path in cubes:
        assert "blok" in after[path], (path.name, after[path])
    for path in others:
        assert "blok" not in after[path] and held[path] in after[path], (path.name, after[path])
    assert not any("blok" in text for text in before.values())


def test_a_changed_setting_is_refused_and_a_finished_run_is_kept(tmp_path, capsys):
    data = write_pairs(tmp_path / "data", 4)
    out = tmp_path / "run"
    kwargs = dict(steps=2, batch=2, val_fraction=0.0, show=False)
    finetune(data, out, **kwargs)
    written = (out / "adapter.pth").stat().st_mtime_ns
    assert train_main(["finetune", "--data", str(data), "--out", str(out), "--steps", "3", "--batch", "2",
                       "--val-fraction", "0"]) == 2
    assert "steps: 2 -> 3" in capsys.readouterr().err
    finetune(data, out, **kwargs)  # the same command again: nothing to do
    assert (out / "adapter.pth").stat().st_mtime_ns == written


def test_fine_tunes_the_official_layout(parity_dir, tmp_path):
    """--from 7B.pth over a Meta-format LLaMA folder (parity-a's tiny weights in the official files); the new
    adapter loads through the official loader, strictly."""
    fx = Fixture(parity_dir)
    files = write_official_files(fx, tmp_path / "official")
    data = write_pairs(tmp_path / "data", 4)
    report = finetune(data, tmp_path / "run", base=str(files["adapter"]), steps=3, batch=2, val_fraction=0.25,
                      show=False, llama_dir=str(files["llama_dir"]), imagebind=str(files["imagebind"]),
                      dtype="float32", max_seq_len=fx.config.llama.max_seq_len, imagebind_config=fx.config.imagebind)
    assert report["finished"] and report["settings"]["lr"] == 1.25e-4
    engines = [load_official(files["llama_dir"], adapter=adapter, imagebind=files["imagebind"], use_cache=False,
                             imagebind_config=fx.config.imagebind, max_seq_len=fx.config.llama.max_seq_len,
                             device="cpu", dtype="float32", merge_lora=False, max_batch=1)
               for adapter in (files["adapter"], tmp_path / "run" / "adapter.pth")]
    old, new = (e.net.state_dict() for e in engines)
    for e in engines:
        e.close()
    lora = "llama.layers.0.attention.lora_wq_l2.weight"
    assert not torch.equal(old[lora], new[lora])
    torch.testing.assert_close(old["bind.proj.weight"], new["bind.proj.weight"], rtol=0, atol=0)


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    """Data-parallel over two CPU processes (gloo) takes the same steps as one process with the whole batch."""
    data = write_pairs(tmp_path / "data", 12)
    args = ["--data", str(data), "--steps", "6", "--batch", "4", "--threads", "1", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "ibllm.train", "finetune", *args, "--out", str(tmp_path / "two")],
                   check=True, env=env, cwd=REPO, capture_output=True, timeout=300)
    assert train_main(["finetune", *args, "--out", str(tmp_path / "one")]) == 0
    one, two = (torch.load(tmp_path / d / "adapter.pth", weights_only=True)["model"] for d in ("one", "two"))
    assert set(one) == set(two)
    base = create_engine(max_batch=1, merge_lora=False)
    lora = "llama.layers.0.attention.lora_wq_l2.weight"
    assert (one[lora] - base.net.to_official()[lora]).abs().max() > 1e-3  # it trained
    base.close()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-4)
