"""`vl2 serve`: the OpenAI chat completions API, vl2's document endpoint, metrics and a page, over one engine loop.

The HTTP layer parses, calls the library and responds: every model step runs on the engine loop's thread, where
chat requests and document pages share one continuous batch; CPU work (decoding images, tiling, rendering PDFs)
runs in worker threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.staticfiles import StaticFiles

from vl2cli.engine.scheduler import Closed, EngineLoop, QueueFull
from vl2cli.engine.scheduler import Request as EngineRequest
from vl2cli.errors import UsageError
from vl2cli.options import FORM_FIELDS
from vl2cli.reader import AnswerText
from vl2cli.serve.chat import (
    ApiError,
    ChatCall,
    Limits,
    StopText,
    chunk_body,
    completion_body,
    completion_id,
    parse_chat,
    usage,
)
from vl2cli.serve.guard import (
    ASGIApp,
    BodyTooLarge,
    Connections,
    Gate,
    Guard,
    Message,
    Receive,
    Scope,
    Send,
    check_origin,
    http_protocol,
    internal_error,
    is_loopback_host,
    too_large,
)
from vl2cli.serve.protocol import ModelCard, ModelList

if TYPE_CHECKING:
    from vl2cli.pipeline import PageItem
    from vl2cli.reader import Reader
    from vl2cli.results import PageResult

log = logging.getLogger("vl2cli")
DISCONNECT_CHECK_SECONDS = 0.25  # how often a request that is not streamed looks whether its client is still there
DEFAULT_PREFILL_CHUNK = 512  # tokens per prefill step: running decodes wait at most this long for a new prompt
FORMAT_MEDIA_TYPES = {"markdown": "text/markdown; charset=utf-8", "text": "text/plain; charset=utf-8",
                      "html": "text/html; charset=utf-8", "csv": "text/csv; charset=utf-8",
                      "jsonl": "application/x-ndjson"}
DOCUMENT_TASKS = ("ocr", "ask", "table", "chart", "ground", "caption", "extract")
MAX_TOKENS_POLICIES = ("clamp", "refuse")
DOCUMENT_FIELDS = set(FORM_FIELDS)  # the option table's form fields (vl2cli/options.py)


@dataclass
class ServeSettings:
    model_id: str  # what /v1/models lists and clients send
    aliases: tuple[str, ...] = ()  # other names a client may send for the same model
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    max_batch: int = 8
    drain_seconds: float = 30.0
    allowed_origins: tuple[str, ...] = ()  # browser apps elsewhere that may use the server (CORS)
    connections: Connections = field(default_factory=Connections)
    # an answer budget beyond what the context leaves: lowered to it ("clamp", as vl2's CLI does; clients such as
    # olmOCR and docling ask for more than a 4k context holds) or refused with OpenAI's 400 ("refuse")
    max_tokens_policy: str = "clamp"

    def __post_init__(self) -> None:
        if self.max_tokens_policy not in MAX_TOKENS_POLICIES:
            raise UsageError(f"max_tokens policy {self.max_tokens_policy!r}: expected clamp or refuse")


class Server:
    """What the routes share: the reader, its engine loop, the settings and the counters."""

    def __init__(self, reader: Reader, settings: ServeSettings):
        self.reader, self.settings = reader, settings
        self.chunk_was = reader.engine.prefill_chunk
        if reader.engine.prefill_chunk is None:
            reader.engine.prefill_chunk = DEFAULT_PREFILL_CHUNK
        self.loop = EngineLoop(reader.engine, settings.max_batch, settings.limits.max_queue)
        reader.loop = self.loop  # documents read through the same loop as chats
        self.documents = 0
        self.http_requests: dict[str, int] = {}
        self.max_prompt_chars = reader.context * _longest_token(reader)
        self.draining = False

    def check_model(self, name: str) -> None:
        if name and name not in (self.settings.model_id, *self.settings.aliases):
            raise ApiError(404, f"The model {name!r} does not exist: this server serves {self.settings.model_id!r}",
                           kind="invalid_request_error", param="model", code="model_not_found")

    def stop_rule(self, stops: StopText, bounded: bool) -> Callable[[list[int], bool], str | None]:
        """Loops end an answer (finish_reason 'length'); so does a stop string ('stop'). Inside a grammar that
        bounds the answer (a JSON schema sized to the budget) repetition is not a runaway; a client's regex or Lark
        grammar may loop without end (olmOCR's `[\\s\\S]+`), so there loops are watched as in free text."""
        reader = self.reader
        text = AnswerText(reader)  # each token decoded once, on the engine thread: no re-decode from the start
        longest = max((len(stop) for stop in stops.stops), default=0)

        def rule(ids: list[int], constrained: bool) -> str | None:
            if stops.stops:
                new = text.feed(ids)
                # a stop string that ends in the new characters lies within them and the len(stop) - 1 before
                if new and stops.cut(text.tail(longest - 1 + len(new)))[1]:
                    return "stop"
            return reader.stop_rule(ids, constrained and bounded)
        return rule

    def close(self) -> None:
        """Drain briefly and give the reader back to its owner (reading on the caller's thread again)."""
        self.draining = True
        self.loop.drain(1.0)
        self.reader.loop, self.reader.engine.prefill_chunk = None, self.chunk_was

    def drain(self) -> None:
        self.draining = True
        queued = self.loop.drain(self.settings.drain_seconds)
        if queued:  # logged: the drain runs on a signal, with nobody else to tell
            log.warning("vl2 serve: %d queued request(s) refused with 503 while shutting down", queued)


def _longest_token(reader: Reader) -> int:
    """The most characters one token can stand for: a byte-level vocabulary's longest entry (a text longer than
    context x this cannot fit the context however it tokenizes). A tokenizer that normalizes may fold several
    characters into one, so it gets a margin."""
    tok = reader.loaded.processor.tokenizer.tok
    longest = max(len(t) for t in tok.get_vocab(with_added_tokens=True))
    return longest if tok.normalizer is None else 4 * longest


class AccessLog:
    """One line per request when its response has ended (streams included): method, path, status, tokens generated,
    seconds. Never a body, a query string or a header (they may hold documents or keys). Logged at INFO on the
    `vl2cli` logger (`vl2 serve --log-level`)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 0
        state = scope.setdefault("state", {})

        async def noted_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, noted_send)
        finally:
            tokens = state.get("generated_tokens")
            said = f" {tokens()} tokens" if callable(tokens) else ""
            log.info("%s %s %s%s %.2f s", scope["method"], scope["path"], status or "-", said,
                     time.perf_counter() - started)


def create_app(reader: Reader, settings: ServeSettings, host: str = "127.0.0.1") -> FastAPI:
    """The app for a server bound to `host` (bound to loopback, it answers only to loopback Host names)."""
    origins = tuple(check_origin(o) for o in settings.allowed_origins)
    server = Server(reader, settings)
    app = FastAPI(title="vl2", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    gate = Gate(settings.api_key, is_loopback_host(host), origins, settings.limits.max_body_bytes)
    app.add_middleware(Guard, gate=gate, counts=server.http_requests)
    app.add_middleware(AccessLog)  # added last: outermost, so refusals and errors are logged too
    _error_handlers(app)
    _chat_routes(app, server)
    _document_routes(app, server)
    _info_routes(app, server)
    static = resources.files("vl2cli.serve") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    return app


# ---------------------------------------------------------------------------------------------- errors


def _error_handlers(app: FastAPI) -> None:
    """Every refusal in OpenAI's shape: ours, starlette's (404, 405, a malformed form) and FastAPI's validation
    (422 with its own body otherwise), with no Python reprs in the message."""

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return _error(ApiError(404, f"no route {request.method} {request.url.path}", code="not_found"))
        if exc.status_code == 405:
            return _error(ApiError(405, f"{request.method} is not allowed on {request.url.path}"))
        return _error(ApiError(exc.status_code, str(exc.detail),
                               kind="server_error" if exc.status_code >= 500 else "invalid_request_error"))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return _error(ApiError(400, f"{where}: {first.get('msg', 'invalid')}", param=where))

    @app.exception_handler(BodyTooLarge)
    async def too_large_body(_request: Request, _exc: BodyTooLarge) -> JSONResponse:
        return _error(too_large(app.state.server.settings.limits.max_body_bytes))

    @app.exception_handler(Exception)
    async def bug(_request: Request, _exc: Exception) -> JSONResponse:  # the Guard logs and answers first; a backstop
        return _error(internal_error())


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _parse_json(raw: bytes) -> Any:
    """A JSON body, or ApiError(400) saying what is wrong with it in words (never a parser's repr)."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8") from None
    except ValueError as exc:
        raise ApiError(400, f"the request body is not valid JSON ({str(exc)[:120]})") from None
    if _SURROGATE_ESCAPE.search(raw):  # only an escape can make one: raw UTF-8 never holds a surrogate
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "the request body holds a lone surrogate escape (\\ud800-\\udfff): not text") \
                from None
    return body


async def _json_body(request: Request) -> Any:
    """The body as JSON, only when sent as JSON: a web page can send `text/plain` to any server without asking (a
    CORS "simple request"), never `application/json`. Parsed in a worker thread (a large body would stall the loop)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, f"expected Content-Type: application/json, got {kind or 'none'!r}",
                       code="unsupported_media_type")
    try:
        raw = await request.body()
    except ClientDisconnect:
        raise ApiError(400, "the client went away while sending") from None
    return await run_in_threadpool(_parse_json, raw)


# ---------------------------------------------------------------------------------------------- chat


class _Handover:
    """Items from a worker thread (the engine loop, a document's pipeline) to the event loop, through an asyncio
    queue; None marks the end."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.event_loop = asyncio.get_running_loop()
        self.look_at = time.monotonic() + DISCONNECT_CHECK_SECONDS

    def _put(self, item: Any) -> None:
        try:
            self.event_loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (the server is stopping): nobody is listening
            pass

    async def next(self, http: Request) -> Any:
        """The next item, or GONE once the client has disconnected: looked at every DISCONNECT_CHECK_SECONDS, whether
        items are arriving (a running answer's tokens) or not (a queued request)."""
        while True:
            if time.monotonic() >= self.look_at:
                self.look_at = time.monotonic() + DISCONNECT_CHECK_SECONDS
                if await http.is_disconnected():
                    return GONE
            try:
                return await asyncio.wait_for(self.queue.get(), timeout=DISCONNECT_CHECK_SECONDS)
            except asyncio.TimeoutError:
                pass


GONE = object()


class _Answer(_Handover):
    """The engine thread's tokens for one chat request: token ids, None at the end."""

    def on_token(self, token: int) -> None:
        self._put(token)

    def on_end(self, _request: EngineRequest) -> None:
        self._put(None)


def _chat_routes(app: FastAPI, server: Server) -> None:
    reader, settings = server.reader, server.settings

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        body = await _json_body(request)
        call = await run_in_threadpool(parse_chat, body, settings.limits)
        server.check_model(call.model)
        engine_request = await run_in_threadpool(_engine_request, server, call)
        answer = _Answer()
        engine_request.on_token = answer.on_token
        _submit(server, engine_request, answer.on_end)
        request.state.generated_tokens = lambda: len(engine_request.result.ids)  # for the access log, at the end
        model = settings.model_id
        headers = {} if call.clamped_from is None else {
            "X-Vl2-Max-Tokens": f"{engine_request.budget}; asked={call.clamped_from}"}
        if call.stream:
            return StreamingResponse(_stream(server, call, engine_request, answer, model),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})
        await _until_done(request, server, engine_request, answer)
        text, _ = StopText(call.stop).cut(reader.decode(engine_request.result.ids))
        gen = engine_request.result
        return JSONResponse(completion_body(completion_id(), model, text, gen.finish_reason,
                                            gen.prompt_tokens, len(gen.ids)), headers=headers)


def _engine_request(server: Server, call: ChatCall) -> EngineRequest:
    """Tokenise and tile (CPU work, in a worker thread), size the budget, compile the grammar."""
    reader = server.reader
    chars = sum(len(piece) for m in call.messages for piece in ([m.content] if isinstance(m.content, str) else m.content))
    if chars > server.max_prompt_chars:  # refused before tokenizing: the work stays bounded by the context
        raise ApiError(400, f"This model's maximum context length is {reader.context} tokens; the messages hold "
                            f"{chars} characters, more than any {reader.context} tokens can spell (at most "
                            f"{server.max_prompt_chars}). Please reduce the length of the messages.",
                       param="messages", code="context_length_exceeded")
    try:
        prepared = reader.loaded.processor.prepare(call.messages)
    except UsageError as exc:
        raise ApiError(400, str(exc), param="messages") from None
    context = reader.context
    prompt = len(prepared.input_ids)
    room = context - prompt
    wanted = call.max_tokens if call.max_tokens is not None else room
    if room <= 0 or (wanted > room and server.settings.max_tokens_policy == "refuse"):
        raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                            f"{prompt + max(wanted, 1)} tokens ({prompt} in the messages, {max(wanted, 1)} in the "
                            "completion). Please reduce the length of the messages or completion.",
                       param="messages", code="context_length_exceeded")
    if wanted > room:  # lowered, and said: the answer ends with finish_reason "length" if it reaches the room left
        call.clamped_from, wanted = wanted, room
    call.params.max_new_tokens = wanted
    return EngineRequest(prepared, call.params, wanted, call.grammar_for(wanted),
                         server.stop_rule(StopText(call.stop), bounded=call.schema_json is not None))


