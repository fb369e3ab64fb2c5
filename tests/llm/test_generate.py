import random
from dataclasses import replace

import pytest
import sentencepiece as spm
import torch

from ibllm.config import GenerationConfig
from ibllm.llm.generate import generate_batch, generate_tokens, sample, sample_top_p
from ibllm.llm.stream import TextStreamer, stream_text
from ibllm.llm.tokenizer import Tokenizer
from tests.tiny_llama import injection_for, tiny


class CountingModel:
    """Mock LM: the next token is always (last token + 1) % vocab, with a clear margin. Counts its calls."""

    def __init__(self, vocab: int = 50, max_seq_len: int = 64):
        self.vocab, self.max_seq_len = vocab, max_seq_len
        self.calls: list[tuple[int, int]] = []  # (start_pos, number of tokens)

    def __call__(self, tokens, start_pos, injection, last_only=True, cache=None, span=None):
        # prefill: an int position; decode steps: one position per row, as a tensor
        self.calls.append((start_pos.tolist() if torch.is_tensor(start_pos) else start_pos, tokens.shape[1]))
        nxt = (tokens[:, -1] + 1) % self.vocab
        return torch.nn.functional.one_hot(nxt, self.vocab).float() * 10.0


def test_engine_prefills_once_then_one_token_per_step():
    model = CountingModel()
    out = list(generate_tokens(model, [1, 5, 6], None, GenerationConfig.greedy(4), eos_id=2))
    assert out == [7, 8, 9, 10]
    assert model.calls == [(0, 3), ([3], 1), ([4], 1), ([5], 1)]


def test_engine_stops_at_eos_and_at_max_seq_len():
    assert list(generate_tokens(CountingModel(), [1, 48], None, GenerationConfig.greedy(10), eos_id=2)) == [49, 0, 1]
    capped = list(generate_tokens(CountingModel(max_seq_len=6), [1, 10, 11], None, GenerationConfig.greedy(10),
                                  eos_id=2))
    assert capped == [12, 13, 14]  # 3 prompt + 3 new = max_seq_len
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        list(generate_tokens(CountingModel(max_seq_len=2), [1, 3, 4], None, GenerationConfig.greedy(128), eos_id=2))


@pytest.mark.parametrize("stop_after", [0, 1, 3])
def test_cancellation_stops_within_one_token(stop_after):
    model = CountingModel()
    produced: list[int] = []
    tokens = generate_tokens(model, [1, 3], None, GenerationConfig.greedy(20), eos_id=2,
                             should_stop=lambda: len(produced) >= stop_after)
    for t in tokens:
        produced.append(t)
    assert len(produced) == stop_after
    assert len(model.calls) == stop_after  # no model call is made once should_stop() is true


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.3, 0.15]])
    gen = torch.Generator().manual_seed(0)
    drawn = {int(sample_top_p(probs, 0.75, gen)) for _ in range(300)}
    assert drawn == {1, 2}  # mass before token 3 is 0.8 > 0.75: dropped; token 2 (mass before 0.5) kept
    assert {int(sample_top_p(probs, 0.0, gen)) for _ in range(50)} == {1}


def test_sampling_is_seeded_and_greedy_at_temperature_zero():
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(3))
    assert int(sample(logits, 0.0, 0.75)) == int(logits.argmax())
    draws = [[int(sample(logits, 1.0, 0.95, torch.Generator().manual_seed(s))) for _ in range(1)] for s in range(40)]
    again = [[int(sample(logits, 1.0, 0.95, torch.Generator().manual_seed(s))) for _ in range(1)] for s in range(40)]
    assert draws == again and len({d[0] for d in draws}) > 1


def test_seeded_generation_repeats_on_a_real_model():
    model = tiny()
    inj = injection_for(model, 1)
    sampled = GenerationConfig(max_new_tokens=12, temperature=1.0, top_p=0.9)
    a = list(generate_tokens(model, [1, 4, 9], inj, replace(sampled, seed=7), eos_id=-1))
    b = list(generate_tokens(model, [1, 4, 9], inj, replace(sampled, seed=7), eos_id=-1))
    c = list(generate_tokens(model, [1, 4, 9], inj, replace(sampled, seed=8), eos_id=-1))
    assert a == b and a != c and len(a) == 12


