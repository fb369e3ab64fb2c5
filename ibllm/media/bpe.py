"""CLIP's byte-level BPE tokenizer, written from its published behaviour.

Vocabulary: ``ibllm/data/bpe_simple_vocab_16e6.txt.gz`` (shipped with the package, never downloaded; see
``ibllm/data/LICENSE-CLIP.txt``). The id layout CLIP's checkpoints (and so ImageBind's text tower) expect:
the 256 byte symbols, the same 256 with the end-of-word marker ``</w>``, the first 48,894 merges of the file
(in rank order), then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407): 49,408 ids.

Text is cleaned as CLIP does: ``ftfy.fix_text``, HTML-unescaped twice, whitespace runs collapsed to one space,
stripped, lower-cased. It is then split by CLIP's regular expression (contractions, letter runs, single
digits, runs of other non-space characters); every piece is mapped byte-wise to printable symbols and merged
greedily by merge rank.
"""

from __future__ import annotations

import gzip
import html
from functools import lru_cache
from pathlib import Path

import ftfy
import regex

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
NUM_MERGES = 49152 - 256 - 2  # merges CLIP uses from the file (the rest are ignored)
_MAX_PIECE = 200  # symbols of one word merged at a time (BPETokenizer.encode)
SOT_TOKEN, EOT_TOKEN = "<|startoftext|>", "<|endoftext|>"

_SPLIT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")


@lru_cache(maxsize=1)
def byte_symbols() -> dict[int, str]:
    """Every byte -> one printable unicode character (printable Latin-1 bytes map to themselves)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)  # the non-printable bytes, in byte order, after Latin-1
            extra += 1
    return table


def clean_text(text: str) -> str:
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


class BPETokenizer:
    """Text -> CLIP BPE ids. ``encode`` gives the bare ids (no start/end tokens)."""

    def __init__(self, merges: list[tuple[str, str]]):
        symbols = list(byte_symbols().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges] + [SOT_TOKEN, EOT_TOKEN]
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self.decoder: dict[int, str] = {i: tok for tok, i in self.encoder.items()}
        self.ranks: dict[tuple[str, str], int] = {pair: i for i, pair in enumerate(merges)}
        self.byte_encoder = byte_symbols()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.sot_id, self.eot_id = self.encoder[SOT_TOKEN], self.encoder[EOT_TOKEN]
        self._cache: dict[str, list[str]] = {SOT_TOKEN: [SOT_TOKEN], EOT_TOKEN: [EOT_TOKEN]}

    @classmethod
    def from_vocab_file(cls, path: str | Path | None = None) -> BPETokenizer:
        data = Path(path or DATA_DIR / VOCAB_FILE).read_bytes()
        lines = gzip.decompress(data).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a version header
        if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{VOCAB_FILE} is not CLIP's BPE vocabulary (expected {NUM_MERGES} merge pairs)")
        return cls(merges)  # type: ignore[arg-type]

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe(self, piece: str) -> list[str]:
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        word = list(piece[:-1]) + [piece[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, 1 << 30))
            if best not in self.ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        if len(self._cache) < 100_000:  # bounded: user text is unbounded
            self._cache[piece] = word
        return word

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        """BPE ids of ``text``; with ``max_tokens``, its first ``max_tokens`` ids, found without encoding the rest.

        Merging is quadratic in a word's length, so a word longer than _MAX_PIECE symbols (no language has one:
        a 99,000-letter "word" took 80 s) is merged in pieces of that length, which changes at most the tokens
        next to each cut."""
        ids: list[int] = []
        for piece in _SPLIT.findall(clean_text(text)):
            symbols = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            for start in range(0, len(symbols), _MAX_PIECE):
                if max_tokens is not None and len(ids) >= max_tokens:
                    return ids[:max_tokens]
                ids.extend(self.encoder[tok] for tok in self._bpe(symbols[start:start + _MAX_PIECE]))
        return ids if max_tokens is None else ids[:max_tokens]

    def decode(self, ids: list[int]) -> str:
        """Ids -> text (cleaned and lower-cased, as it was encoded); start/end tokens are dropped."""
        raw = bytearray()
        for i in ids:
            if i in (self.sot_id, self.eot_id):
                continue
            tok = self.decoder[i]
            end_of_word = tok.endswith("</w>")
            raw.extend(self.byte_decoder[c] for c in (tok[:-4] if end_of_word else tok))
            if end_of_word:
                raw.extend(b" ")
        return raw.decode("utf-8", errors="replace").strip()


@lru_cache(maxsize=1)
def default_tokenizer() -> BPETokenizer:
    return BPETokenizer.from_vocab_file()


__all__ = ["BPETokenizer", "default_tokenizer", "clean_text", "byte_symbols", "NUM_MERGES"]