def _submit(server: Server, request: EngineRequest, on_end: Callable[[EngineRequest], None]) -> None:
    try:
        server.loop.submit(request, on_end)
    except QueueFull as exc:
        raise _busy(exc) from None
    except Closed as exc:  # shutting down, or the engine thread is gone (its reason)
        if server.draining:
            raise _shutting_down() from None
        raise ApiError(503, str(exc), kind="server_error", code="engine_down") from None


def _busy(why: object) -> ApiError:
    return ApiError(429, f"the server is busy ({why}); retry later", kind="rate_limit_error", code="queue_full")


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", kind="server_error", code="shutting_down")


def _ended_badly(request: EngineRequest) -> ApiError | None:
    if request.failure is not None:
        return ApiError(500, f"the model failed on this request ({request.failure.message})", kind="server_error")
    if request.result.finish_reason == "cancelled":
        return ApiError(503, "the server is shutting down", kind="server_error", code="shutting_down")
    return None


async def _until_done(http: Request, server: Server, request: EngineRequest, answer: _Answer) -> None:
    """Wait for the answer; a client that goes away cancels it (its row leaves the batch at the next step)."""
    while (item := await answer.next(http)) is not None:
        if item is GONE:
            server.loop.cancel(request)
            raise ApiError(499, "the client closed the request")
    bad = _ended_badly(request)
    if bad is not None:
        raise bad


