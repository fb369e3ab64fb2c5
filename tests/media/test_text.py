"""CLIP BPE tokenizer and the text loader."""

from __future__ import annotations

import pytest
import torch

from ibllm.config import ImageBindConfig
from ibllm.media import MediaError
from ibllm.media.bpe import clean_text, default_tokenizer
from ibllm.media.text import load_text, tokenize

SOT, EOT = 49406, 49407


def test_known_ids():
    # Values from the reference tokenizer (parity-a preprocessing/text_strings).
    assert tokenize("Hello, World!")[:6].tolist() == [SOT, 3306, 267, 1002, 256, EOT]
    assert tokenize("  multiple   spaces\tand\nnewlines  ")[:7].tolist() == [SOT, 6470, 9006, 537, 1218, 3418, EOT]
    assert tokenize("café &amp; crème brûlée")[:12].tolist() == [SOT, 15304, 261, 1075, 12138, 614, 711, 127, 119,
                                                                 75, 13489, EOT]


def test_layout_padding_and_batch():
    x = tokenize(["a dog", ""])
    assert x.shape == (2, 77) and x.dtype == torch.int64
    assert x[1, :3].tolist() == [SOT, EOT, 0] and (x[0, 4:] == 0).all()
    assert tokenize("a dog", context_length=16).shape == (16,)


def test_over_long_text_keeps_its_end_token():
    x = tokenize(" ".join(f"word{i}" for i in range(80)))
    assert x[0] == SOT and x[76] == EOT and (x[1:76] != 0).all()
    assert int(x.argmax()) == 76  # the text head pools the largest id: the EOT, not the start


def test_cleaning_and_roundtrip():
    assert clean_text("  A&amp;amp;B \n\t C ") == "a&b c"
    tok = default_tokenizer()
    assert tok.vocab_size == 49408
    text = "A photo of 2 cats, don't you think? 😀"
    assert tok.decode(tok.encode(text)) == "a photo of 2 cats , don 't you think ? 😀"


def test_text_file(tmp_path):
    (tmp_path / "t.txt").write_text("Hello, World!\n", encoding="utf-8")
    assert load_text(tmp_path / "t.txt").tolist() == tokenize("Hello, World!").tolist()
    assert load_text(tmp_path / "t.txt", ImageBindConfig(text_context=10)).shape == (10,)
    (tmp_path / "latin.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))  # a Windows code page: read as one
    assert load_text(tmp_path / "latin.txt").tolist() == tokenize("caf\xe9 cr\xe8me").tolist()
    (tmp_path / "blank.txt").write_text("  \n ")
    with pytest.raises(MediaError, match="no text"):
        load_text(tmp_path / "blank.txt")
