"""ibllm.ui.gallery: the example galleries, and which one the page shows for the loaded weights."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gradio as gr

from ibllm.ui.gallery import DEFAULT_GALLERY, REAL_GALLERY, gallery_for, load_gallery


def test_gallery_loading(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.wav").write_bytes(b"x")
    (tmp_path / "gallery.json").write_text(json.dumps({"examples": [
        {"files": [{"path": "a.png", "modality": "image"}, {"path": "b.wav", "modality": "audio"}],
         "question": "What shape is it?", "expect": ["cube"]},
        {"files": [{"path": "missing.png", "modality": "image"}], "question": "skipped"},
        {"files": [{"path": "a.png", "modality": "image"}], "question": "What shape is it?",
         "followup": {"question": "And its colour?", "expect": ["red"]}},
    ]}))
    ex, two_turn = load_gallery(tmp_path / "gallery.json")
    assert ex.label == "image + audio: What shape is it?" and ex.expected == ["cube"]
    assert two_turn.label == "image: What shape is it? (then ask: And its colour?)"
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
