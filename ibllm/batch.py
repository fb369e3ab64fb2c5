"""Batch runs: ``python -m ibllm batch requests.jsonl --out answers.jsonl``.

Each line of the requests file is one question (JSON)::

    {"id": "q1", "question": "What shape is it?",
     "inputs": [{"path": "scan.ply", "modality": "point", "weight": 1.0}, "photo.png"],
     "history": [{"user": "Hello", "assistant": "Hello! Attach a file and ask."}],
     "generation": {"max_new_tokens": 32, "temperature": 0, "top_p": 0.75, "seed": 1},
     "visual_cache": {"enabled": true, "top_k": 10, "temperature": 20.0, "weight": 0.5}}

Only ``id`` and a question or an input are needed: an input may be a bare path, its modality is detected when not
given, its weight is 1 by default; relative paths are read from the requests file's folder. Generation and visual
cache settings default to the model's own. Other fields are errors (a misspelt "qestion" must not pass unseen).

The answers file gets one line per request as it is answered (in the order answers finish):
``{"id", "answer", "prompt_tokens", "completion_tokens", "notes"}``, or ``{"id", "line", "error"}`` for a line that
failed (a broken line, a missing or unusable file, a bad setting); the run goes on. Running it again skips the ids
already in the answers file (``retry_failed``: all but those that failed), so an interrupted run resumes.

Requests run on a few threads at once, so several answers decode together in the engine's batch (its decode slots,
``--max-batch``) while the next requests' files are encoded.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ibllm.bind import is_mix_weight
from ibllm.config import GenerationConfig, VisualCacheConfig, with_settings
from ibllm.engine import ChatEngine
from ibllm.media.errors import MediaError
from ibllm.types import Attachment, Turn

KEYS = ("id", "question", "inputs", "history", "generation", "visual_cache")


@dataclass(frozen=True)
class BatchRequest:
    """One line of a requests file, checked: what ``ChatEngine.chat`` is asked."""

    id: str
    question: str
    attachments: tuple[Attachment, ...] = ()
    history: tuple[Turn, ...] = ()
    generation: GenerationConfig | None = None
    visual_cache: VisualCacheConfig | None = None


@dataclass
class BatchReport:
    """How a run went: lines answered now, failed now, skipped (answered by an earlier run)."""

    answered: int = 0
    failed: int = 0
    skipped: int = 0


def _attachment(item: Any, base: Path, engine: ChatEngine) -> Attachment:
    spec = {"path": item} if isinstance(item, str) else item
    if not isinstance(spec, Mapping) or not isinstance(spec.get("path"), str) or set(spec) - {"path", "modality",
                                                                                            "weight"}:
        raise ValueError(f'an input is a path or {{"path", "modality", "weight"}}, got {json.dumps(item)[:80]}')
    path = Path(spec["path"]).expanduser()
    path = str(path if path.is_absolute() else base / path)
    weight = spec.get("weight", 1.0)
    if not is_mix_weight(weight):
        raise ValueError(f"{spec['path']}: weight must be a finite number >= 0, got {weight!r}")
    modality = spec.get("modality") or engine.detect(path)
    return Attachment(path, str(modality), float(weight))


def _turn(item: Any) -> Turn:
    if isinstance(item, Mapping) and set(item) == {"user", "assistant"}:
        user, assistant = item["user"], item["assistant"]
    elif isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2:
        user, assistant = item
    else:
        raise ValueError(f'a history turn is {{"user": ..., "assistant": ...}} or [user, assistant], '
                         f"got {json.dumps(item)[:80]}")
    if not isinstance(user, str) or not isinstance(assistant, str):
        raise ValueError("history turns hold text")
    return Turn(user, assistant)


def parse_request(value: Mapping[str, Any], base: Path, engine: ChatEngine) -> BatchRequest:
    """A request from one parsed line; ValueError (or MediaError) says what is wrong with it."""
    unknown = set(value) - set(KEYS)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(KEYS)}")
    question = value.get("question", "")
    if not isinstance(question, str):
        raise ValueError("question must be a string")
    inputs = value.get("inputs") or []
    if not isinstance(inputs, list):
        raise ValueError("inputs must be a list")
    history = value.get("history") or []
    if not isinstance(history, list):
        raise ValueError("history must be a list of turns")
    attachments = tuple(_attachment(item, base, engine) for item in inputs)
    if not question.strip() and not attachments:
        raise ValueError("nothing to answer: give a question or an input")
    return BatchRequest(
        id=str(value["id"]), question=question, attachments=attachments, history=tuple(_turn(t) for t in history),
        generation=with_settings(engine.cfg.generation, value.get("generation"), "generation"),
        visual_cache=with_settings(engine.cfg.visual_cache, value.get("visual_cache"), "visual_cache"))


def recorded(out: Path, *, retry_failed: bool = False) -> set[str]:
    """Ids the answers file already holds (with ``retry_failed``: only those answered). Lines that do not parse
    (the last one of a run that was killed mid-write) are ignored: their request is answered again."""
    ids: set[str] = set()
    if not out.is_file():
        return ids
    with out.open(encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "id" in record and not (retry_failed and "error" in record):
                ids.add(str(record["id"]))
    return ids


def answer(engine: ChatEngine, request: BatchRequest) -> dict[str, Any]:
    """The answers-file record of one request (``ChatEngine.chat`` to the end)."""
    last = None
    for event in engine.chat(request.question, history=request.history, attachments=request.attachments,
                             visual_cache=request.visual_cache, generation=request.generation):
        last = event
    assert last is not None and last.done
    return {"id": request.id, "answer": last.text, "prompt_tokens": last.timings.prompt_tokens,
            "completion_tokens": last.timings.new_tokens, "notes": list(last.notes)}


def _parse_line(number: int, line: str) -> tuple[str, dict[str, Any] | None, str]:
    """(its id, the parsed line, "") or (its id or "line N", None, why the line is broken)."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        return f"line {number}", None, f"not JSON: {e}"
    if not isinstance(value, dict):
        return f"line {number}", None, "a line must be a JSON object"
    if value.get("id") in (None, ""):
        return f"line {number}", None, 'each line needs an "id"'
    return str(value["id"]), value, ""


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield number, line


