"""The UI's plain-Python pieces: history normalisation, weights, previews, gallery, command line. No server."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from ibllm.types import Turn
from ibllm.ui import previews
from ibllm.ui.gallery import DEFAULT_GALLERY, REAL_GALLERY, gallery_for, load_gallery
from ibllm.ui.history import ERROR_MARK, message_parts, normalise_history
from ibllm.ui.inputs import (
    RequestError,
    engine_attachments,
    modality_choices,
    parse_modalities,
    parse_weights,
    resolve_modality,
)
from ibllm.ui.settings import to_cache_options, to_generation_options


def test_history_from_browser_blocks():
    # what the browser sends: typed blocks, each file its own user message
    history = [
        {"role": "user", "content": [{"type": "file", "file": {"path": "/t/a.png", "mime_type": "image/png"}}]},
        {"role": "user", "content": [{"type": "text", "text": "what is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a cube"}]},
        {"role": "user", "content": [{"type": "text", "text": "colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}], "metadata": None},
    ]
    conv = normalise_history(history)
    assert conv.turns == [Turn("what is it?", "a cube"), Turn("colour?", "red")]
    assert conv.files == ["/t/a.png"]


def test_history_from_gradio_client_and_examples():
    # what gradio_client and example clicks leave: raw strings, {"path"} dicts, tuples, FileData-like objects
    class FileData:
        path = "/t/c.wav"

    history = [
        {"role": "user", "content": [{"path": "/t/a.png"}, "hello"]},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": ("/t/b.ply",)},
        {"role": "user", "content": [FileData(), "and now?"]},
        {"role": "assistant", "content": ["more"]},
        {"role": "user", "content": [{"path": "/t/a.png"}]},  # the same file again is one input
        {"role": "user", "content": "pending question"},  # not answered yet: not a turn
    ]
    conv = normalise_history(history)
    assert conv.turns == [Turn("hello", "hi"), Turn("and now?", "more")]
    assert conv.files == ["/t/a.png", "/t/b.ply", "/t/c.wav"]


def test_error_answers_and_notes_are_not_fed_back():
    history = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": f"{ERROR_MARK} bad file"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
        {"role": "assistant", "content": "timing details", "metadata": {"title": "timings"}},
    ]
    assert normalise_history(history).turns == [Turn("q2", "a2")]


def test_message_parts():
    assert message_parts({"text": " hi ", "files": ["/a.png", {"path": "/b.wav"}]}) == ("hi", ["/a.png", "/b.wav"])
    assert message_parts("just text") == ("just text", [])
    assert message_parts(None) == ("", [])


def test_weights_parsing_and_resolution():
    assert parse_weights("") == {}
    assert parse_weights('{"audio": 0.5, "a.png": 2}') == {"audio": 0.5, "a.png": 2.0}
    assert parse_weights("[1, 0]") == [1.0, 0.0]
    with pytest.raises(RequestError, match="JSON"):
        parse_weights("{audio: 1}")
    with pytest.raises(RequestError):
        parse_weights('{"audio": "loud"}')
    paths = ["/t/a.png", "/t/b.wav", "/t/c.ply"]
    modalities = {"/t/a.png": "image", "/t/b.wav": "audio", "/t/c.ply": "point"}
    # slider weights per path; API weights by modality, name or position win; 0 drops the input
    got = engine_attachments(paths, modalities, {"/t/a.png": 0.25, "/t/c.ply": 0.0}, {"audio": 0.5})
    assert [(a.path, a.modality, a.weight) for a in got] == [("/t/a.png", "image", 0.25), ("/t/b.wav", "audio", 0.5)]
    got = engine_attachments(paths, modalities, {}, [0, 1, 0.3])
    assert [(a.modality, a.weight) for a in got] == [("audio", 1.0), ("point", 0.3)]


def test_modality_choice():
    assert modality_choices("/t/x.png", "depth") == ["depth", "image", "thermal"]
    assert modality_choices("/t/x.wav", "audio") == ["audio"]
    assert resolve_modality(0, "/t/x.png", "image", {"/t/x.png": "thermal"}, {}) == "thermal"
    assert resolve_modality(0, "/t/x.png", "image", {}, parse_modalities('{"x.png": "depth"}')) == "depth"
    assert resolve_modality(0, "/t/x.png", "image", {}, parse_modalities('["depth"]')) == "depth"
    with pytest.raises(RequestError, match="cannot be read as audio"):
        resolve_modality(0, "/t/x.png", "image", {}, {"x.png": "audio"})


def test_options_conversion():
    c = to_cache_options(False, 7.0, 15.0, 1.5)
    assert (c.enabled, c.top_k, c.temperature, c.weight) == (False, 7, 15.0, 1.0)
    g = to_generation_options(32.0, 0.0, 0.9, -1)
    assert (g.max_new_tokens, g.temperature, g.top_p, g.seed) == (32, 0.0, 0.9, None)
    assert to_generation_options(32, 0.5, 0.9, 42.0).seed == 42


def test_the_ui_serves_the_models_own_defaults():
    from dataclasses import replace

    from ibllm import create_engine
    from ibllm.ui import build_demo

    engine = create_engine()
    # The shipped model's own settings (greedy, 48 tokens), not the reference demo's (0.1, 128).
    engine.cfg = replace(engine.cfg, generation=replace(engine.cfg.generation, max_new_tokens=37, top_p=0.6),
                         visual_cache=replace(engine.cfg.visual_cache, top_k=4, weight=0.3))
    sliders = {b.label: b.value for b in build_demo(engine, gallery=None).blocks.values()
               if isinstance(b, gr.Slider | gr.Checkbox)}
    assert sliders["Max new tokens"] == 37 and sliders["Top-p"] == 0.6
    assert sliders["Temperature"] == engine.cfg.generation.temperature
    assert sliders["Cache size (top-k neighbours)"] == 4 and sliders["Cache weight"] == 0.3
    assert sliders["Use the visual cache"] is engine.cfg.visual_cache.enabled


def test_point_cloud_preview_is_point_only_ply(tmp_path):
    pts = np.random.default_rng(0).normal(size=(300, 3)).astype(np.float32)
    (tmp_path / "cloud.xyz").write_text("\n".join(" ".join(f"{v:.5f}" for v in p) for p in pts))
    np.save(tmp_path / "cloud.npy", pts)
    for name in ("cloud.xyz", "cloud.npy"):
        p = previews.make_preview(str(tmp_path / name), "point")
        assert p.kind == "model3d", p.note
        data = Path(p.value).read_bytes()
        header, body = data.split(b"end_header\n", 1)
        assert b"element vertex 300" in header and b"element face" not in header
        rec = np.frombuffer(body, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("r", "u1"), ("g", "u1"),
                                         ("b", "u1")])
        xyz = np.stack([rec["x"], rec["y"], rec["z"]], axis=1)
        assert len(xyz) == 300 and np.linalg.norm(xyz, axis=1).max() == pytest.approx(1.0, abs=1e-5)


def test_map_imu_and_text_previews(tmp_path):
    depth = np.zeros((16, 16), np.uint16)
    depth[4:12, 4:12] = 1000
    depth[8:, :] += 3000
    Image.fromarray(depth).save(tmp_path / "d.png")
    p = previews.make_preview(str(tmp_path / "d.png"), "depth")
    with Image.open(p.value) as im:
        rgb = np.asarray(im)
    assert rgb.shape == (16, 16, 3) and (rgb[0, 0] == 0).all()  # no reading stays black
    np.save(tmp_path / "imu.npy", np.zeros((500, 6), np.float32))
    assert previews.make_preview(str(tmp_path / "imu.npy"), "imu").kind == "plot"
    (tmp_path / "t.txt").write_text("a red cube")
    assert previews.make_preview(str(tmp_path / "t.txt"), "text").value == "a red cube"
    # a file that cannot be previewed gets a note, never an exception
    np.save(tmp_path / "bad.npy", np.zeros((3,), np.float32))
    assert previews.make_preview(str(tmp_path / "bad.npy"), "imu").kind == "none"


def test_gallery_loading(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.wav").write_bytes(b"x")
    (tmp_path / "gallery.json").write_text(json.dumps({"examples": [
        {"files": [{"path": "a.png", "modality": "image"}, {"path": "b.wav", "modality": "audio"}],
         "question": "What shape is it?", "expect": ["cube"]},
        {"files": [{"path": "missing.png", "modality": "image"}], "question": "skipped"},
    ]}))
    (ex,) = load_gallery(tmp_path / "gallery.json")
    assert ex.label == "image + audio: What shape is it?" and ex.expected == ["cube"]
    assert ex.message() == {"text": "What shape is it?", "files": [str(tmp_path / "a.png"), str(tmp_path / "b.wav")]}
    assert load_gallery(tmp_path / "absent.json") == []


def test_real_gallery_files_load_with_the_7b_config():
    """examples/real is shown with the real weights: every file must load as the 7B model's ImageBind reads it."""
    from ibllm.config import from_name
    from ibllm.kinds import MEDIA_KINDS
    from ibllm.media import detect_modality, load_media

    entries = json.loads(REAL_GALLERY.read_text())["examples"]
    examples = load_gallery(REAL_GALLERY)
    assert len(examples) == len(entries)  # load_gallery drops examples whose files are missing
    assert {m for e in examples for m in e.modalities} == set(MEDIA_KINDS)
    folder = REAL_GALLERY.parent
    listed = {Path(f).name for e in examples for f in e.files}
    assert {p.name for p in folder.iterdir()} == listed | {"gallery.json", "README.md"}  # nothing stray
    assert sum(p.stat().st_size for p in folder.iterdir()) < 1_000_000
    cfg = from_name("7B").imagebind
    for example in examples:
        assert "synthesised" in example.title and not example.expected  # open questions, said to be made up
        for path, modality in zip(example.files, example.modalities, strict=True):
            x = load_media(path, modality, cfg)
            assert x.numel() and x.float().isfinite().all(), path
            # detection agrees, except that thermal is never guessed (a thermal PNG looks like any gray photo)
            assert detect_modality(path) == ("image" if modality == "thermal" else modality), path


