"""OpenAI chat messages -> the conversation as the browser chat holds it: files written to disk, turns, question.

The whole conversation comes with every request, as OpenAI clients send it. Every file of every user message is an
input of the conversation (as files attached earlier in the browser chat stay part of it); the assistant messages
are the history; the trailing user message(s) are the question. The result is in the browser chat's own message
shape (``{"role": ..., "content": [{"path": ...}, "text"]}``), so ``ibllm.ui.session.ChatSession.follow`` reads it
exactly as it reads the browser's history.

Content parts accepted (OpenAI's names): ``text``; ``image_url`` with a data URL (the server fetches nothing, so
http(s) URLs are refused); ``input_audio`` (base64 ``data`` + ``format``); ``file`` with ``file_data`` (a data URL
or plain base64) and a ``filename`` whose extension says what it is (video, point cloud, depth, thermal, IMU,
text, or any other accepted file).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import mimetypes
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ibllm.api.errors import ApiError, bad_request
from ibllm.kinds import ALL_EXTENSIONS, KINDS

IMAGE_TYPES = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/webp": ".webp",
               "image/gif": ".gif", "image/bmp": ".bmp", "image/tiff": ".tiff"}
PART_TYPES = ("text", "image_url", "input_audio", "file")
IGNORED_ROLES = ("system", "developer")  # the model's prompt template has its own preamble


@dataclass(frozen=True)
class ReadMessages:
    """A request's conversation: the question (the trailing user messages' text) and every message in the browser
    chat's shape, files as paths under the request's folder."""

    question: str
    history: list[dict[str, Any]]


def too_large(what: str, size: int, limit: int) -> ApiError:
    return ApiError(413, f"{what} is {size / 2**20:.1f} MB; files may be at most {limit / 2**20:.0f} MB",
                    code="file_too_large")


def decode_base64(data: Any, what: str, max_bytes: int) -> tuple[str, bytes]:
    """(MIME type or "", bytes) of a data URL or of plain base64; 400 for anything else, 413 over ``max_bytes``."""
    if not isinstance(data, str) or not data:
        raise bad_request(f"{what} must be a base64 string or a data URL (data:<type>;base64,...)")
    mime = ""
    if data.startswith(("http://", "https://")):
        raise bad_request(f"{what}: the server fetches nothing from the internet; send the file itself as a data URL "
                          "(data:image/png;base64,...)")
    if data.startswith("data:"):
        header, comma, data = data.partition(",")
        if not comma or ";base64" not in header:
            raise bad_request(f"{what}: only base64 data URLs are accepted (data:<type>;base64,...)")
        mime = header[5:].split(";")[0].strip().lower()
    elif ":" in data[:12]:
        raise bad_request(f"{what}: unsupported URL {data[:40]!r}; send a data URL (data:<type>;base64,...)")
    data = "".join(data.split())  # base64 wrapped over lines is still base64
    size = len(data) * 3 // 4
    if size > max_bytes:
        raise too_large(what, size, max_bytes)
    try:
        return mime, base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"{what} is not valid base64 ({e})") from e


def safe_name(name: str) -> str:
    """A file name without folders or odd characters (the extension kept: it says what the file is)."""
    base = os.path.basename(name.replace("\\", "/")).strip()
    base = "".join(c if c.isalnum() or c in "._- " else "_" for c in base).strip(" .")
    stem, ext = os.path.splitext(base)
    return (stem[:80] or "file") + ext[:12]


class _Writer:
    """Writes each file of the conversation once, under ``folder/<content hash>/<name>``: the same bytes under the
    same name are the same input, as the browser chat's upload folders (also named by content) make them."""

    def __init__(self, folder: Path, max_file_bytes: int):
        self.folder, self.max_file_bytes = folder, max_file_bytes
        # (prefix, content hash, extension) -> path, for files sent without a name
        self._unnamed: dict[tuple[str, str, str], str] = {}

    def write(self, name: str, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()[:16]
        path = self.folder / digest / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return str(path)

    def write_unnamed(self, prefix: str, ext: str, data: bytes) -> str:
        """A file sent without a name (images, sounds): named ``<prefix><n><ext>``, n counting distinct files."""
        key = (prefix, hashlib.sha256(data).hexdigest(), ext)
        if key not in self._unnamed:
            n = 1 + sum(k[0] == prefix for k in self._unnamed)
            self._unnamed[key] = self.write(f"{prefix}{n}{ext}", data)
        return self._unnamed[key]

    def part(self, part: Any, where: str) -> str | dict[str, str]:
        """One content part as the chat holds it: its text, or ``{"path": ...}`` of the file written."""
        if isinstance(part, str):
            return part
        if not isinstance(part, Mapping):
            raise bad_request(f"{where} must be an object with a 'type'", where)
        kind = part.get("type")
        if kind == "text" or (kind is None and "text" in part):
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request(f"{where}.text must be a string", where)
            return text
        if kind not in PART_TYPES:
            raise bad_request(f"{where}: unsupported content part type {kind!r}; accepted: {', '.join(PART_TYPES)}",
                              where)
        if kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, Mapping) else image
            mime, data = decode_base64(url, f"{where}.image_url.url", self.max_file_bytes)
            ext = IMAGE_TYPES.get(mime)
            if ext is None:
                raise bad_request(f"{where}.image_url.url: a data URL of an image is needed (data:image/png;base64,"
                                  f"...; types: {', '.join(IMAGE_TYPES)}), got {mime or 'no type'!r}", where)
            return {"path": self.write_unnamed("image", ext, data)}
        if kind == "input_audio":
            audio = part.get("input_audio")
            if not isinstance(audio, Mapping):
                raise bad_request(f"{where}.input_audio must be an object with 'data' and 'format'", where)
            fmt = str(audio.get("format") or "").lower().lstrip(".")
            if f".{fmt}" not in KINDS["audio"].extensions:
                accepted = ", ".join(e.lstrip(".") for e in KINDS["audio"].extensions)
                raise bad_request(f"{where}.input_audio.format must be one of {accepted}; got {fmt or 'none'!r}", where)
            _, data = decode_base64(audio.get("data"), f"{where}.input_audio.data", self.max_file_bytes)
            return {"path": self.write_unnamed("audio", f".{fmt}", data)}
        file = part.get("file")
        if not isinstance(file, Mapping):
            raise bad_request(f"{where}.file must be an object with 'file_data' and 'filename'", where)
        if file.get("file_id") and not file.get("file_data"):
            raise bad_request(f"{where}.file.file_id refers to an uploaded file, and this server keeps none; send "
                              "the file itself as file_data", where)
        mime, data = decode_base64(file.get("file_data"), f"{where}.file.file_data", self.max_file_bytes)
        name = safe_name(str(file.get("filename") or ""))
        if not os.path.splitext(name)[1]:
            ext = IMAGE_TYPES.get(mime) or (mimetypes.guess_extension(mime) if mime else None)
            if ext not in ALL_EXTENSIONS:
                raise bad_request(f"{where}.file needs a filename whose extension says what it is (e.g. scan.ply, "
                                  "clip.mp4, walk.npy)", where)
            if not file.get("filename"):
                return {"path": self.write_unnamed("file", ext, data)}
            name += ext
        return {"path": self.write(name, data)}


