"""The serving scheduler (ibllm.serving) and ChatEngine.chat on top of it: concurrent chats from threads get the
answers they get alone, wait FIFO with their place in line, and free their slot when stopped or abandoned."""

from __future__ import annotations

import gc
import threading
from dataclasses import replace

import pytest
import torch

from ibllm import create_engine
from ibllm.config import GenerationConfig, VisualCacheConfig
from ibllm.factory import serving_options
from ibllm.llm.batching import DecodeBatch
from ibllm.serving import Queued, Scheduler
from ibllm.types import Attachment
from tests.app_helpers import wait_until
from tests.conftest import REPO
from tests.tiny_llama import CFG, Recorded, alone, prompt, requests, tiny

EXAMPLES = REPO / "examples" / "toy"
GREEDY = GenerationConfig(max_new_tokens=12, temperature=0.0)


@pytest.fixture()
def model():
    return tiny(CFG)




def submit(scheduler: Scheduler, request):
    return scheduler.submit(request.prompt, request.injection, request.options, eos_id=request.eos_id)


def test_more_requests_than_slots_wait_fifo_with_their_place_in_line(model):
    scheduler = Scheduler(DecodeBatch(model, 2))
    reqs = requests(model, lengths=(3, 9, 5, 14, 7))
    try:
        with scheduler._cond:  # hold the loop back while all five arrive (the condition's lock is re-entrant)
            streams = [submit(scheduler, r) for r in reqs]
        items = [list(s) for s in streams]
    finally:
        scheduler.close()
    notices = [[i.position for i in got if isinstance(i, Queued)] for got in items]
    assert [n[:1] for n in notices] == [[], [], [1], [2], [3]]  # two slots: requests 3..5 wait in line...
    assert all(n == sorted(set(n), reverse=True) for n in notices) and len(notices[4]) > 1  # ...told as it moves
    assert [[t for t in got if not isinstance(t, Queued)] for got in items] == [alone(model, r) for r in reqs]
    admitted = [s.admitted for s in streams]
    assert admitted[2:] == sorted(admitted[2:])  # first come, first served


def test_an_abandoned_or_closed_stream_frees_its_slot():
    scheduler = Scheduler(DecodeBatch(tiny(replace(CFG, max_seq_len=1024)), 2))  # answers of ~1000 steps
    long = GenerationConfig.greedy(10_000)
    try:
        first = scheduler.submit(prompt(3, 0), None, long, eos_id=-1)
        second = scheduler.submit(prompt(4, 1), None, long, eos_id=-1)
        next(first), next(second)
        assert scheduler.batch.live == 2
        del first  # a client gone without closing: the stream is garbage-collected
        gc.collect()
        assert wait_until(lambda: scheduler.batch.live <= 1)
        second.close()
        assert wait_until(lambda: scheduler.batch.live == 0)
        assert list(second) == []  # nothing more after close
    finally:
        scheduler.close()


def test_a_waiting_request_that_is_cancelled_leaves_the_line(model):
    scheduler = Scheduler(DecodeBatch(model, 1))
    r = requests(model, GenerationConfig.greedy(30), lengths=(3, 4, 5))
    try:
        with scheduler._cond:
            running, leaving, last = (submit(scheduler, x) for x in r)
        leaving.close()
        got = list(last)
        assert [i.position for i in got if isinstance(i, Queued)][-1] == 1
        assert [t for t in got if not isinstance(t, Queued)] == alone(model, r[2])
        assert [t for t in running if not isinstance(t, Queued)] == alone(model, r[0])
        assert scheduler.waiting == 0
    finally:
        scheduler.close()


def test_a_chat_stopped_while_in_line_is_released_before_a_slot_frees():
    scheduler = Scheduler(DecodeBatch(tiny(replace(CFG, max_seq_len=1024)), 1))  # the first answer runs ~1000 steps
    stop = threading.Event()
    try:
        running = scheduler.submit(prompt(3, 0), None, GenerationConfig.greedy(10_000), eos_id=-1)
        next(running)
        waiting = scheduler.submit(prompt(4, 1), None, GREEDY, eos_id=-1, should_stop=stop.is_set)
        assert isinstance(next(waiting), Queued)
        stop.set()
        assert list(waiting) == []  # DONE while the first request still holds the only slot
        assert scheduler.batch.live == 1 and scheduler.waiting == 0
        running.close()
    finally:
        scheduler.close()