def test_gallery_follows_the_weights():
    """Toy examples with the embedded model, real-world ones with real weights; an explicit gallery wins."""
    import gradio as gr

    from ibllm.engine import ChatEngine
    from ibllm.factory import load_default
    from ibllm.ui import build_demo

    toy = load_default()
    # The same network presented as real weights: the constructor takes the info the UI reads.
    real = ChatEngine(toy.net, toy.tokenizer, visual_cache=toy.visual_cache,
                        info=dataclasses.replace(toy.info, name="ImageBind-LLM 7B", is_default=False))
    assert gallery_for(toy.info) == DEFAULT_GALLERY and gallery_for(real.info) == REAL_GALLERY

    def shown(demo: gr.Blocks) -> set[str]:
        (chatbot,) = [b for b in demo.blocks.values() if isinstance(b, gr.Chatbot)]
        return {f["orig_name"] for ex in chatbot.examples or [] for f in ex["files"]}

    def files_of(gallery: Path) -> set[str]:
        return {Path(f).name for e in load_gallery(gallery) for f in e.files}

    assert shown(build_demo(toy)) == files_of(DEFAULT_GALLERY)
    assert shown(build_demo(real)) == files_of(REAL_GALLERY)
    assert shown(build_demo(real, gallery=DEFAULT_GALLERY)) == files_of(DEFAULT_GALLERY)
    assert shown(build_demo(toy, gallery=None)) == set()