def _content(content: Any, where: str, writer: _Writer) -> list[str | dict[str, str]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or a list of content parts", where)
    return [writer.part(p, f"{where}[{i}]") for i, p in enumerate(content)]


def read_messages(messages: Any, folder: Path, max_file_bytes: int) -> ReadMessages:
    """Check ``messages`` (OpenAI's format), write their files under ``folder``; the question and the chat-shaped
    history. ApiError (400 or 413) says what is wrong and where (``messages[2].content[0]``)."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    writer = _Writer(folder, max_file_bytes)
    history: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise bad_request(f"{where} must be an object with 'role' and 'content'", where)
        role = message.get("role")
        if role in IGNORED_ROLES:
            continue
        if role not in ("user", "assistant"):
            raise bad_request(f"{where}.role {role!r} is not supported; use user, assistant (or system)", where)
        parts = _content(message.get("content"), f"{where}.content", writer)
        if role == "assistant" and any(not isinstance(p, str) for p in parts):
            raise bad_request(f"{where}: assistant messages carry text only", where)
        history.append({"role": role, "content": parts})
    if not history or history[-1]["role"] != "user":
        raise bad_request("the last message must be the user's (the question to answer)", "messages")
    question = []
    for message in reversed(history):
        if message["role"] != "user":
            break
        question[:0] = [p for p in message["content"] if isinstance(p, str) and p.strip()]
    return ReadMessages(question="\n".join(question).strip(), history=history)