async def _stream(server: Server, call: ChatCall, request: EngineRequest, answer: _Answer,
                  model: str) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with [DONE]. A client that disconnects cancels the
    generator (starlette), and with it the request."""
    cid, stops, decode = completion_id(), StopText(call.stop), server.reader.decode
    text, shown, longest = AnswerText(server.reader), "", max((len(stop) for stop in call.stop), default=0)
    shown_to = 0  # characters of the raw text shown so far (the answer's leading whitespace included)

    def event(body: dict[str, Any]) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
    try:
        yield event(chunk_body(cid, model, {"role": "assistant", "content": ""}, include_usage=call.include_usage))
        while (item := await answer.queue.get()) is not None:
            del item
            if not text.feed(request.result.ids):
                continue  # no new whole character
            # What is shown holds no stop string nor the start of one at its end: only its last len(stop) - 1
            # characters and the new ones can begin one, so only they are searched (a cost per token independent
            # of the answer's length). Trailing whitespace waits for what follows it (the answer is stripped).
            start = max(0, shown_to - max(0, longest - 1))
            window = text.tail(text.length - start)
            end = start + len(stops.safe(window).rstrip())
            if end > shown_to:
                piece = window[shown_to - start:end - start]
                piece = piece if shown else piece.lstrip()
                shown_to = end
                if piece:
                    shown += piece
                    yield event(chunk_body(cid, model, {"content": piece}, include_usage=call.include_usage))
        bad = _ended_badly(request)
        if bad is not None:
            yield event(bad.body())
        else:
            final, _ = stops.cut(decode(request.result.ids))
            if final.startswith(shown) and len(final) > len(shown):
                yield event(chunk_body(cid, model, {"content": final[len(shown):]}, include_usage=call.include_usage))
            yield event(chunk_body(cid, model, {}, request.result.finish_reason, include_usage=call.include_usage))
            if call.include_usage:
                last = chunk_body(cid, model, {})
                last["choices"] = []
                last["usage"] = usage(request.result.prompt_tokens, len(request.result.ids))
                yield event(last)
        yield "data: [DONE]\n\n"
    finally:
        if not request.done:
            server.loop.cancel(request)


# ---------------------------------------------------------------------------------------------- documents


class _DocumentSink:
    """Hands each page record to the event loop as the pipeline finishes it."""

    def __init__(self, put: Callable[[Any], None]):
        self.put = put

    def done(self, _item: PageItem) -> bool:
        return False

    def emit(self, _item: PageItem, result: PageResult, _page: Any) -> PageResult:
        self.put(result)
        return result


def _document_routes(app: FastAPI, server: Server) -> None:
    @app.post("/v1/documents/{task}", response_model=None)
    async def documents(task: str, request: Request) -> Response:
        if task not in DOCUMENT_TASKS:
            raise ApiError(404, f"unknown task {task!r}: expected one of {', '.join(DOCUMENT_TASKS)}", param="task")
        stream = _flag(request.query_params.get("stream"), "stream")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "multipart/form-data":
            raise ApiError(415, f"expected a multipart/form-data upload, got Content-Type {kind or 'none'!r}",
                           code="unsupported_media_type")
        if server.draining:
            raise _shutting_down()
        waiting, bound = server.loop.queue_depth, server.settings.limits.max_queue
        if waiting >= bound:  # refused before the upload is read (a page that finds it full later waits its turn)
            raise _busy(f"{waiting} requests are waiting (the bound is {bound})")
        try:
            form = await request.form(max_files=1, max_fields=len(DOCUMENT_FIELDS) + 1)
        except ClientDisconnect:
            raise ApiError(400, "the client went away while sending") from None
        except BodyTooLarge:
            raise
        except Exception as exc:  # python-multipart's errors on a malformed body
            raise ApiError(400, f"expected a multipart/form-data upload with a 'file' part ({exc})") from None
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "expected a multipart/form-data upload with a 'file' part", param="file")
        words = {k: v for k, v in form.items() if k != "file" and isinstance(v, str)}
        unknown = sorted(set(words) - DOCUMENT_FIELDS)
        if unknown:
            raise ApiError(400, f"unknown option(s) {', '.join(unknown)}: expected {', '.join(sorted(DOCUMENT_FIELDS))}")
        data = await upload.read()
        name = _client_name(upload.filename)
        job = await run_in_threadpool(_plan_document, server, task, name, data, words)
        return await _run_document(request, server, job, stream)


def _flag(value: str | None, name: str) -> bool:
    """A query flag: absent, true or false (also 1/0, yes/no, on/off); anything else is a 400."""
    if value is None:
        return False
    word = value.strip().lower()
    if word in ("true", "1", "yes", "on", ""):
        return True
    if word in ("false", "0", "no", "off"):
        return False
    raise ApiError(400, f"{name}: expected true or false, got {value[:40]!r}", param=name)


def _client_name(filename: str | None) -> str:
    """The upload's name as records show it: its last path part, never a server path."""
    name = (filename or "upload").replace("\\", "/").rsplit("/", 1)[-1].strip()
    return "".join(c for c in name if c.isprintable())[:200] or "upload"


