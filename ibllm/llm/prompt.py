"""Prompt formats: the Alpaca template exactly as ImageBind-LLM was tuned on (REFERENCE.md section 4), and a
multi-turn chat built on it.

Chat format (the model was tuned on single-turn Alpaca data, so history goes where Alpaca puts context):

- first turn: the no-input template, instruction = the user's message;
- later turns: the with-input template, instruction = the newest message, input = the earlier turns as a
  transcript, one ``User: ...`` / ``Assistant: ...`` line pair per turn, oldest first.

``build_chat_prompt`` keeps the prompt within a token budget: it drops the oldest turns first; if the newest
message alone is still too long it keeps the end of it (cut from the left) and says so in the result; if not even
the bare template fits, the token ids themselves are cut from the left (bos kept). It never raises for long input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)


def format_prompt(instruction: str, input: str | None = None) -> str:  # noqa: A002 - the reference's name
    """The Alpaca prompt; ``input=None`` selects the template without input (as the reference's ``format_prompt``)."""
    if input is None:
        return PROMPT_NO_INPUT.format_map({"instruction": instruction})
    return PROMPT_WITH_INPUT.format_map({"instruction": instruction, "input": input})


class Encoder(Protocol):
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...


@dataclass(frozen=True)
class ChatPrompt:
    """The prompt sent to the model and how it was made to fit."""

    text: str
    ids: list[int]
    turns_kept: int
    turns_dropped: int
    message_truncated: bool = False  # the newest message was cut from the left
    ids_truncated: bool = False  # even the bare template did not fit: the ids were cut from the left
    notes: list[str] = field(default_factory=list)


def _pair(turn: object) -> tuple[str, str]:
    if isinstance(turn, tuple | list):
        user, assistant = turn
        return str(user), str(assistant)
    return str(turn.user), str(turn.assistant)  # ibllm.types.Turn or anything shaped like it


def render_chat(message: str, history: Sequence[object] = ()) -> str:
    """The chat prompt text for ``message`` after the turns in ``history`` ((user, assistant) pairs or Turns)."""
    if not history:
        return format_prompt(message)
    transcript = "\n".join(f"User: {u}\nAssistant: {a}" for u, a in map(_pair, history))
    return format_prompt(message, transcript)


def build_chat_prompt(message: str, history: Sequence[object], tokenizer: Encoder, max_tokens: int) -> ChatPrompt:
    """Render, encode (with bos) and fit within ``max_tokens`` ids, dropping the oldest turns first."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens must leave room for bos and some text, got {max_tokens}")
    history = list(history)

    def encode(keep: int, msg: str) -> tuple[str, list[int]]:
        text = render_chat(msg, history[len(history) - keep:] if keep else [])
        return text, tokenizer.encode(text, bos=True, eos=False)

    text, ids = encode(len(history), message)
    if len(ids) <= max_tokens:
        return ChatPrompt(text, ids, len(history), 0)

    # Most turns that fit: binary search (length grows with each kept turn), then confirm.
    lo, hi = 0, len(history) - 1  # keeping `lo` turns is the candidate; all turns did not fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(encode(mid, message)[1]) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    text, ids = encode(lo, message)
    dropped = len(history) - lo
    notes = [f"dropped the {dropped} oldest turn(s) to fit {max_tokens} prompt tokens"] if dropped else []
    if len(ids) <= max_tokens:
        return ChatPrompt(text, ids, lo, dropped, notes=notes)

    # The newest message alone is too long: keep its longest suffix that fits.
    lo, hi = 0, len(message)  # cut = number of leading characters removed; cutting all of it is tried last
    while lo < hi:
        mid = (lo + hi) // 2
        if len(encode(0, message[mid:])[1]) <= max_tokens:
            hi = mid
        else:
            lo = mid + 1
    text, ids = encode(0, message[lo:])
    notes.append(f"the message was cut from the left to its last {len(message) - lo} of {len(message)} characters")
    if len(ids) <= max_tokens:
        return ChatPrompt(text, ids, 0, len(history), message_truncated=True, notes=notes)

    ids = ids[:1] + ids[len(ids) - (max_tokens - 1):]
    notes.append(f"even the bare template exceeds {max_tokens} tokens: its ids were cut from the left")
    return ChatPrompt(text, ids, 0, len(history), message_truncated=True, ids_truncated=True, notes=notes)
