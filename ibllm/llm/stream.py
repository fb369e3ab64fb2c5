"""Token ids -> text deltas, by re-decoding and diffing.

SentencePiece cannot decode token by token (leading-space pieces, multi-byte characters split over byte-fallback
pieces), so every step decodes all ids so far and emits what is new. A decode that ends in U+FFFD is an unfinished
UTF-8 character: nothing is emitted until a later token completes it (or the final flush gives up on it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

REPLACEMENT = "\ufffd"


class TextStreamer:
    """Feed ids with ``put``; each call returns the text that became final (possibly ""). ``flush`` at the end."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.text = ""  # what has been emitted so far

    def _delta(self, final: bool) -> str:
        text = self.decode(self.ids)
        if not final:
            text = text.rstrip(REPLACEMENT)
        if not text.startswith(self.text):
            # Decoding revised text that was already emitted (not seen with SentencePiece): wait for the flush.
            if not final:
                return ""
            text = text[len(self.text):] if len(text) > len(self.text) else ""
            self.text += text
            return text
        delta = text[len(self.text):]
        self.text = text
        return delta

    def put(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._delta(final=False)

    def flush(self) -> str:
        return self._delta(final=True)


def stream_text(token_ids: Iterable[int], decode: Callable[[list[int]], str]) -> Iterator[str]:
    """Non-empty text deltas for a stream of ids; their concatenation equals ``decode(all ids)``."""
    streamer = TextStreamer(decode)
    for token in token_ids:
        delta = streamer.put(token)
        if delta:
            yield delta
    tail = streamer.flush()
    if tail:
        yield tail