@dataclass
class _DocumentJob:
    job: Any
    work: list[Any]
    folder: tempfile.TemporaryDirectory
    failed: list[PageResult]


def _document_options(server: Server, task: str, words: dict[str, str]) -> tuple[Any, Any, Any]:
    """The form's words as the CLI's options (the option table's fields, the same defaults and checks, through
    the same resolver); ApiError(400) says which is wrong."""
    from vl2cli.resolve import resolve_options
    fmt = _format_and_pages(task, words)
    given: dict[str, Any] = {"fmt": fmt}
    try:
        for word, value in words.items():
            option = FORM_FIELDS[word]
            given[option.name] = _form_value(word, value, option.type)
        resolved = resolve_options(task, {**given, "max_pixels": server.settings.limits.max_image_pixels,
                                          "batch_size": server.settings.max_batch})
        server.reader.check_mode(resolved.read.ocr_mode)
    except RecursionError:
        raise ApiError(400, "the schema or fields are nested too deeply") from None
    except (UsageError, ValueError) as exc:
        raise ApiError(400, str(exc)) from None
    if task in ("ask", "ground") and not resolved.read.text:
        raise ApiError(400, f"{task}: give the {'question' if task == 'ask' else 'object to find'} as 'question'",
                       param="question")
    return resolved.task, resolved.read, resolved.pages


