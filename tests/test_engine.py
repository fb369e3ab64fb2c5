"""The engine (ChatEngine.chat) end to end at the toy size: streaming, fusion weights, the per-content embedding
cache, cancellation, long conversations and unusable files."""

from __future__ import annotations

import shutil
import time
from dataclasses import replace

import pytest
import torch

from ibllm import create_engine
from ibllm.config import GenerationConfig, VisualCacheConfig
from ibllm.media.errors import MediaError
from ibllm.types import Attachment, Turn
from tests.conftest import REPO

EXAMPLES = REPO / "examples" / "toy"
IMAGE = Attachment(str(EXAMPLES / "red_cube_image.png"), "image")
AUDIO = Attachment(str(EXAMPLES / "bell_torus_audio.wav"), "audio")
GREEDY = GenerationConfig(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def model():
    return create_engine(device="cpu")


def test_streamed_deltas_add_up_to_the_answer(model):
    events = list(model.chat("What is it?", attachments=[IMAGE], generation=GREEDY))
    assert events[-1].done and not any(e.done for e in events[:-1])
    assert "".join(e.delta for e in events) == events[-1].text
    assert model.answer("What is it?", attachments=[IMAGE], generation=GREEDY) == events[-1].text
    t = events[-1].timings
    assert t.prompt_tokens > 0 and 0 < t.new_tokens <= GREEDY.max_new_tokens


def test_sampling_is_reproducible_with_a_seed(model):
    opts = GenerationConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    first = model.answer("Describe it.", attachments=[AUDIO], generation=opts)
    assert model.answer("Describe it.", attachments=[AUDIO], generation=opts) == first


def test_each_file_content_is_encoded_once(model, tmp_path):
    copy = tmp_path / "same_bytes_other_name.png"
    shutil.copy(IMAGE.path, copy)
    first = model.embed(IMAGE)
    again = model.embed(Attachment(str(copy), "image"))
    assert again is first  # same content -> the cached tensor, no second decode/encode
    assert not torch.equal(model.embed(AUDIO), first)


def test_weights_follow_the_reference_rule(model):
    e_img, e_aud = model.embed(IMAGE), model.embed(AUDIO)
    fused = model.fused_feature([IMAGE, Attachment(AUDIO.path, "audio", 0.5)])
    n = torch.nn.functional.normalize
    expected = n(e_img, dim=-1) * (1 / (1.5 + 1e-6)) + n(e_aud, dim=-1) * (0.5 / (1.5 + 1e-6))
    torch.testing.assert_close(fused[0], expected)
    only_image = model.fused_feature([IMAGE, Attachment(AUDIO.path, "audio", 0.0)])
    torch.testing.assert_close(only_image[0], n(e_img, dim=-1) / (1 + 1e-6))
    assert model.fused_feature([Attachment(IMAGE.path, "image", 0.0)]) is None  # -> answered as text only


def test_cache_off_and_on_give_the_engine_different_features(model):
    from ibllm.cache import VisualCache

    dim = model.cfg.imagebind.out_embed_dim
    vectors = torch.nn.functional.normalize(torch.randn(64, dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    cache = VisualCache.build(vectors, captions=[f"entry {i}" for i in range(64)])
    saved, model.visual_cache = model.visual_cache, cache
    try:
        feature = model.fused_feature([AUDIO])
        mixed, neighbours = model._retrieve(feature, VisualCacheConfig(enabled=True, top_k=5))
        assert len(neighbours) == 5 and not torch.allclose(mixed, feature)
        sims = [n.similarity for n in neighbours]
        assert sims == sorted(sims, reverse=True) and neighbours[0].caption == f"entry {neighbours[0].index}"
        same, none = model._retrieve(feature, VisualCacheConfig(enabled=False))
        assert none == [] and same is feature
        events = list(model.chat("What is it?", attachments=[AUDIO], visual_cache=VisualCacheConfig(top_k=3),
                                 generation=GREEDY))
        assert [n.index for n in events[-1].neighbours] == [n.index for n in neighbours[:3]]
    finally:
        model.visual_cache = saved


def test_stop_flag_ends_the_answer_within_one_token(model):
    shown = [0]  # tokens behind the text handed out so far (an event may carry several)

    def should_stop() -> bool:
        return shown[-1] >= 3

    for event in model.chat("Describe it.", attachments=[IMAGE], should_stop=should_stop,
                            generation=GenerationConfig(max_new_tokens=40, temperature=1.0, seed=1)):
        if not event.done:
            shown.append(event.timings.new_tokens)
    assert shown[-1] >= 3 and event.done
    assert event.timings.new_tokens == shown[-1]  # not one token read after the stop


def test_a_long_conversation_is_trimmed_not_refused(model):
    history = [Turn("Tell me everything about the scene " * 8, "It is a large red cube " * 8)] * 20
    events = list(model.chat("And now?", history=history, attachments=[IMAGE], generation=GREEDY))
    assert events[-1].done
    assert any("dropped" in note for note in events[-1].notes)
    assert events[-1].timings.prompt_tokens <= model.cfg.llama.max_seq_len


def test_unusable_files_raise_media_error(model, tmp_path):
    before = model.answer("What is it?", attachments=[IMAGE], generation=GREEDY)
    fake = tmp_path / "photo.png"
    fake.write_text("this is not a picture")
    with pytest.raises(MediaError, match="photo.png"):
        list(model.chat("What is it?", attachments=[Attachment(str(fake), "image")]))
    with pytest.raises(MediaError, match="not found"):
        model.embed(Attachment(str(tmp_path / "gone.wav"), "audio"))
    # the engine still answers afterwards, exactly as before the failures
    assert model.answer("What is it?", attachments=[IMAGE], generation=GREEDY) == before


def test_each_event_carries_its_own_timings(model):
    events = list(model.chat("Describe it.", attachments=[IMAGE],
                             generation=GenerationConfig(max_new_tokens=8, temperature=1.0, seed=3)))
    counts = [e.timings.new_tokens for e in events]
    assert counts == sorted(counts) and len(set(counts)) > 1  # a snapshot per event, not one shared object
    assert len({id(e.timings) for e in events}) == len(events)


def test_the_default_model_asked_without_an_input_says_what_it_can_do_instead_of_making_one_up(model):
    calls = []
    handle = model.net.llama.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        for attachments in ([], [replace(IMAGE, weight=0.0)]):
            answer = model.answer("hi, what can you do?", attachments=attachments, generation=GREEDY)
            assert "Attach an image" in answer and "real ImageBind-LLM weights" in answer
        assert not calls  # the language model was not run
        assert model.answer("What is it?", attachments=[IMAGE], generation=GREEDY) != answer
        assert calls
    finally:
        handle.remove()


def test_a_file_is_hashed_once_per_version(tmp_path):
    import os

    from ibllm.media.digest import file_digest

    path = tmp_path / "clip.bin"
    path.write_bytes(b"a" * 1000)
    first = file_digest(path)
    st = path.stat()
    path.write_bytes(b"b" * 1000)  # same size; put the old modification time back: the memo answers unread
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_digest(path) == first
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a new version: read again
    assert file_digest(path) != first


def test_a_slow_reader_gets_the_tokens_made_meanwhile_in_one_event(model):
    # A consumer that pulls late (a web page through Gradio) must not fall behind the model one token per event.
    generation = GenerationConfig(max_new_tokens=12, temperature=1.0, seed=4)
    want = model.answer("Describe it.", attachments=[IMAGE], generation=generation)
    events = model.chat("Describe it.", attachments=[IMAGE], generation=generation)
    first = next(e for e in events if e.delta)
    deadline = time.monotonic() + 30
    while model.scheduler.batch.live and time.monotonic() < deadline:  # the model finishes the answer meanwhile
        time.sleep(0.01)
    rest = list(events)
    assert rest[-1].timings.new_tokens >= first.timings.new_tokens + 3  # several tokens were made meanwhile...
    assert len(rest) <= 2 and rest[-1].done  # ...and come in one event, then the end
    assert first.text + "".join(e.delta for e in rest) == rest[-1].text == want
