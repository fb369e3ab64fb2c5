"""SentencePiece tokenizer as LLaMA uses it: bos 1, eos 2 (read from the model file), prompts encoded with bos and
without eos (REFERENCE.md section 4)."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm


class Tokenizer:
    def __init__(self, model_path: str | Path):
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {path}")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()  # -1 for LLaMA's model (no pad piece)

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        # SentencePiece drops control ids (bos/eos) itself; byte-fallback pieces of an unfinished UTF-8 character
        # come out as U+FFFD, which the streamer (stream.py) holds back until the character is complete.
        # The model's vocabulary may be padded past the tokenizer's pieces; an id from the padding (only an
        # untrained model samples one) decodes to nothing instead of raising mid-answer.
        size = self.sp.get_piece_size()
        return self.sp.decode([i for i in ids if 0 <= i < size])