def _form_value(word: str, value: str, kind: Any) -> Any:
    """A form field's text as its option's type (a ValueError says why not)."""
    if kind is int:
        if not value.strip().lstrip("-").isdigit():
            raise ApiError(400, f"{word} {value!r}: expected a whole number", param=word)
        return int(value)
    if kind is float:
        return float(value)
    if kind == bool | None:
        return value.lower() in ("1", "true", "yes", "on")
    return value


def _format_and_pages(task: str, words: dict[str, str]) -> str:
    """The format asked for (one the task writes) once `pages` is known to read as page numbers; else a 400."""
    from vl2cli.pages import parse_page_ranges
    from vl2cli.tasks import get_task
    fmt = words.get("format", "json")
    if fmt not in get_task(task).formats:
        raise ApiError(400, f"format {fmt[:40]!r}: {task} writes {', '.join(get_task(task).formats)}", param="format")
    if fmt == "docling":
        from vl2cli.docling import check_docling
        try:
            check_docling()
        except UsageError as exc:
            raise ApiError(400, str(exc), param="format") from None
    try:
        parse_page_ranges(words.get("pages"))
    except UsageError as exc:
        raise ApiError(400, str(exc).replace("--pages", "pages"), param="pages") from None
    return fmt


def _plan_document(server: Server, task: str, name: str, data: bytes, words: dict[str, str]) -> _DocumentJob:
    """Options checked, the upload written to a private folder and planned (pages, limits); records and errors
    name the client's file, never the server's path."""
    from vl2cli.pipeline import Job, ListSink, Summary, plan_inputs, plan_work
    task_obj, read, page_opts = _document_options(server, task, words)
    limits = server.settings.limits
    folder = tempfile.TemporaryDirectory(prefix="vl2-upload-")
    path = Path(folder.name) / "upload"
    try:
        path.write_bytes(data)
        try:
            sources, _ = plan_inputs(_named(str(path), name), page_opts, strict=True)
        except UsageError as exc:  # pages past the end among them: a 400, never an empty answer
            raise ApiError(400, str(exc).replace(str(path), name).replace("--pages", "pages"), param="pages") from None
        for source in sources:
            source.label = name
            if source.error:
                raise ApiError(400, source.error.replace(str(path), name))
            if len(source.numbers) > limits.max_pages:
                raise ApiError(413, f"{name}: {len(source.numbers)} pages to read; this server reads at most "
                                    f"{limits.max_pages} per request (choose some with 'pages')",
                               code="too_many_pages")
    except BaseException:
        folder.cleanup()
        raise
    template = task_obj.template(read.prompt_file, server.reader.family, read.plain)
    job = Job(task_obj, read, page_opts, words.get("format", "json"), server.settings.model_id, template)
    sink = ListSink()
    work = plan_work(job, sources, sink, Summary())
    return _DocumentJob(job, work, folder, sink.results)