def test_a_failing_step_ends_the_live_requests_with_the_error_and_the_loop_goes_on(model):
    batch = DecodeBatch(model, 2)
    scheduler = Scheduler(batch)
    real = batch._forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device lost")
        return real(*args, **kwargs)

    batch._forward = flaky
    try:
        stream = scheduler.submit(prompt(3, 0), None, GenerationConfig.greedy(10), eos_id=-1)
        with pytest.raises(RuntimeError, match="device lost"):
            list(stream)
        r = requests(model, lengths=(5,))[0]
        assert list(submit(scheduler, r)) == alone(model, r)
    finally:
        scheduler.close()


# -- ChatEngine.chat through the scheduler ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    engine = create_engine(device="cpu", max_batch=3, compile=False)
    yield engine
    engine.close()


CHATS = [  # (attachments, visual cache): the cache on and off mixed in one batch, several kinds of input
    ([Attachment(str(EXAMPLES / "red_cube_image.png"), "image")], VisualCacheConfig(enabled=True)),
    ([Attachment(str(EXAMPLES / "red_cube_image.png"), "image")], VisualCacheConfig(enabled=False)),
    ([Attachment(str(EXAMPLES / "bell_torus_audio.wav"), "audio")], VisualCacheConfig(enabled=True)),
    ([Attachment(str(EXAMPLES / "going_up_imu.npy"), "imu")], VisualCacheConfig(enabled=False)),
    ([Attachment(str(EXAMPLES / "bell_torus_audio.wav"), "audio")], VisualCacheConfig(enabled=False)),
]


def test_concurrent_chats_answer_as_they_do_alone(engine):
    options = [GREEDY, GREEDY, GenerationConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=5), GREEDY,
               GenerationConfig(max_new_tokens=12, temperature=0.8, top_p=0.75, seed=9)]
    want = [engine.answer("What is it?", attachments=a, visual_cache=c, generation=g)
            for (a, c), g in zip(CHATS, options, strict=True)]
    assert engine.scheduler.batch.cache is not None
    batch = engine.scheduler.batch
    seen = []
    real_step = batch.step

    def step():
        seen.append(batch.live)
        real_step()

    batch.step = step
    got: list[str | None] = [None] * len(CHATS)
    start = threading.Barrier(len(CHATS))

    def ask(i: int) -> None:
        (attachments, cache), generation = CHATS[i], options[i]
        start.wait()
        got[i] = engine.answer("What is it?", attachments=attachments, visual_cache=cache, generation=generation)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(CHATS))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        del batch.step
    assert got == want
    feature = engine.fused_feature(CHATS[0][0])  # the cache on/off really changes what the model is given
    assert not torch.allclose(engine._retrieve(feature, CHATS[0][1])[0], feature)
    assert max(seen) >= 2  # they did decode together (3 slots, 5 chats: some also waited)


def test_a_queued_chat_says_where_it_is_in_line(engine):
    # Three long requests (no eos) take the three slots; then a chat arrives.
    busy = [engine.scheduler.submit(prompt(5, i), None, GenerationConfig.greedy(200), eos_id=-1) for i in range(3)]
    for stream in busy:
        next(stream)  # its first token: it holds a slot
    image = CHATS[1][0]
    events = engine.chat("What is it?", attachments=image, visual_cache=CHATS[1][1], generation=GREEDY)
    first = next(events)
    assert first.queue_position == 1 and first.text == "" and first.delta == ""
    for stream in busy:
        stream.close()  # the three stop: the waiting chat gets a slot within a step
    rest = list(events)
    assert rest[-1].done and rest[-1].queue_position == 0 and rest[-1].timings.queued > 0
    assert "".join(e.delta for e in rest) == rest[-1].text
    assert rest[-1].text == engine.answer("What is it?", attachments=image, visual_cache=CHATS[1][1], generation=GREEDY)
    assert wait_until(lambda: engine.scheduler.batch.live == 0)


