"""Text -> (77,) int64 CLIP BPE ids for the text encoder (length = cfg.text_context).

Layout: ``[SOT 49406] + ids + [EOT 49407]``, zero-padded to the context length. A text longer than
``context - 2`` BPE tokens is cut to its first ``context - 2`` tokens and **keeps** its EOT: ImageBind's
text head pools the position of the largest id (the EOT), so losing it would pool the start token instead.
(This deliberately differs from the ImageBind-LLM copy of the tokenizer, which cuts after appending EOT.)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ibllm.config import ImageBindConfig
from ibllm.media.bpe import default_tokenizer
from ibllm.media.errors import MediaError
from ibllm.media.limits import DEFAULT_LIMITS, Limits
from ibllm.media.sniff import bom_codec
from ibllm.media.validate import check_file, require_format


def tokenize_one(text: str, context_length: int = 77) -> torch.Tensor:
    """One string -> (context_length,) int64."""
    tok = default_tokenizer()
    ids = tok.encode(text, max_tokens=context_length - 2)
    out = torch.zeros(context_length, dtype=torch.long)
    out[: len(ids) + 2] = torch.tensor([tok.sot_id, *ids, tok.eot_id], dtype=torch.long)
    return out


def tokenize(texts: str | Sequence[str], context_length: int = 77) -> torch.Tensor:
    """A string -> (context_length,); a list of strings -> (B, context_length). int64."""
    if isinstance(texts, str):
        return tokenize_one(texts, context_length)
    return torch.stack([tokenize_one(t, context_length) for t in texts]) if texts else torch.zeros(
        0, context_length, dtype=torch.long)


def read_text_file(path: str | Path, limits: Limits = DEFAULT_LIMITS) -> str:
    name = Path(path).name
    check_file(path, limits)
    require_format(path, ("text",), "text")
    raw = Path(path).read_bytes()
    found = bom_codec(raw)
    try:
        text = raw[len(found[0]):].decode(found[1]) if found else raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        if found:
            raise MediaError(f"{name} is not valid {found[1][:6].upper()} text; save it as UTF-8 and upload it "
                             "again") from None
        text = raw.decode("cp1252", errors="replace")  # the sniffer found text: a single-byte code page
    if len(text) > limits.max_text_chars:
        raise MediaError(f"{name} has {len(text)} characters; the limit for a text input is {limits.max_text_chars}")
    if not text.strip():
        raise MediaError(f"{name} contains no text")
    return text


def load_text(path: str | Path, cfg: ImageBindConfig | None = None, limits: Limits = DEFAULT_LIMITS) -> torch.Tensor:
    """A UTF-8 text file -> (77,) int64 token ids (only the first 75 BPE tokens reach the encoder)."""
    cfg = cfg or ImageBindConfig()
    return tokenize_one(read_text_file(path, limits), cfg.text_context)


__all__ = ["tokenize", "tokenize_one", "load_text", "read_text_file"]