def _named(path: str, name: str) -> Any:
    from vl2cli.pages import Inputs
    return Inputs([path], {path: name})


class _DocumentRun(_Handover):
    """One document request's pages on the reading pipeline (in its own thread, generating through the engine
    loop); its records come back through the handover queue, None after the last."""

    def __init__(self, server: Server, planned: _DocumentJob):
        from vl2cli.pipeline import StopFlag
        super().__init__()
        self.server, self.planned = server, planned
        self.stop = StopFlag()
        self.total = len(planned.work) + len(planned.failed)
        self.ended = False
        self.generated_tokens = 0
        threading.Thread(target=self._work, daemon=True, name="vl2-document").start()

    def _work(self) -> None:
        from vl2cli.pipeline import Summary, run_work
        try:
            run_work(self.server.reader, self.planned.job, self.planned.work, _DocumentSink(self._put),
                     Summary(), stop=self.stop)
        except QueueFull as exc:  # its first page found the queue full (later pages wait for their turn)
            self._put(_busy(exc))
        except Closed:  # the server began shutting down before every page was queued
            self._put(_shutting_down())
        except Exception:  # reported to the client as a server error, not lost in a thread
            log.exception("document request failed")
            self._put(internal_error())
        finally:
            self.planned.folder.cleanup()
            self._put(None)

    async def records(self, http: Request) -> AsyncIterator[PageResult | ApiError]:
        """Records as pages finish; a client that goes away (or stops reading) cancels the pages left."""
        for failed in self.planned.failed:
            yield failed
        try:
            while (item := await self.next(http)) is not GONE:
                if item is None:
                    self.ended = True
                    return
                self.generated_tokens += getattr(item, "generated_tokens", 0)
                yield item
        finally:
            if not self.ended:  # the response ended early: the pages left are not read
                self.stop.cancelled = True