def test_app_flags(monkeypatch):
    import app

    monkeypatch.setenv("GRADIO_SERVER_PORT", "8123")
    args = app.build_parser().parse_args(["--adapter", "7B.pth", "--device", "cpu", "--max-seq-len", "256"])
    assert (args.host, args.port) == ("127.0.0.1", 8123)
    given = {k: v for k, v in app.weights_kwargs(args).items() if v is not None}
    assert given == {"adapter": "7B.pth", "device": "cpu", "max_seq_len": 256}
    # Every weights option of the CLI is an option of the app (one definition).
    from ibllm.cli import build_parser

    generate = next(a for a in build_parser()._subparsers._group_actions[0].choices["generate"]._actions
                    if a.dest == "llama_dir")
    assert generate.help == next(a for a in app.build_parser()._actions if a.dest == "llama_dir").help


def test_blocks_are_offline_and_share_one_model_slot():
    from ibllm import create_engine
    from ibllm.ui import build_demo, launch_options
    from ibllm.ui.blocks import MODEL_GROUP

    demo = build_demo(create_engine(), gallery=None)
    assert demo.analytics_enabled is False
    opts = launch_options()
    assert opts["share"] is False and opts["ssr_mode"] is False
    model_events = [f for f in demo.fns.values() if f.concurrency_id == MODEL_GROUP]
    assert {f.api_name for f in model_events} >= {"chat", "neighbours", "compare_without_cache"}
    assert demo._queue.default_concurrency_limit == 1