def test_stop_frees_the_slot_within_a_step(engine):
    shown = [0]  # tokens behind the text handed out so far
    events = engine.chat("Describe it.", attachments=CHATS[0][0],
                         generation=GenerationConfig(max_new_tokens=100, temperature=1.0, seed=2),
                         should_stop=lambda: shown[-1] >= 2)
    for event in events:
        if not event.done:
            shown.append(event.timings.new_tokens)
    assert event.done and event.timings.new_tokens == shown[-1] >= 2
    assert wait_until(lambda: engine.scheduler.batch.live == 0, timeout=5)


def test_serving_options_follow_the_environment(monkeypatch):
    import torch

    cpu = torch.device("cpu")
    assert serving_options(cpu) == {"max_batch": 4, "compile": False}
    assert serving_options(torch.device("cuda")) == {"max_batch": 4, "compile": True}
    monkeypatch.setenv("IBLLM_MAX_BATCH", "6")
    monkeypatch.setenv("IBLLM_COMPILE", "1")
    assert serving_options(cpu) == {"max_batch": 6, "compile": True}
    assert serving_options(cpu, max_batch=2, compile=False) == {"max_batch": 2, "compile": False}
    with pytest.raises(ValueError, match="at least 1"):
        serving_options(cpu, max_batch=0)


def test_cli_serving_flags():
    from ibllm.cli import build_parser, weights_kwargs

    args = build_parser().parse_args(["generate", "q", "--max-batch", "8", "--no-compile"])
    assert {k: weights_kwargs(args)[k] for k in ("max_batch", "compile")} == {"max_batch": 8, "compile": False}
    args = build_parser().parse_args(["generate", "q"])
    assert {k: weights_kwargs(args)[k] for k in ("max_batch", "compile")} == {"max_batch": None, "compile": None}


def test_engine_slots_come_from_the_factory(monkeypatch):
    monkeypatch.setenv("IBLLM_MAX_BATCH", "2")
    engine = create_engine(device="cpu")
    try:
        assert engine.scheduler.slots == 2 and not engine.scheduler.batch.compiled
        assert engine.scheduler.batch.cache.batch == 2
    finally:
        engine.close()


def test_replace_never_shares_request_state(model):
    r = requests(model, lengths=(3,))[0]
    copy = replace(r)
    assert copy.outbox is not r.outbox
    r.cancel()
    assert not copy.stopped()


def test_requests_arriving_together_are_prefilled_in_one_call(model):
    recorded = Recorded(model)
    scheduler = Scheduler(DecodeBatch(recorded, 4))
    reqs = requests(model, lengths=(3, 9, 5, 14))
    try:
        with scheduler._cond:  # all four are in line before the loop looks
            streams = [submit(scheduler, r) for r in reqs]
        got = [list(s) for s in streams]
    finally:
        scheduler.close()
    assert [c for c in recorded.calls if c[0] == "prefill"] == [("prefill", (4, 14))]
    assert got == [alone(model, r) for r in reqs]


def test_a_chat_stopped_during_its_prefill_ends_without_a_token_and_frees_its_slot(model):
    stop = threading.Event()
    recorded = Recorded(model, on_prefill=stop.set)
    scheduler = Scheduler(DecodeBatch(recorded, 2))
    r = requests(model, lengths=(6,))[0]
    try:
        stream = scheduler.submit(r.prompt, r.injection, r.options, eos_id=-1, should_stop=stop.is_set)
        assert list(stream) == []
        assert wait_until(lambda: scheduler.batch.live == 0)
        recorded.on_prefill = None
        assert list(submit(scheduler, r)) == alone(model, r)  # the slot serves the next one
    finally:
        scheduler.close()


def test_requests_arriving_during_a_prefill_get_theirs_before_the_next_step(model):
    reqs = requests(model, lengths=(3, 9, 5))
    late: list = []

    def arrive_during_first_prefill():
        if not late:  # the two others come while the first one's prompt is being read
            late.extend(submit(scheduler, r) for r in reqs[1:])

    recorded = Recorded(model, on_prefill=arrive_during_first_prefill)
    scheduler = Scheduler(DecodeBatch(recorded, 4))
    try:
        first = submit(scheduler, reqs[0])
        got = [list(first)] + [list(s) for s in late]
    finally:
        scheduler.close()
    assert [kind for kind, _ in recorded.calls[:3]] == ["prefill", "prefill", "step"]
    assert recorded.calls[1] == ("prefill", (2, 9))
    assert got == [alone(model, r) for r in reqs]
