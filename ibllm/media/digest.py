"""Content digests of uploaded files, computed once per file version.

The engine memoises encoder outputs by content (so one upload serves every turn and every session that sends the
same bytes), and the UI matches gallery hints by content. Hashing a 200 MB video costs about a second, so each
digest is remembered under the file's (path, size, modification time): a file is read again only when it changed.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path

_MEMO: OrderedDict[tuple[str, int, int], str] = OrderedDict()
_LOCK = threading.Lock()
_CAPACITY = 4096


def file_digest(path: str | Path) -> str:
    """sha256 (hex) of the file's content; hashed once per (path, size, mtime)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    with _LOCK:
        known = _MEMO.get(key)
        if known is not None:
            _MEMO.move_to_end(key)
            return known
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    with _LOCK:
        _MEMO[key] = digest
        while len(_MEMO) > _CAPACITY:
            _MEMO.popitem(last=False)
    return digest


__all__ = ["file_digest"]
