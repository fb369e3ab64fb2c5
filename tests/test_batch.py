"""``python -m ibllm batch``: a real run of the default model over the toy example files.

Several requests decode together (the engine's batch is watched while the run goes), a broken line and an unusable
file are recorded and the rest answered, a second run skips what is done, and every answer is the one the chat gives
for the same request on its own (greedy).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ibllm.batch import recorded, run_batch
from ibllm.config import GenerationConfig
from ibllm.types import Attachment, Turn
from tests.app_helpers import TOY

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    from ibllm import create_engine

    engine = create_engine(max_batch=4)
    yield engine
    engine.close()


def gallery() -> list[dict[str, Any]]:
    return json.loads((TOY / "gallery.json").read_text())["examples"]


def write_requests(folder: Path) -> Path:
    """The gallery's questions as batch lines (files copied beside the requests file, referred to by relative
    path), plus a follow-up with history, a broken line and a missing file."""
    lines = []
    for example in gallery():
        inputs = []
        for f in example["files"]:
            shutil.copy(TOY / f["path"], folder / f["path"])
            inputs.append({"path": f["path"], "modality": f["modality"], "weight": f["weight"]})
        lines.append(json.dumps({"id": example["name"], "question": example["question"], "inputs": inputs,
                                 "generation": {"temperature": 0, "max_new_tokens": 24}}))
    lines.insert(3, '{"id": "broken", "question": "What')  # cut mid-line
    lines.append(json.dumps({"id": "follow_up", "question": "What shape is it?", "inputs": ["red_cube_image.png"],
                             "history": [{"user": "What colour is it?", "assistant": "It is red."}]}))
    lines.append(json.dumps({"id": "missing", "question": "What is it?", "inputs": ["nowhere.png"]}))
    lines.append(json.dumps({"id": "bad_setting", "question": "Hi", "generation": {"top_p": 3}}))
    path = folder / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def records(path: Path) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def alone(engine: Any, folder: Path, example: dict[str, Any]) -> str:
    attachments = [Attachment(str(folder / f["path"]), f["modality"], f["weight"]) for f in example["files"]]
    return engine.answer(example["question"], attachments=attachments,
                         generation=GenerationConfig(temperature=0.0, max_new_tokens=24))


def test_a_run_answers_every_good_line_as_the_chat_does_and_records_the_bad_ones(engine, tmp_path):
    requests = write_requests(tmp_path)
    out = tmp_path / "out" / "answers.jsonl"
    live: list[int] = []
    handle = engine.net.llama.register_forward_pre_hook(lambda *_: live.append(engine.scheduler.batch.live))
    try:
        report = run_batch(engine, requests, out, progress=False)
    finally:
        handle.remove()
    examples = gallery()
    assert (report.answered, report.failed, report.skipped) == (len(examples) + 1, 3, 0)
    assert max(live) >= 2, "the requests never decoded together"
    got = records(out)
    for example in examples:
        assert got[example["name"]]["answer"] == alone(engine, tmp_path, example), example["name"]
        assert got[example["name"]]["completion_tokens"] > 0
    assert got["follow_up"]["answer"] == engine.answer(
        "What shape is it?", history=[Turn("What colour is it?", "It is red.")],
        attachments=[Attachment(str(tmp_path / "red_cube_image.png"), "image")])
    assert got["line 4"]["error"].startswith("not JSON") and got["line 4"]["line"] == 4
    assert "nowhere.png" in got["missing"]["error"] and "not found" in got["missing"]["error"]
    assert "top_p" in got["bad_setting"]["error"]


def test_a_second_run_skips_what_is_done_and_resumes_what_is_not(engine, tmp_path):
    requests = write_requests(tmp_path)
    out = tmp_path / "answers.jsonl"
    first = run_batch(engine, requests, out, progress=False)
    lines = out.read_text().splitlines()
    again = run_batch(engine, requests, out, progress=False)
    assert (again.answered, again.failed, again.skipped) == (0, 0, first.answered + first.failed)
    assert out.read_text().splitlines() == lines

    # An interrupted run: one answer never written, the last line cut mid-write.
    kept = [line for line in lines if json.loads(line)["id"] != "pyramid"]
    out.write_text("\n".join(kept[:-1]) + "\n" + kept[-1][:10])
    cut_id = json.loads(kept[-1])["id"]
    resumed = run_batch(engine, requests, out, progress=False)
    redone = {"pyramid", cut_id}
    assert resumed.skipped == first.answered + first.failed - len(redone)
    assert resumed.answered + resumed.failed == len(redone)
    assert parsed(out.read_text().splitlines()) == parsed(lines)  # the same ids with the same answers
    assert recorded(out) >= redone

    retried = run_batch(engine, requests, out, retry_failed=True, progress=False)
    assert retried.failed == 3 and retried.answered == 0


def parsed(lines: list[str]) -> dict[str, Any]:
    """id -> answer or error of the lines that parse (a line cut mid-write does not)."""
    out = {}
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        out[record["id"]] = record.get("answer", record.get("error"))
    return out


def test_the_command_line(tmp_path, capsys):
    from ibllm.cli import main

    requests = tmp_path / "requests.jsonl"
    shutil.copy(TOY / "pyramid_point.ply", tmp_path)
    requests.write_text(json.dumps({"id": "p", "question": "What shape is it?", "inputs": ["pyramid_point.ply"]})
                        + "\nnot json\n")
    out = tmp_path / "answers.jsonl"
    assert main(["batch", str(requests), "--out", str(out), "--max-batch", "2"]) == 1  # one line failed
    got = records(out)
    assert "pyramid" in got["p"]["answer"] and "not JSON" in got["line 2"]["error"]
    assert "1 answered, 1 failed, 0 skipped" in capsys.readouterr().err
    assert main(["batch", str(tmp_path / "none.jsonl"), "--out", str(out)]) == 2
