"""What stands between the network and the routes: who may talk to the server, how big a request may be, how long a
connection may dawdle, and the one error shape every refusal and failure leaves in.

Web pages are the threat a keyless loopback server meets: any site the user visits can make the browser send
requests to 127.0.0.1 (a form post, a `text/plain` fetch needs no CORS preflight), and after a DNS rebind it can even
read the answers. So, bound to loopback, only loopback `Host` names are served (a rebound name is not); a request
whose `Origin` (or `Sec-Fetch-Site`) says it comes from another site is refused unless `--allowed-origins` names
it; and the routes take JSON only as `application/json` (see app.py). The page at `/` is same-origin and unaffected.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from vl2cli.serve.chat import ApiError

log = logging.getLogger("vl2cli")
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = ("/health", "/")  # and /static/: what the page needs before it knows the key
COUNTED_ROUTES = {"/v1/chat/completions", "/v1/documents/{task}", "/v1/models", "/v1/models/{model}", "/health",
                  "/metrics", "/"}


@dataclass(frozen=True)
class Gate:
    """Who may talk to the server: the key, whether it is bound to loopback, the origins allowed besides its own."""

    api_key: str | None
    loopback: bool  # bound to a loopback address: only loopback Host names are served (no DNS rebinding)
    allowed_origins: tuple[str, ...] = ()  # browser apps elsewhere (CORS), e.g. "https://app.example.com"
    max_body_bytes: int = 50 * 1024 * 1024


class BodyTooLarge(Exception):
    pass


def is_loopback_host(host: str) -> bool:
    """`localhost` (and its subdomains, which browsers never resolve through DNS) or a loopback address."""
    name = host.rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


def check_origin(origin: str) -> str:
    """An --allowed-origins entry as browsers send it: scheme://host[:port], nothing else."""
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query or parts.fragment:
        raise ValueError(f"--allowed-origins {origin!r}: expected an origin like https://app.example.com")
    return f"{parts.scheme}://{parts.netloc.lower()}"


def error_response(exc: ApiError, headers: dict[str, str] | None = None) -> ASGIApp:
    """OpenAI's error body as a plain ASGI response (used where no route runs)."""
    body = json.dumps(exc.body()).encode()

    async def respond(_scope: Scope, _receive: Receive, send: Send) -> None:
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": exc.status, "headers": raw})
        await send({"type": "http.response.body", "body": body})
    return respond


def internal_error() -> ApiError:
    """What a client learns of a bug: that it happened. The traceback goes to the server's log, never the body."""
    return ApiError(500, "the server failed on this request (its log has the details)", kind="server_error",
                    code="internal_error")


class Guard:
    """The outermost layer (plain ASGI, so a route still sees its client disconnect): counts the route, refuses
    foreign hosts and origins (403), a missing key (401) and oversized bodies (413, counted as they arrive, so a
    chunked upload is caught too), answers CORS for --allowed-origins, and turns any exception that escapes a route
    into OpenAI's 500 body."""

    def __init__(self, app: ASGIApp, gate: Gate, counts: dict[str, int]):
        self.app, self.gate, self.counts = app, gate, counts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        route = counted_route(path)
        self.counts[route] = self.counts.get(route, 0) + 1
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        origin = headers.get("origin")
        request_id = _request_id(headers)
        scope.setdefault("state", {})["request_id"] = request_id
        cors = self._cors(origin)
        extra = {**cors, "x-request-id": request_id}  # every response says which request it answers
        refusal = self._refusal(scope, headers, origin)
        if refusal is not None:
            await error_response(refusal, extra)(scope, receive, send)
            return
        if cors and scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            await _preflight(extra, send)
            return
        started = False

        async def counted_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), *((k.encode(), v.encode()) for k, v in extra.items())]
            await send(message)
        try:
            await self.app(scope, _counted(receive, self.gate.max_body_bytes), counted_send)
        except BodyTooLarge:
            if started:
                raise
            await error_response(too_large(self.gate.max_body_bytes), extra)(scope, receive, send)
        except Exception:
            log.exception("%s %s failed", scope["method"], path)
            if started:  # half an answer is out: the connection is closed, as any server must
                raise
            await error_response(internal_error(), extra)(scope, receive, send)

    def _refusal(self, scope: Scope, headers: dict[str, str], origin: str | None) -> ApiError | None:
        gate, path = self.gate, scope["path"]
        host = headers.get("host", "")
        if gate.loopback and host and not is_loopback_host(_hostname(host)):
            return ApiError(403, "this server is bound to loopback and answers only to a loopback Host name "
                                 "(localhost, 127.0.0.1, [::1])", code="forbidden_host")
        foreign = origin is not None and not self._same_site(origin, host)
        if foreign or (origin is None and headers.get("sec-fetch-site") == "cross-site"):
            return ApiError(403, "requests from other web sites are refused (start the server with "
                                 "--allowed-origins ORIGIN to let a browser app elsewhere use it)",
                            code="forbidden_origin")
        open_path = path in OPEN_PATHS or path.startswith("/static/")
        if gate.api_key and not open_path and not (scope["method"] == "OPTIONS" and origin):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {gate.api_key}".encode()):
                return ApiError(401, "Incorrect API key provided: send it as 'Authorization: Bearer KEY'",
                                code="invalid_api_key")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > gate.max_body_bytes:
            return too_large(gate.max_body_bytes)
        return None

    def _same_site(self, origin: str, host: str) -> bool:
        """The server's own page (its origin is the Host it was loaded from), or an origin allowed by name."""
        if origin.lower() in self.gate.allowed_origins:
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and bool(host) and parts.netloc.lower() == host.lower()

    def _cors(self, origin: str | None) -> dict[str, str]:
        if origin is None or origin.lower() not in self.gate.allowed_origins:
            return {}
        return {"access-control-allow-origin": origin, "vary": "Origin",
                "access-control-expose-headers": "X-Vl2-Pages, X-Vl2-Max-Tokens, X-Request-Id"}


