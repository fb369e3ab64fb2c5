"""The OpenAI-compatible HTTP API: ``POST /v1/chat/completions`` and ``GET /v1/models`` on the app's own server.

``OpenAIApi(engine).routes`` are FastAPI routes, given to Gradio's FastAPI app before it starts
(``launch(app_kwargs=api.app_kwargs())``), so ``python app.py`` serves the browser chat and the API on one port,
from one engine: the same decode slots, line and limits. What a request may carry is in ``ibllm.api.messages``; the
generation settings are OpenAI's (``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``), and ibllm's own
knobs go in one extension field, ``ibllm`` (see README):

    "ibllm": {"weights": {"scan.ply": 1.0, "audio": 0.5},      # by file name, modality or position; 0 leaves out
              "modalities": {"scan.png": "depth"},             # how to read a file that could be read several ways
              "visual_cache": {"enabled": true, "top_k": 10, "temperature": 20.0, "weight": 0.5},
              "answer_with": "text+picture",                   # "text" (default), "picture" or both
              "picture": {"steps": 20, "guidance": 10.0, "seed": 1, "noise_level": 0}}

A picture (``ChatEngine.imagine``, after the text when both are asked) comes back in the reply's ``ibllm`` fields
(``ibllm.api.replies``). Errors are OpenAI's JSON bodies: 400 (an unusable file: the media loader's message; a
malformed request; a picture that cannot be drawn here, with the reason the browser chat gives), 401 (a wrong key,
when ``IBLLM_API_KEY`` is set), 404 (unknown model or URL; 405 for a known URL with the wrong method), 413 (a file
or request too large), 429 (the engine's line is full).

A client that goes away at any point (while its files are read, while it waits in line, while it is answered)
cancels its answer: a watcher task reads the connection's disconnect from the moment the answer is started.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.routing import BaseRoute

from ibllm.api.completion import ChatCall, Completion
from ibllm.api.errors import ApiError, bad_request
from ibllm.api.messages import read_messages, too_large
from ibllm.api.replies import Reply
from ibllm.config import GenerationConfig, PictureConfig, with_settings
from ibllm.engine import MIN_ANSWER_TOKENS, ChatEngine
from ibllm.imagine import PictureError
from ibllm.media.errors import MediaError
from ibllm.media.limits import DEFAULT_LIMITS
from ibllm.types import ModelInfo
from ibllm.ui.history import normalise_history
from ibllm.ui.inputs import Detector, RequestError, plan_attachments
from ibllm.ui.session import ChatSession

EXTENSION_KEYS = ("weights", "modalities", "visual_cache", "answer_with", "picture")
# ``ibllm.answer_with`` -> (answer in words, draw a picture); spaces are ignored ("text + picture", as the UI says it).
ANSWER_WITH = {"text": (True, False), "picture": (False, True), "text+picture": (True, True)}
MAX_STOPS = 4  # as OpenAI's API


def model_id(info: ModelInfo) -> str:
    """The id the API serves the loaded model under (``ModelInfo.api_id``)."""
    return info.api_id


@dataclass(frozen=True)
class ApiSettings:
    """The API's own limits; the rest (file contents, context, decode slots) are the engine's, shared with the
    browser chat.

    ``api_key``: when set, every request needs ``Authorization: Bearer <key>`` (env ``IBLLM_API_KEY``).
    ``max_queue``: answers allowed to wait for a decode slot, engine-wide (browser chats included) before a request
    is refused with 429 (env ``IBLLM_MAX_QUEUE``); an API request counts from when it is accepted, while its files
    are still read and encoded. ``max_file_bytes``: one decoded file (the media loaders'
    limit); ``max_request_bytes``: one request body (base64 makes files a third larger; default room for about
    two files of the largest size)."""

    api_key: str | None = None
    max_queue: int = 32
    max_file_bytes: int = DEFAULT_LIMITS.max_file_bytes
    max_request_bytes: int = 3 * DEFAULT_LIMITS.max_file_bytes
    model: str | None = None  # the served id (default: ``model_id(engine.info)``)

    @classmethod
    def from_env(cls) -> ApiSettings:
        return cls(api_key=os.environ.get("IBLLM_API_KEY") or None,
                   max_queue=int(os.environ.get("IBLLM_MAX_QUEUE", cls.max_queue)))


@dataclass
class _Options:
    """The request's fields the API reads, checked."""

    stream: bool = False
    include_usage: bool = False
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    stops: list[str] = field(default_factory=list)
    extension: Mapping[str, Any] = field(default_factory=dict)
    text: bool = True
    picture: PictureConfig | None = None  # None: no picture asked for