async def _run_document(http: Request, server: Server, planned: _DocumentJob, stream: bool) -> Response:
    server.documents += 1
    run = _DocumentRun(server, planned)
    http.state.generated_tokens = lambda: run.generated_tokens  # for the access log, at the end
    headers = {"X-Vl2-Pages": str(run.total)}
    if stream:
        async def lines() -> AsyncIterator[str]:
            records, refused = 0, False
            async for item in run.records(http):
                refused |= isinstance(item, ApiError)
                records += not isinstance(item, ApiError)
                body = item.body() if isinstance(item, ApiError) else item.to_json()
                yield json.dumps(body, ensure_ascii=False) + "\n"
            if records < run.total and not refused and server.draining and run.ended:
                yield json.dumps(_shutting_down().body()) + "\n"  # pages left unread: why, as the last line
        return StreamingResponse(lines(), media_type="application/x-ndjson", headers=headers)
    done: list[PageResult] = []
    async for item in run.records(http):
        if isinstance(item, ApiError):
            raise item
        done.append(item)
    if len(done) < run.total:
        if server.draining:
            raise _shutting_down()
        raise ApiError(499, "the client closed the request")
    done.sort(key=lambda r: r.page)
    job = planned.job
    if job.task.whole_document:  # ocr: the document's furniture, found across its pages as the CLI finds it
        from vl2cli.document import settle_furniture
        done = settle_furniture(done)
    if job.fmt == "json":
        return JSONResponse([r.to_json() for r in done], headers=headers)
    if job.fmt == "docling":  # the document's DoclingDocument
        from vl2cli.docling import docling_json
        return Response(docling_json(done), media_type="application/json", headers=headers)
    body = job.task.render_all(done, job.fmt, job.read.schema_json)  # the body `vl2 TASK -f FMT` prints
    return Response(body, media_type=FORMAT_MEDIA_TYPES[job.fmt], headers=headers)


# ---------------------------------------------------------------------------------------------- info