def counted_route(path: str) -> str:
    """The route a path belongs to, as /metrics counts it: a client's made-up paths do not grow the table."""
    if path.startswith("/v1/documents/"):
        return "/v1/documents/{task}"
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return path if path in COUNTED_ROUTES else "other"


def _request_id(headers: dict[str, str]) -> str:
    """The client's own X-Request-Id when it sent a sane one (so its logs and ours meet), else a new one. The openai
    SDK shows it as `_request_id`."""
    given = headers.get("x-request-id", "")
    if 0 < len(given) <= 128 and given.isascii() and given.isprintable():
        return given
    return f"req-{uuid.uuid4().hex}"


def _hostname(host: str) -> str:
    try:
        return urlsplit("//" + host).hostname or ""
    except ValueError:  # a malformed Host header ("[::1")
        return ""


async def _preflight(cors: dict[str, str], send: Send) -> None:
    """A browser app at an allowed origin asks before it sends JSON or a key (Chrome also asks before a public page
    may reach a private address)."""
    headers = {**cors, "access-control-allow-methods": "GET, POST", "access-control-max-age": "600",
               "access-control-allow-headers": "Authorization, Content-Type",
               "access-control-allow-private-network": "true", "content-length": "0"}
    await send({"type": "http.response.start", "status": 204,
                "headers": [(k.encode(), v.encode()) for k, v in headers.items()]})
    await send({"type": "http.response.body", "body": b""})


def _counted(receive: Receive, limit: int) -> Receive:
    """The body counted as it arrives (a chunked upload has no Content-Length): past the limit, BodyTooLarge."""
    seen = 0

    async def counted() -> Message:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise BodyTooLarge()
        return message
    return counted


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request is larger than this server's {limit} byte limit", code="request_too_large")


@dataclass(frozen=True)
class Connections:
    """What uvicorn's HTTP/1.1 protocol is given on top of its own keep-alive timeout."""

    max_connections: int = 256  # open at once; a request on one beyond it gets 503 and the connection is closed
    header_timeout: float = 10.0  # seconds a request's headers may take to arrive (then the connection is closed)
    keep_alive_timeout: int = 5  # seconds an idle connection stays open between requests


class Protocol(H11Protocol):  # type: ignore[misc]
    """uvicorn's h11 protocol plus what it lacks: a deadline for a request's headers (uvicorn waits forever for a
    client that stops half-way through them; nginx's client_header_timeout is the model) and a cap on open connections
    answered in OpenAI's shape (uvicorn's own limit_concurrency answers in plain text)."""

    limits = Connections()

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.header_timer: asyncio.TimerHandle | None = None
        app, connections, cap = self.app, self.connections, self.limits.max_connections
        busy = error_response(ApiError(503, f"the server has {cap} connections open, its limit; retry later",
                                       kind="server_error", code="too_many_connections"), {"connection": "close"})

        async def capped(scope: Scope, receive: Receive, send: Send) -> None:
            await (busy if len(connections) > cap else app)(scope, receive, send)
        self.app = capped

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the request line and headers are in
            self.disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self.arm()  # the next request's headers have the same deadline

    def arm(self) -> None:
        self.disarm()
        self.header_timer = self.loop.call_later(self.limits.header_timeout, self.headers_late)

    def disarm(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def headers_late(self) -> None:
        self.header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def http_protocol(limits: Connections) -> type[Protocol]:
    """The protocol class uvicorn builds each connection with, under these limits."""
    return type("Protocol", (Protocol,), {"limits": limits})