class _Arrivals:
    """API requests accepted but not yet in the engine's own line (their files read, detected, encoded): the
    scheduler counts a request only once it is submitted, so without these a burst of file-carrying requests would
    all pass the 429 check while their files are still being read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def enter(self) -> Callable[[], None]:
        """Count one more; returns its ``leave``, which may be called any number of times, from any thread."""
        with self._lock:
            self.count += 1
        left = threading.Event()

        def leave() -> None:
            with self._lock:
                if not left.is_set():
                    left.set()
                    self.count -= 1

        return leave


class OpenAIApi:
    """The routes, bound to one engine. ``settings`` may be replaced while serving (tests tighten the limits)."""

    def __init__(self, engine: ChatEngine, settings: ApiSettings | None = None):
        self.engine = engine
        self.settings = settings or ApiSettings.from_env()
        self.detect = Detector(engine)
        self.created = int(time.time())
        self.arriving = _Arrivals()
        self._watchers: set[asyncio.Task] = set()  # asyncio holds tasks weakly: a stream's watcher outlives its call
        router = APIRouter(prefix="/v1")
        router.add_api_route("/models", self.list_models, methods=["GET"])
        router.add_api_route("/models/{model}", self.get_model, methods=["GET"])
        router.add_api_route("/chat/completions", self.chat_completions, methods=["POST"])
        served = [(m, route.path) for route in router.routes for m in sorted(getattr(route, "methods", ()))]
        self.served = [(m, p) for m, p in served if m != "HEAD"]
        # Last, so only what no route above takes reaches it: an OpenAI-style error instead of FastAPI's
        # {"detail": "Not Found"}, which the openai client shows as an unexplained 404.
        router.add_api_route("/{rest:path}", self.unknown_route, methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                             include_in_schema=False)
        self.routes: list[BaseRoute] = list(router.routes)

    def app_kwargs(self) -> dict[str, Any]:
        """``launch(app_kwargs=...)`` for Gradio: its FastAPI app is created with these routes in it."""
        return {"routes": self.routes}

    @property
    def model(self) -> str:
        return self.settings.model or model_id(self.engine.info)

    # -- endpoints ------------------------------------------------------------------------------------------------

    async def list_models(self, request: Request) -> JSONResponse:
        try:
            self._check_key(request)
        except ApiError as e:
            return _error(e)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def get_model(self, model: str, request: Request) -> JSONResponse:
        try:
            self._check_key(request)
            self._check_model(model)
        except ApiError as e:
            return _error(e)
        return JSONResponse(self._model_card())

    async def chat_completions(self, request: Request) -> Any:
        completion = watcher = leave = None
        try:
            self._check_key(request)
            body = await self._read_json(request)
            options = self._options(body)
            leave = self._enter_line()
            call = await run_in_threadpool(self._prepare, body.get("messages"), options)
            completion = Completion(self.engine, call, arrived=leave)
            # From here until the answer ends, whatever the response is doing. Starlette's own disconnect listener
            # is not enough: it starts only with the response, and it stops the answer only through the stream
            # generator's ``finally``, which a generator cancelled before its first step never runs.
            watcher = asyncio.create_task(_cancel_when_gone(request, completion))
            self._watchers.add(watcher)
            watcher.add_done_callback(self._watchers.discard)
            first = await completion.next_delta()  # encoding happens before it: an unusable file fails here
        except ApiError as e:
            return _error(e, completion, watcher, leave)
        except (MediaError, RequestError, PictureError) as e:
            return _error(bad_request(str(e)), completion, watcher, leave)
        except Exception as e:  # noqa: BLE001 - one bad request must not take the server down
            return _error(ApiError(500, f"{type(e).__name__}: {e}"), completion, watcher, leave)
        reply = Reply(completion, first, model=self.model, budget=self._budget(options.generation),
                      include_usage=options.include_usage)
        if options.stream:
            # The watcher ends by itself: the server reports a disconnect once the response is complete.
            return StreamingResponse(reply.chunks(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return JSONResponse(await reply.whole())
        except Exception as e:  # noqa: BLE001 - the engine failed mid-answer
            return _error(ApiError(500, f"{type(e).__name__}: {e}"))
        finally:
            watcher.cancel()

    async def unknown_route(self, rest: str, request: Request) -> JSONResponse:
        path = request.url.path
        methods = [m for m, p in self.served if re.fullmatch(re.sub(r"\{\w+\}", "[^/]+", p), path)]
        served = ", ".join(f"{m} {p}" for m, p in self.served)
        if methods:
            return _error(ApiError(405, f"{path} takes {' or '.join(methods)}, not {request.method}",
                                   code="method_not_allowed"))
        return _error(ApiError(404, f"Unknown request URL: {request.method} {path}. This server serves {served}",
                               code="unknown_url"))

    # -- checks ---------------------------------------------------------------------------------------------------

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "ibllm"}

    def _budget(self, generation: GenerationConfig) -> Callable[[int], int]:
        """prompt tokens -> the most answer tokens the engine gives (its own caps: context, room for an answer)."""
        context = self.engine.cfg.llama.max_seq_len
        return lambda prompt: min(generation.max_new_tokens, context - MIN_ANSWER_TOKENS, context - prompt)

    def _check_key(self, request: Request) -> None:
        key = self.settings.api_key
        if not key:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "Incorrect or missing API key: send the server's key (IBLLM_API_KEY) as "
                                "'Authorization: Bearer <key>'", code="invalid_api_key")

    def _check_model(self, model: Any) -> None:
        if model != self.model:
            raise ApiError(404, f"The model {model!r} does not exist; this server serves {self.model!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")

    def _enter_line(self) -> Callable[[], None]:
        """Count this request as waiting (429 when ``max_queue`` already wait): the engine's line (browser chats
        included) and the API's requests not yet in it, less the free slots they will take. Returns its ``leave``.
        No ``await`` between the check and the count: a burst is counted one request at a time."""
        scheduler = self.engine.scheduler
        waiting = scheduler.waiting + self.arriving.count - scheduler.batch.free
        if waiting >= self.settings.max_queue:
            raise ApiError(429, f"The server is busy: {waiting} answers are waiting for one of its "
                                f"{scheduler.slots} decode slots. Retry in a moment.", code="rate_limit_exceeded")
        return self.arriving.enter()

    async def _read_json(self, request: Request) -> dict[str, Any]:
        limit = self.settings.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large("the request", int(declared), limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large("the request", size, limit)
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad_request(f"the request body is not JSON: {e}") from e
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        return body

    def _options(self, body: Mapping[str, Any]) -> _Options:
        model = body.get("model")
        if model is not None:
            self._check_model(model)
        if body.get("n") not in (None, 1):
            raise bad_request("n must be 1: one answer per request", "n")
        values: dict[str, Any] = {}
        for name, setting in (("max_completion_tokens", "max_new_tokens"), ("max_tokens", "max_new_tokens"),
                              ("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed")):
            if body.get(name) is not None and setting not in values:
                values[setting] = body[name]
        if isinstance(values.get("temperature"), (int, float)) and values["temperature"] > 2:
            raise bad_request("temperature must be between 0 and 2", "temperature")
        if isinstance(values.get("max_new_tokens"), int) and values["max_new_tokens"] < 1:
            raise bad_request("max_tokens must be at least 1", "max_tokens")
        try:
            generation = with_settings(self.engine.cfg.generation, values, "generation")
        except ValueError as e:  # said with OpenAI's names
            message = str(e).replace("generation setting ", "").replace("'max_new_tokens'", "max_tokens")
            raise bad_request(message) from e
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop or []
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOPS:
            raise bad_request(f"stop must be a string or a list of at most {MAX_STOPS} strings", "stop")
        extension = body.get("ibllm") or {}
        if not isinstance(extension, Mapping) or set(extension) - set(EXTENSION_KEYS):
            raise bad_request(f"ibllm must be an object with any of {', '.join(EXTENSION_KEYS)}", "ibllm")
        text, picture = self._answer_form(extension)
        stream_options = body.get("stream_options") or {}
        return _Options(stream=bool(body.get("stream")), generation=generation, stops=stops, extension=extension,
                        include_usage=bool(isinstance(stream_options, Mapping) and stream_options.get("include_usage")),
                        text=text, picture=picture)

    @staticmethod
    def _answer_form(extension: Mapping[str, Any]) -> tuple[bool, PictureConfig | None]:
        """``ibllm.answer_with`` and ``ibllm.picture``: (answer in words, the picture's settings or None)."""
        answer_with = extension.get("answer_with", "text")
        form = ANSWER_WITH.get(answer_with.replace(" ", "")) if isinstance(answer_with, str) else None
        if form is None:
            raise bad_request(f"ibllm.answer_with must be one of {', '.join(map(repr, ANSWER_WITH))}, got "
                              f"{answer_with!r}", "ibllm.answer_with")
        try:  # checked even when no picture is asked for: a misspelt setting is not silently ignored
            picture = with_settings(PictureConfig(), extension.get("picture"), "picture")
            picture.check()
        except ValueError as e:
            raise bad_request(f"ibllm.picture: {e}", "ibllm.picture") from e
        text, drawn = form
        return text, picture if drawn else None

    def _prepare(self, messages: Any, options: _Options) -> ChatCall:
        """The engine's call for a request (its files written, detected and planned as the browser chat plans
        them); runs on a worker thread: decoding base64 and detection read every byte."""
        folder = Path(tempfile.mkdtemp(prefix="ibllm-api-"))
        try:
            read = read_messages(messages, folder, self.settings.max_file_bytes)
            session = ChatSession().follow(normalise_history(read.history), (), self.detect)
            extension = options.extension
            attachments = plan_attachments(session.sent, extension.get("weights"), extension.get("modalities"))
            if not read.question and not attachments:
                raise bad_request("the last user message has no text and the conversation no file to ask about",
                                  "messages")
            try:
                cache = with_settings(self.engine.cfg.visual_cache, extension.get("visual_cache"), "visual_cache")
            except ValueError as e:
                raise bad_request(str(e), "ibllm.visual_cache") from e
            if options.picture is not None:  # refused before any text is answered: the reason the browser chat gives
                try:
                    self.engine.check_picture(attachments)
                except PictureError as e:
                    raise bad_request(str(e), "ibllm.answer_with") from e
            return ChatCall(read.question, session.history, attachments, cache, options.generation, options.stops,
                            folder, text=options.text, picture=options.picture)
        except BaseException:  # the folder is otherwise removed by the call's Completion, after the answer
            shutil.rmtree(folder, ignore_errors=True)
            raise


async def _cancel_when_gone(request: Request, completion: Completion) -> None:
    """Stop ``completion`` when the client disconnects (its body is read: the next message can only be that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    completion.cancel()


def _error(error: ApiError, completion: Completion | None = None, watcher: asyncio.Task | None = None,
           leave: Callable[[], None] | None = None) -> JSONResponse:
    """The error's response; the answer (if one was started), its watcher and its place in line are given up."""
    if completion is not None:
        completion.cancel()
    if watcher is not None:
        watcher.cancel()
    if leave is not None:
        leave()
    return JSONResponse(error.body(), status_code=error.status)