def run_batch(engine: ChatEngine, requests: str | Path, out: str | Path, *, retry_failed: bool = False,
              workers: int | None = None, progress: bool = True) -> BatchReport:
    """Answer every request of ``requests`` not yet in ``out``, appending a record per line to ``out``.

    ``workers``: requests in progress at once (default: the engine's decode slots plus one, so a request's files
    are encoded while the others decode)."""
    requests, out = Path(requests), Path(out)
    base = requests.resolve().parent
    done = recorded(out, retry_failed=retry_failed)
    total = sum(1 for _ in _lines(requests))
    workers = workers or engine.scheduler.slots + 1
    report = BatchReport()
    lock = threading.Lock()
    bar = tqdm(total=total, unit="req", desc="batch", disable=not progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a+b") as raw:
        raw.seek(0, 2)
        if raw.tell():
            raw.seek(-1, 2)
            if raw.read(1) != b"\n":  # a run killed mid-line: start on a fresh line
                raw.write(b"\n")

        def write(record: dict[str, Any]) -> None:
            with lock:
                raw.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
                raw.flush()
                if "error" in record:
                    report.failed += 1
                else:
                    report.answered += 1
                bar.update(1)

        def attempt(number: int, value: Mapping[str, Any]) -> None:
            try:
                write(answer(engine, parse_request(value, base, engine)))
            except (ValueError, MediaError) as e:
                write({"id": str(value["id"]), "line": number, "error": str(e)})
            except Exception as e:  # noqa: BLE001 - one failed request is recorded; the run goes on
                write({"id": str(value["id"]), "line": number, "error": f"{type(e).__name__}: {e}"})

        seen: set[str] = set()
        pending: set[Future] = set()
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ibllm-batch") as pool:
            for number, line in _lines(requests):
                key, value, broken = _parse_line(number, line)
                if key in done:
                    report.skipped += 1
                    bar.update(1)
                elif broken:
                    write({"id": key, "line": number, "error": broken})
                elif key in seen:
                    write({"id": key, "line": number, "error": f"id {key!r} appears on an earlier line"})
                else:
                    seen.add(key)
                    if len(pending) >= 2 * workers:  # read ahead only a little: the requests file may be long
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for future in finished:
                            future.result()  # an answers file that cannot be written stops the run
                    pending.add(pool.submit(attempt, number, value))
            for future in wait(pending).done:
                future.result()
    bar.close()
    return report
