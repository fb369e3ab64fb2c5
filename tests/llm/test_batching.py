"""Continuous batching at the token level (ibllm.llm.batching): every request in a batch gets exactly the tokens it
gets alone — ragged prompts, its own injection, its own seeded sampling, stops, eos, admission mid-answer."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from ibllm.config import GenerationConfig, LlamaConfig
from ibllm.llm.batching import DONE, DecodeBatch, Request
from ibllm.llm.generate import generate_tokens
from ibllm.llm.packed import PackedLinear
from tests.conftest import REPO
from tests.tiny_llama import CFG, GREEDY, SAMPLED, Recorded, alone, injection_for, prompt, requests, tiny


@pytest.fixture(scope="module")
def model():
    return tiny(CFG)


def tokens_of(request: Request) -> list[int]:
    return [t for t in iter(request.outbox.get, DONE)]


def test_positions_per_row_equal_each_row_alone(model):
    # Two rows of different lengths in one cache; one call with per-row positions == each row's own int-path step.
    x = [prompt(4, 0), prompt(9, 1)]
    inj = torch.cat([injection_for(model, 1, seed=3), injection_for(model, 1, seed=4)], dim=1)
    cache = model.new_cache(2, 32)
    with torch.no_grad():
        for row, ids in enumerate(x):
            model(torch.tensor([ids[:-1]]), 0, inj[:, row:row + 1], cache=cache.rows(row, row + 1))
        step = model(torch.tensor([[x[0][-1]], [x[1][-1]]]), torch.tensor([3, 8]), inj, last_only=True, cache=cache)
        for row, ids in enumerate(x):
            full = model(torch.tensor([ids]), 0, inj[:, row:row + 1], use_cache=False)[0, -1]
            torch.testing.assert_close(step[row], full, atol=1e-5, rtol=0)


def test_the_decode_step_reads_only_the_positions_in_use(model):
    # Positions past every row's own (another conversation's leftovers, here NaN) are not read at all with a span:
    # a masked NaN would still reach the output through the softmax's 0 * NaN.
    x = [prompt(4, 0), prompt(9, 1)]
    clean, dirty = model.new_cache(2, 32), model.new_cache(2, 32)
    for t in dirty.tensors():
        t[:, :, 9:] = float("nan")
    step = torch.tensor([[x[0][-1]], [x[1][-1]]]), torch.tensor([3, 8])
    with torch.no_grad():
        for cache in (clean, dirty):
            for row, ids in enumerate(x):
                model(torch.tensor([ids[:-1]]), 0, None, cache=cache.rows(row, row + 1))
        want = model(*step, None, last_only=True, cache=clean)
        got = model(*step, None, last_only=True, cache=dirty, span=9)
        assert torch.isnan(model(*step, None, last_only=True, cache=dirty)).all()  # the whole length: NaN
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="span 33"):
        model(*step, None, last_only=True, cache=clean, span=33)
    # And the batch's own steps: a cache left dirty past what these requests reach still gives them their tokens.
    reqs = requests(model, lengths=(3, 9))
    batch = DecodeBatch(model, 2, max_seq_len=64)
    for t in batch.cache.tensors():
        t[:, :, 40:] = float("nan")
    assert batch.run(reqs) == [alone(model, r) for r in reqs]


@pytest.mark.parametrize("options", [GREEDY, SAMPLED], ids=["greedy", "seeded-sampling"])
def test_a_batch_gives_every_request_its_tokens_alone(model, options):
    # Ragged prompts (3..14 tokens), a different injection and seed per slot.
    batch = requests(model, options)
    want = [alone(model, r) for r in requests(model, options)]
    assert DecodeBatch(model, 4).run(batch) == want
    assert len({tuple(w) for w in want}) == 4  # four really different answers


def test_more_requests_than_slots_wait_and_reuse_freed_slots(model):
    reqs = requests(model, lengths=(3, 9, 5, 14, 7, 2))
    reqs[1] = replace(reqs[1], options=GenerationConfig.greedy(3))  # finishes early: its slot is reused first
    want = [alone(model, r) for r in reqs]
    batch = DecodeBatch(model, 3)
    assert batch.run(reqs) == want
    assert batch.live == 0


def test_text_only_and_visual_requests_share_a_step(model):
    reqs = requests(model)
    reqs[2] = replace(reqs[2], injection=None)
    want = [alone(model, r) for r in reqs]
    assert DecodeBatch(model, 4).run(reqs) == want
    assert want[2] != alone(model, requests(model)[2])  # the zero row really is "no injection"


def test_cancel_mid_decode_frees_the_slot_for_the_next_request(model):
    a, b, c, d = requests(model, GenerationConfig.greedy(20), lengths=(3, 9, 5, 6))
    want = {r.prompt[1]: alone(model, r) for r in (a, b, c, d)}
    batch = DecodeBatch(model, 3)
    for r in (a, b, c):
        batch.admit(r)
    for _ in range(4):
        batch.step()
    b.cancel()
    batch.step()  # the stop is seen before this step: b takes no part in it
    assert batch.slots[1] is None and batch.live == 2
    batch.admit(d)  # joins while a and c are mid-answer, in b's old slot
    assert batch.slots[1].request is d
    while batch.live:
        batch.step()
    got_b = tokens_of(b)
    assert got_b == want[b.prompt[1]][:5]  # its first token (prefill) + 4 steps, then nothing
    for r in (a, c, d):
        assert tokens_of(r) == want[r.prompt[1]]


def test_eos_ends_one_request_early_and_the_others_go_on(model):
    reqs = requests(model, GenerationConfig.greedy(12))
    full = [alone(model, r) for r in reqs]
    eos = full[1][4]  # request 1 meets "eos" at its 5th token
    reqs[1] = replace(reqs[1], eos_id=eos)
    got = DecodeBatch(model, 4).run(reqs)
    assert got[1] == full[1][:full[1].index(eos)]
    assert len(got[1]) < 12
    assert [got[i] for i in (0, 2, 3)] == [full[i] for i in (0, 2, 3)]


def test_should_stop_is_polled_before_every_model_call(model):
    produced: list[int] = []
    stream = generate_tokens(model, prompt(4, 0), None, GenerationConfig.greedy(20), eos_id=-1,
                             should_stop=lambda: len(produced) >= 3)
    produced.extend(stream)
    assert len(produced) == 3


def test_the_budget_stops_at_the_cache_length(model):
    batch = DecodeBatch(model, 2, max_seq_len=16)
    assert batch.max_seq_len == 16
    long_prompt = Request(prompt(12, 0), None, GenerationConfig.greedy(50), -1)
    short_prompt = Request(prompt(3, 1), None, GenerationConfig.greedy(50), -1)
    out = batch.run([long_prompt, short_prompt])
    assert [len(o) for o in out] == [4, 13]
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        batch.admit(Request(prompt(17, 2), None, GREEDY, -1))


def test_vocab_limit_applies_to_every_row():
    cfg = LlamaConfig(**{**CFG.__dict__, "vocab_size": 128})
    model = tiny(cfg)
    reqs = [Request(prompt(5, i), None, GenerationConfig(max_new_tokens=20, temperature=2.0, seed=i), -1)
            for i in range(3)]
    out = DecodeBatch(model, 3, vocab_limit=40).run(reqs)
    assert all(t < 40 for row in out for t in row)


def test_compile_falls_back_to_eager(model, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    batch = DecodeBatch(model, 2)
    assert batch.compile() is False and not batch.compiled
    assert "decoding eagerly" in caplog.text
    reqs = requests(model, lengths=(3, 9))
    assert batch.run(reqs) == [alone(model, r) for r in reqs]


@pytest.mark.slow
def test_compiled_step_equals_eager(model):
    eager, compiled = DecodeBatch(model, 3), DecodeBatch(model, 3)
    assert compiled.compile(), "torch.compile (inductor) should work on this CPU"
    served = {}
    for batch in (eager, compiled):
        served[batch] = requests(model, lengths=(3, 9, 5))
        for r in served[batch]:
            batch.admit(r)
    for _ in range(6):  # the step's logits, then the step itself (which writes the same keys/values again)
        logits = []
        for batch in (eager, compiled):
            tokens = torch.tensor([[s.last] for s in batch.slots])
            positions = torch.tensor([s.position for s in batch.slots])
            with torch.no_grad():
                logits.append(batch._forward(tokens, positions, batch.injection, batch.cache))
        torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
        eager.step()
        compiled.step()
    for batch in (eager, compiled):
        while batch.live:
            batch.step()
    assert [tokens_of(r) for r in served[compiled]] == [tokens_of(r) for r in served[eager]]
    assert compiled.widths == (1, 2, 3)  # on a CPU: a graph per width, so one request steps one row
    lone = requests(model, SAMPLED, lengths=(6,))
    assert compiled.run(lone) == [alone(model, lone[0])]


@pytest.mark.parametrize("options", [GREEDY, SAMPLED], ids=["greedy", "seeded-sampling"])
def test_newcomers_of_different_lengths_are_prefilled_together_as_alone(model, options):
    reqs = requests(model, options, lengths=(3, 14, 1, 9))
    reqs[2] = replace(reqs[2], injection=None)  # a text-only row among visual ones
    want = [alone(model, r) for r in requests(model, options, lengths=(3, 14, 1, 9))]
    want[2] = alone(model, reqs[2])
    recorded = Recorded(model)
    batch = DecodeBatch(recorded, 4)
    batch.admit(*reqs)
    assert recorded.calls == [("prefill", (4, 14))]  # one call, padded to the longest prompt
    while batch.live:
        batch.step()
    assert [tokens_of(r) for r in reqs] == want


def test_newcomers_fill_the_free_slots_between_busy_ones(model):
    # Slots 0 and 2 free, 1 and 3 mid-answer: the newcomers' cache rows are not adjacent.
    reqs = requests(model, lengths=(3, 9, 5, 14, 7, 11))
    want = [alone(model, r) for r in reqs]
    batch = DecodeBatch(model, 4)
    batch.admit(*reqs[:4])
    for _ in range(2):
        batch.step()
    reqs[0].cancel()
    reqs[2].cancel()
    batch.drop_stopped()
    batch.admit(reqs[4], reqs[5])
    assert [s.request for s in batch.slots] == [reqs[4], reqs[1], reqs[5], reqs[3]]
    while batch.live:
        batch.step()
    for i in (1, 3, 4, 5):
        assert tokens_of(reqs[i]) == want[i]


def test_a_request_cancelled_during_prefill_gets_nothing_and_frees_its_slot(model):
    reqs = requests(model, lengths=(3, 9, 5))
    want = [alone(model, r) for r in reqs]
    recorded = Recorded(model, on_prefill=reqs[1].cancel)  # a Stop arriving while the prompts are read
    batch = DecodeBatch(recorded, 3)
    batch.admit(*reqs)
    assert batch.slots[1] is None and batch.live == 2
    while batch.live:
        batch.step()
    assert tokens_of(reqs[1]) == []
    assert [tokens_of(reqs[0]), tokens_of(reqs[2])] == [want[0], want[2]]


def test_admitting_more_than_the_free_slots_is_refused(model):
    batch = DecodeBatch(model, 2)
    with pytest.raises(ValueError, match="3 requests for 2 free slots"):
        batch.admit(*requests(model, lengths=(3, 4, 5)))


def plain_linears(model) -> int:
    """The Linears a decode step multiplies by (every projection and the head; not LoRA's rank-r pairs)."""
    return sum(type(m) is torch.nn.Linear and "lora_" not in name for name, m in model.named_modules())


@pytest.mark.parametrize("options", [GREEDY, SAMPLED], ids=["greedy", "seeded-sampling"])
def test_packed_weights_give_every_request_its_tokens_alone(model, options):
    # The float32 weights packed for 4 rows (MKL's layout): every step with a slot past the first runs all 4 rows
    # through them, and each request still gets what it gets alone through the plain weights.
    packed = tiny(CFG)  # the same weights as ``model``, packed (packing changes the modules)
    batch = DecodeBatch(packed, 4, pack=True)
    assert batch.packed_rows == 4
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == plain_linears(model)
    steps = Recorded(packed)
    batch.model = steps
    reqs = requests(packed, options, lengths=(3, 9, 5, 14, 7, 2))  # more than the slots: admitted as they free up
    assert batch.run(reqs) == [alone(model, r) for r in reqs]
    widths = {shape[0] for kind, shape in steps.calls if kind == "step"}
    assert widths == {4}  # slot 0 alone never remains: each step ran the packed width


def test_a_packed_step_equals_the_plain_one(model):
    packed = tiny(CFG)
    assert packed.pack_for_rows(3) == plain_linears(model)
    x, positions = torch.tensor([[5], [17], [40]]), torch.tensor([2, 7, 4])
    inj = injection_for(model, 3, seed=5)
    with torch.no_grad():
        got = packed(x, positions, inj, last_only=True, cache=packed.new_cache(3, 16))
        want = model(x, positions, inj, last_only=True, cache=model.new_cache(3, 16))
        two = packed(x[:2], positions[:2], inj[:, :2], last_only=True, cache=packed.new_cache(3, 16))  # not 3 rows
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(two, want[:2], atol=1e-5, rtol=1e-5)
    assert not torch.equal(got, torch.zeros_like(got))


def test_compiled_packed_step_has_two_widths(model):
    packed = tiny(CFG)
    batch = DecodeBatch(packed, 3, pack=True)
    assert batch.compile()
    assert batch.widths == (1, 3)
    reqs = requests(packed, lengths=(3, 9, 5))
    assert batch.run(reqs) == [alone(model, r) for r in reqs]


def test_an_eager_packed_batch_does_not_import_the_compiler():
    # Importing torch._dynamo took 1.4 s of the first batched step in the app (py-spy), when every packed product
    # went through the custom op that only a compiled graph needs. A fresh process, as a server starts.
    code = ("import sys, torch\n"
            "from tests.tiny_llama import CFG, alone, requests, tiny\n"
            "from ibllm.llm.batching import DecodeBatch\n"
            "model = tiny(CFG)\n"
            "batch = DecodeBatch(model, 3, pack=True)\n"
            "assert batch.packed_rows == 3\n"
            "reqs = requests(model, lengths=(3, 9, 5))\n"
            "assert batch.run(reqs) == [alone(model, r) for r in reqs]\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_the_warm_up_compiles_what_serving_runs():
    # Every graph is made at start-up: a guard that fails at the first real step (the tokens' strides did) compiled
    # again inside the first answer, 1-6 s of it.
    from torch._dynamo.utils import counters

    batch = DecodeBatch(tiny(CFG), 2)
    assert batch.compile()
    before = counters["stats"]["unique_graphs"]
    reqs = requests(batch.model, lengths=(3, 9))
    batch.run(reqs[:1])  # one row alone, then two together
    batch.run(reqs)
    assert counters["stats"]["unique_graphs"] == before