def _info_routes(app: FastAPI, server: Server) -> None:
    settings, started = server.settings, int(time.time())

    @app.get("/health", response_model=None)
    async def health() -> dict[str, Any] | JSONResponse:
        """503 with the reason when the engine thread is gone or has work but makes no step (as TGI's does)."""
        down = server.loop.health()
        if down is not None:
            return JSONResponse({"status": "unavailable", "reason": down, "model": settings.model_id}, 503)
        return {"status": "draining" if server.draining else "ok", "model": settings.model_id}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return ModelList(data=[ModelCard(id=settings.model_id, created=started)]).model_dump()

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        server.check_model(name)
        return ModelCard(id=settings.model_id, created=started).model_dump()

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(_metrics(server), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        html = (resources.files("vl2cli.serve") / "static" / "index.html").read_text(encoding="utf-8")
        return HTMLResponse(html.replace("{{MODEL}}", settings.model_id))


def _metrics(server: Server) -> str:
    s = server.loop.stats
    tpot = s.step_seconds / s.steps if s.steps else 0.0
    lines = [
        ("vl2_requests_total", "counter", "Generation requests taken by the engine (chat and document pages)",
         s.requests),
        ("vl2_requests_failed_total", "counter", "Generation requests that failed", s.failed),
        ("vl2_requests_cancelled_total", "counter", "Generation requests cancelled (a client went away, or a "
                                                     "shutdown)", s.cancelled),
        ("vl2_documents_total", "counter", "Document requests", server.documents),
        ("vl2_prompt_tokens_total", "counter", "Prompt tokens prefilled", s.prompt_tokens),
        ("vl2_generated_tokens_total", "counter", "Tokens generated", s.generated_tokens),
        ("vl2_queue_depth", "gauge", "Requests waiting for a place in the batch", server.loop.queue_depth),
        ("vl2_running_batch_size", "gauge", "Requests in the running batch", server.loop.running),
        ("vl2_time_per_output_token_seconds", "gauge", "Mean seconds per decode step (each running request "
                                                        "gets one token per step)", round(tpot, 6)),
        ("vl2_decode_steps_total", "counter", "Decode steps run", s.steps),
        ("vl2_engine_up", "gauge", "1 while the engine thread is alive and stepping, else 0 (see /health)",
         int(server.loop.health() is None)),
        ("vl2_kv_cache_capacity_tokens", "gauge", "KV cache positions allocated, all slots (batch slots x context)",
         server.loop.cache_capacity),
        ("vl2_kv_cache_used_tokens", "gauge", "KV cache positions holding live tokens now", server.loop.cache_used),
    ]
    out = []
    for name, kind, text, value in lines:
        out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    out += ["# HELP vl2_http_requests_total HTTP requests by path", "# TYPE vl2_http_requests_total counter"]
    out += [f'vl2_http_requests_total{{path="{p}"}} {n}' for p, n in sorted(server.http_requests.items())]
    return "\n".join(out) + "\n"


def model_names(spec: str, folder: Path) -> tuple[str, tuple[str, ...]]:
    """The id clients should send (the official hub id where there is one, else the folder's name) and the other
    names accepted for it (what was given to --model)."""
    from vl2cli.engine.hub import ALIASES
    bare = spec.removeprefix("hf:")
    model_id = ALIASES.get(spec, bare if bare in ALIASES.values() else folder.name)
    return model_id, tuple(dict.fromkeys(n for n in (spec, bare, folder.name) if n != model_id))


@contextlib.contextmanager
def serve_in_thread(reader: Reader, settings: ServeSettings, host: str = "127.0.0.1",
                    port: int = 0) -> Iterator[tuple[str, Server]]:
    """The server on a background thread, for as long as the block runs: (its base URL, the Server). For tests,
    benchmarks and programs that embed vl2; `port=0` takes a free port."""
    import uvicorn

    app = create_app(reader, settings, host)
    runner = uvicorn.Server(_uvicorn_config(app, settings, host, port))
    thread = threading.Thread(target=runner.run, daemon=True, name="vl2-http")
    thread.start()
    deadline = time.monotonic() + 60
    while not runner.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = runner.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}", app.state.server
    finally:
        runner.should_exit = True
        thread.join(timeout=30)
        app.state.server.close()


def serve(reader: Reader, settings: ServeSettings, host: str, port: int,
          ready: Callable[[str], None] | None = None) -> None:
    """Run until a signal; the first one drains (running requests finish within the drain time, queued ones get
    503), then the process leaves."""
    import uvicorn

    app = create_app(reader, settings, host)
    server: Server = app.state.server

    class Uvicorn(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            # The drain starts here, on the event loop, not in the signal handler: a handler that starts a thread
            # can deadlock on threading's own lock when the signal lands while the main thread is starting one.
            if not server.draining:
                log.warning("vl2 serve: draining: %d running and %d queued request(s) (at most %.0f s)",
                            server.loop.running, server.loop.queue_depth, settings.drain_seconds)
                threading.Thread(target=server.drain, daemon=True, name="vl2-drain").start()
            await super().shutdown(sockets)
            log.warning("vl2 serve: stopped")

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if ready is not None and self.started:
                ready(f"http://{host}:{self.servers[0].sockets[0].getsockname()[1] if port == 0 else port}")

    Uvicorn(_uvicorn_config(app, settings, host, port, timeout_graceful_shutdown=int(settings.drain_seconds) + 5)).run()


def _uvicorn_config(app: FastAPI, settings: ServeSettings, host: str, port: int, **extra: Any) -> Any:
    """uvicorn with vl2's HTTP/1.1 protocol (a header deadline, a connection cap) and its keep-alive timeout."""
    import uvicorn
    limits = settings.connections
    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, http=http_protocol(limits),
                          timeout_keep_alive=limits.keep_alive_timeout, ws="none", lifespan="off", **extra)
