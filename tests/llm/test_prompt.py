import random

import pytest

from ibllm.llm.prompt import build_chat_prompt, format_prompt, render_chat
from ibllm.types import Turn


class ByteTokenizer:
    """One id per UTF-8 byte (+3), bos 1: enough to measure prompts without a trained model."""

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return ([1] if bos else []) + [b + 3 for b in text.encode()] + ([2] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 3 for i in ids if i > 2).decode(errors="replace")


TOK = ByteTokenizer()


def test_alpaca_template_exactly():
    assert format_prompt("Describe the image.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nDescribe the image.\n\n### Response:")
    assert format_prompt("Translate.", "Bonjour {name}") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nTranslate.\n\n"
        "### Input:\nBonjour {name}\n\n### Response:")
    assert format_prompt("x", "") != format_prompt("x")  # only None selects the no-input template


def test_chat_folds_earlier_turns_into_the_input():
    assert render_chat("What is it?") == format_prompt("What is it?")
    text = render_chat("And its colour?", [("What is it?", "A cube."), Turn("Is it big?", "No.")])
    assert text == format_prompt("And its colour?", "User: What is it?\nAssistant: A cube.\nUser: Is it big?\n"
                                                    "Assistant: No.")


def test_history_that_fits_is_kept_whole():
    history = [(f"q{i}", f"a{i}") for i in range(3)]
    p = build_chat_prompt("next?", history, TOK, 1000)
    assert (p.turns_kept, p.turns_dropped, p.message_truncated, p.notes) == (3, 0, False, [])
    assert p.ids == TOK.encode(p.text) and p.ids[0] == 1


def test_oldest_turns_are_dropped_first():
    history = [(f"question number {i}", f"answer number {i} " * 5) for i in range(40)]
    budget = 600
    p = build_chat_prompt("and now?", history, TOK, budget)
    assert len(p.ids) <= budget and 0 < p.turns_kept < 40 and p.turns_dropped == 40 - p.turns_kept
    assert p.text == render_chat("and now?", history[-p.turns_kept:])  # the newest turns survive
    longer = render_chat("and now?", history[-(p.turns_kept + 1):])
    assert len(TOK.encode(longer)) > budget  # and as many as fit
    assert "dropped" in p.notes[0]


def test_an_overlong_message_is_cut_from_the_left():
    message = "".join(f"word{i} " for i in range(500)) + "THE END"
    p = build_chat_prompt(message, [("hi", "hello")], TOK, 400)
    assert len(p.ids) <= 400 and p.message_truncated and not p.ids_truncated
    assert p.turns_kept == 0 and "THE END" in p.text and "word0 " not in p.text
    assert p.text.endswith("### Response:") and any("cut" in n for n in p.notes)


def test_a_budget_smaller_than_the_template_still_returns_ids():
    p = build_chat_prompt("hello", [], TOK, 20)
    assert len(p.ids) == 20 and p.ids[0] == 1 and p.ids_truncated
    assert TOK.decode(p.ids).endswith("### Response:")
    with pytest.raises(ValueError):
        build_chat_prompt("hello", [], TOK, 1)


def test_random_histories_never_fail():
    rng = random.Random(0)
    for _ in range(60):
        history = [("x" * rng.randint(0, 300), "y" * rng.randint(0, 300)) for _ in range(rng.randint(0, 30))]
        budget = rng.randint(2, 2000)
        p = build_chat_prompt("z" * rng.randint(0, 3000), history, TOK, budget)
        assert len(p.ids) <= budget and p.turns_kept + p.turns_dropped == len(history)
