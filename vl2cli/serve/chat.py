"""OpenAI's chat completions, in vl2's terms: a request body becomes messages, sampling, a budget, a grammar and stop
strings; an answer becomes OpenAI's response body or its chunks. No HTTP here (see app.py), so all of it is testable
without a server.

System messages: DeepSeek-VL2's official processor never puts a system prompt into the token ids, yet clients
(docling, marker) send their instructions there. vl2 folds every system (or developer) message's text, in order,
into the start of the first user turn, separated from it by a blank line, so the model reads them.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from vl2cli.engine.generation import SamplingParams
from vl2cli.engine.grammar import Grammar, GrammarError
from vl2cli.engine.processor import GROUNDING_TOKENS, Message, UserText
from vl2cli.errors import InputError
from vl2cli.extract import schema_grammar
from vl2cli.options import DEFAULT_MAX_PIXELS
from vl2cli.pages import open_image_bytes

MAX_STOP_STRINGS = 4  # as OpenAI
_SPECIAL = re.compile("(" + "|".join(re.escape(t) for t in GROUNDING_TOKENS) + ")")


class ApiError(Exception):
    """An error a client gets as HTTP `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 50 * 1024 * 1024  # a request body or upload (413 above it)
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # per image (400 above it)
    max_images: int = 8  # per chat request (400 above it)
    max_pages: int = 200  # per document request (413 above it)
    max_queue: int = 64  # requests waiting for the model (429 above it)
    allow_remote_images: bool = False  # http(s) image URLs (off: vl2 reads only what the client sends)
    remote_timeout: float = 10.0


@dataclass
class ChatCall:
    """A chat request, understood: what the engine needs, and how to answer."""

    messages: list[Message]
    params: SamplingParams
    max_tokens: int | None
    stream: bool = False
    include_usage: bool = False
    stop: tuple[str, ...] = ()
    grammar: Grammar | None = None
    schema_json: str | None = None  # json_schema: bounded to the budget once it is known
    model: str = ""
    images: list[Image.Image] = field(default_factory=list)

    def grammar_for(self, budget: int) -> Grammar | None:
        """The answer's grammar at its budget: a json_schema is narrowed so that any answer it admits fits."""
        if self.schema_json is None:
            return self.grammar
        try:
            return schema_grammar(self.schema_json, budget)  # compiled once per schema and budget
        except GrammarError as exc:
            raise ApiError(400, f"response_format: {exc}", param="response_format") from None


def _number(body: dict[str, Any], name: str, low: float, high: float, default: float | None) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ApiError(400, f"{name}: expected a number in [{low}, {high}], got {value!r}", param=name)
    return float(value)


def _integer(body: dict[str, Any], name: str, low: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ApiError(400, f"{name}: expected an integer >= {low}, got {value!r}", param=name)
    return value


def parse_chat(body: Any, limits: Limits) -> ChatCall:
    """A chat completions body -> ChatCall; ApiError (400) names the field that is wrong."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for unsupported in ("tools", "functions", "audio"):
        if body.get(unsupported):
            raise ApiError(400, f"{unsupported}: not supported by vl2", param=unsupported)
    if body.get("logprobs") or body.get("top_logprobs"):
        raise ApiError(400, "logprobs: not supported by vl2", param="logprobs")
    if body.get("n", 1) != 1:
        raise ApiError(400, "n: vl2 returns one choice per request (n must be 1)", param="n")
    max_tokens = _integer(body, "max_completion_tokens", 1)
    max_tokens = max_tokens if max_tokens is not None else _integer(body, "max_tokens", 1)
    temperature = _number(body, "temperature", 0.0, 2.0, 0.0)  # omitted: greedy, the reading default
    top_p = _number(body, "top_p", 0.0, 1.0, 1.0)
    if top_p == 0.0:
        raise ApiError(400, "top_p: must be above 0", param="top_p")
    seed = _integer(body, "seed", -(2**63))
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"stop: expected a string or up to {MAX_STOP_STRINGS} non-empty strings", param="stop")
    stream_options = body.get("stream_options") or {}
    call = ChatCall([], SamplingParams(max_tokens or 1, temperature or 0.0, top_p or 1.0, 1.0, seed), max_tokens,
                    stream=bool(body.get("stream")), include_usage=bool(stream_options.get("include_usage")),
                    stop=stops, model=str(body.get("model") or ""))
    _response_format(body.get("response_format"), call)
    call.messages, call.images = _messages(body.get("messages"), limits)
    return call


def _response_format(fmt: Any, call: ChatCall) -> None:
    if fmt is None:
        return
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return
    if kind == "json_object":  # any JSON object; a budget may cut it (finish_reason "length"), as with OpenAI
        call.grammar = Grammar.from_json_schema({"type": "object"})
        return
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ApiError(400, "response_format.json_schema.schema: expected a JSON Schema object",
                           param="response_format")
        call.schema_json = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
        call.grammar_for(call.max_tokens or 4096)  # a schema that cannot compile is refused now, not per token
        return
    raise ApiError(400, f"response_format.type {kind!r}: expected text, json_object or json_schema",
                   param="response_format")


def user_text(text: str) -> list[str]:
    """A client's text as prompt pieces: DeepSeek-VL2's grounding marks (<|ref|>, <|grounding|>, ...) pass through as
    the model's own tokens; everything else is plain text (an `<image>` or `<|User|>` typed by a client stays text)."""
    return [p if p in GROUNDING_TOKENS else UserText(p) for p in _SPECIAL.split(text) if p]


def _messages(raw: Any, limits: Limits) -> tuple[list[Message], list[Image.Image]]:
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "messages: expected a non-empty list", param="messages")
    system: list[str] = []
    turns: list[tuple[str, list[str], list[Image.Image]]] = []
    images: list[Image.Image] = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where}: expected an object", param="messages")
        role = message.get("role")
        if role in ("system", "developer"):
            pieces, found = _content(message.get("content"), where, limits, allow_images=False)
            system.append("".join(pieces))
            continue
        if role not in ("user", "assistant"):
            raise ApiError(400, f"{where}.role {role!r}: expected system, developer, user or assistant",
                           param="messages")
        pieces, found = _content(message.get("content"), where, limits, allow_images=role == "user")
        images += found
        if len(images) > limits.max_images:
            raise ApiError(400, f"{len(images)} images: this server takes at most {limits.max_images} per request",
                           param="messages")
        if turns and turns[-1][0] == role:  # consecutive turns of one role read as one
            turns[-1][1].extend(["\n", *pieces])
            turns[-1][2].extend(found)
        else:
            turns.append((role, pieces, found))
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "messages: the conversation must end with a user message", param="messages")
    if turns[0][0] != "user":
        raise ApiError(400, "messages: the conversation must start with a user message", param="messages")
    if system:
        first = turns[0]
        turns[0] = (first[0], [*user_text("\n\n".join(system)), "\n\n", *first[1]], first[2])
    return [Message(role, pieces, list(found)) for role, pieces, found in turns], images


def _content(content: Any, where: str, limits: Limits, allow_images: bool) -> tuple[list[str], list[Image.Image]]:
    if isinstance(content, str):
        return user_text(content), []
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content: expected a string or a list of parts", param="messages")
    pieces: list[str] = []
    images: list[Image.Image] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces += user_text(part["text"])
        elif kind == "image_url" and allow_images:
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str):
                raise ApiError(400, f"{where}.content[{j}].image_url.url: expected a string", param="messages")
            images.append(load_image(url, f"{where}.content[{j}]", limits))
            pieces.append("<image>\n")  # a template mark: the image goes here, in order
        elif kind == "image_url":
            raise ApiError(400, f"{where}.content[{j}]: only user messages may carry images", param="messages")
        else:
            raise ApiError(400, f"{where}.content[{j}]: expected a text or image_url part", param="messages")
    return pieces, images


_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.ASCII)


def load_image(url: str, where: str, limits: Limits) -> Image.Image:
    """A data: URL (or, when allowed, an http(s) URL) -> an RGB image; ApiError(400) names the part and problem."""
    if url.startswith("data:"):
        match = _DATA_URL.match(url)
        if match is None or not match.group("b64"):
            raise ApiError(400, f"{where}: expected a base64 data URL (data:image/png;base64,...)", param="messages")
        try:
            data = base64.b64decode(url[match.end():], validate=False)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{where}: the base64 image data is malformed", param="messages") from None
    elif url.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            raise ApiError(400, f"{where}: remote image URLs are off on this server (start it with "
                                "--allow-remote-images, or send the image as a base64 data URL)", param="messages")
        data = _fetch(url, where, limits)
    else:
        raise ApiError(400, f"{where}: unsupported image URL scheme (send a base64 data URL)", param="messages")
    if len(data) > limits.max_body_bytes:
        raise ApiError(413, f"{where}: the image is larger than {limits.max_body_bytes} bytes", param="messages")
    try:
        return open_image_bytes(where, data, limits.max_image_pixels)
    except InputError as exc:
        raise ApiError(400, str(exc), param="messages") from None


def _fetch(url: str, where: str, limits: Limits) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=limits.remote_timeout) as response:  # the scheme is http(s): checked above
            data: bytes = response.read(limits.max_body_bytes + 1)
    except Exception as exc:
        raise ApiError(400, f"{where}: cannot fetch the image ({type(exc).__name__}: {str(exc)[:120]})",
                       param="messages") from None
    return data


# ---------------------------------------------------------------------------------------------- answers


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def finish_reason(reason: str) -> str:
    """The engine's reasons in OpenAI's words: a runaway loop or a cut by the budget is 'length'."""
    return "stop" if reason == "stop" else "length"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(cid: str, model: str, content: str, reason: str, prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": None},
                         "logprobs": None, "finish_reason": finish_reason(reason)}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(cid: str, model: str, delta: dict[str, Any], reason: str | None = None,
               include_usage: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                            "model": model, "system_fingerprint": None,
                            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": None if reason is None else finish_reason(reason)}]}
    if include_usage:
        body["usage"] = None  # OpenAI: null on every chunk but the last, which carries it
    return body


class StopText:
    """Stop strings over the decoded answer: where the answer ends, and how much of it is safe to show while
    streaming (never the start of what may turn out to be a stop string)."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops

    def cut(self, text: str) -> tuple[str, bool]:
        """The text before the first stop string, and whether one was found."""
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return (text[:min(found)], True) if found else (text, False)

    def safe(self, text: str) -> str:
        """What may be shown now: the text less any tail that begins a stop string."""
        text, found = self.cut(text)
        if found:
            return text
        hold = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        return text[:len(text) - hold]