def test_greedy_engine_matches_recomputing_everything():
    model = tiny()
    inj = injection_for(model, 1)
    prompt = [1, 17, 33, 4]
    got = list(generate_tokens(model, prompt, inj, GenerationConfig.greedy(10), eos_id=-1))
    seq = list(prompt)
    for _ in range(10):  # no cache: the whole sequence each time
        logits = model(torch.tensor([seq]), 0, inj, use_cache=False)[0, -1]
        seq.append(int(logits.argmax()))
    assert got == seq[len(prompt):]


def test_batch_generate_ragged_rows_equal_single_runs():
    model = tiny()
    inj = injection_for(model, 2)
    prompts = [[1, 5, 9], [1, 22, 7, 40, 41, 3]]
    batch = generate_batch(model, prompts, inj, max_gen_len=6, temperature=0.0, eos_id=-1, keep_logits=True)
    assert batch.tokens.shape == (2, 12)  # max prompt 6 + 6
    assert batch.call_start_pos == [0, 3, 4, 5, 6, 7, 8, 9, 10]
    assert batch.call_num_tokens == [3] + [1] * 8
    assert batch.tokens[1, :6].tolist() == prompts[1]  # prompt positions are forced, never sampled
    for row, prompt in enumerate(prompts):
        alone = list(generate_tokens(model, prompt, inj[:, row:row + 1], GenerationConfig.greedy(6), eos_id=-1))
        assert batch.generated[row] == alone


# -- text streaming with a real SentencePiece model (byte fallback for characters it never saw) -----------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    rng = random.Random(0)
    words = ["the", "a", "cube", "sphere", "torus", "red", "blue", "green", "moves", "slowly", "quickly", "left",
             "right", "small", "large", "sound", "of", "metal", "rolling", "bright", "dark", "café", "crème"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + rng.choice(".!?") for _ in range(400)]
    prefix = tmp_path_factory.mktemp("sp") / "toy"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=320,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, minloglevel=2)
    return Tokenizer(f"{prefix}.model")


def test_tokenizer_bos_eos_and_round_trip(tokenizer):
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    ids = tokenizer.encode("the red cube moves.")
    assert ids[0] == 1 and ids[-1] != 2
    assert tokenizer.encode("cube", bos=False, eos=True)[-1] == 2
    assert tokenizer.decode(ids) == "the red cube moves."


TEXTS = ["the small cube rolls left, then stops!", "a café 🙂 says 你好 — ok", "🙂🙂 crème brûlée ∑"]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_decoded_text_and_never_splits_a_character(tokenizer, text):
    ids = tokenizer.encode(text, bos=False)
    assert any(tokenizer.sp.id_to_piece(i).startswith("<0x") for i in ids) or text.isascii()
    deltas = list(stream_text(ids, tokenizer.decode))
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert all(d and "\ufffd" not in d for d in deltas)
    assert len(deltas) > 3  # it does stream


def test_streaming_the_engine_output(tokenizer):
    target = tokenizer.encode("the cube 🙂 moves quickly", bos=False)

    class Scripted(CountingModel):  # emits `target` token by token, then eos
        def __call__(self, tokens, start_pos, injection, last_only=True, cache=None, span=None):
            step = int(start_pos) + tokens.shape[1] - 1  # prompt is [bos]
            nxt = target[step] if step < len(target) else 2
            return torch.nn.functional.one_hot(torch.tensor([nxt]), tokenizer.vocab_size).float()

    ids = list(generate_tokens(Scripted(), [1], None, GenerationConfig.greedy(50), eos_id=2))
    assert ids == target
    streamer = TextStreamer(tokenizer.decode)
    text = "".join(streamer.put(i) for i in ids) + streamer.flush()
    assert text == tokenizer.decode(ids)


def test_flush_releases_an_unfinished_character(tokenizer):
    ids = tokenizer.encode("ok 🙂", bos=False)[:-1]  # cut inside the emoji's bytes
    streamer = TextStreamer(tokenizer.decode)
    body = "".join(streamer.put(i) for i in ids)
    assert "\ufffd" not in body
    assert (body + streamer.flush()) == tokenizer.decode(ids)


def test_vocab_limit_masks_padded_ids():
    # The counting model's best next id after 8 is 9; with the limit at 9 it must pick something below it instead.
    out = list(generate_tokens(CountingModel(), [1, 7], None, GenerationConfig.greedy(3), vocab_limit=9, eos_id=2))
    assert out[0] == 8 and all(t < 9 for t in out)
    options = GenerationConfig(max_new_tokens=5, temperature=1.0, seed=0)
    sampled = list(generate_tokens(CountingModel(), [1, 8], None, options, vocab_limit=9, eos_id=2))
    assert all(t < 9 for t in sampled)
