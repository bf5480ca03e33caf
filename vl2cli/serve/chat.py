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
from vl2cli.serve.fetch import FetchError, fetch
from vl2cli.serve.protocol import (
    AnswerMessage,
    ApiError,
    ChatCompletion,
    ChatCompletionChunk,
    ChatMessage,
    ChatRequest,
    Choice,
    ChunkChoice,
    Delta,
    FinishReason,
    ImagePart,
    TextPart,
    Usage,
    parse_request,
)

_SPECIAL = re.compile("(" + "|".join(re.escape(t) for t in GROUNDING_TOKENS) + ")")
# The budget a json_schema is first compiled at when the request sets no max_tokens, so a schema that cannot compile
# is refused before any work: the models' 4,096-token context, the most any answer could have. The request's own
# grammar is compiled again at its real budget (the room its prompt leaves) once the prompt is tokenized.
SCHEMA_CHECK_BUDGET = 4096


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
    clamped_from: int | None = None  # the budget asked for, when the context left less room (the header says it)
    stream: bool = False
    include_usage: bool = False
    stop: tuple[str, ...] = ()
    grammar: Grammar | None = None
    schema_json: str | None = None  # a JSON schema: bounded to the budget once it is known
    constraint: str | None = None  # the request field the grammar or schema came from (errors name it)
    model: str = ""
    images: list[Image.Image] = field(default_factory=list)

    def grammar_for(self, budget: int) -> Grammar | None:
        """The answer's grammar at its budget: a json_schema bounded where it leaves strings and arrays open (sized
        to the budget), with nothing left to a check after decoding (a server answer is not checked again)."""
        if self.schema_json is None:
            return self.grammar
        try:
            return schema_grammar(self.schema_json, budget, relax=False)  # compiled once per schema and budget
        except GrammarError as exc:
            raise ApiError(400, f"{self.constraint}: {exc}", param=self.constraint) from None


def parse_chat(body: Any, limits: Limits) -> ChatCall:
    """A chat completions body -> ChatCall; ApiError (400) names the field that is wrong."""
    request: ChatRequest = parse_request(ChatRequest, body)
    for unsupported in ("tools", "functions", "audio"):
        if getattr(request, unsupported):
            raise ApiError(400, f"{unsupported}: not supported by vl2", param=unsupported)
    if request.logprobs or request.top_logprobs:
        raise ApiError(400, "logprobs: not supported by vl2", param="logprobs")
    for penalty in ("frequency_penalty", "presence_penalty"):  # 0 is OpenAI's default, the same as leaving it out
        if getattr(request, penalty):
            raise ApiError(400, f"{penalty}: not supported by vl2 (send 0 or leave it out)", param=penalty)
    if request.logit_bias:
        raise ApiError(400, "logit_bias: not supported by vl2 (send {} or leave it out)", param="logit_bias")
    if request.n not in (None, 1):
        raise ApiError(400, "n: vl2 returns one choice per request (n must be 1)", param="n")
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    temperature = request.temperature if request.temperature is not None else 0.0  # omitted: greedy, as vl2 reads
    top_p = request.top_p if request.top_p is not None else 1.0
    stops = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    call = ChatCall([], SamplingParams(max_tokens or 1, temperature, top_p, 1.0, request.seed), max_tokens,
                    stream=bool(request.stream),
                    include_usage=bool(request.stream_options and request.stream_options.include_usage),
                    stop=stops, model=request.model)
    _constraint(request, call)
    call.messages, call.images = _messages(request.messages, limits)
    return call


# ---------------------------------------------------------------------------------------------- constraints
# One constraint per request, from OpenAI's response_format or vLLM's extras; each compiles through llguidance.
# vLLM's options that vl2 cannot honour are refused by name, never dropped.

def _constraints(request: ChatRequest) -> list[tuple[str, str, Any]]:
    """(the field, the kind of constraint, its value) for every constraint the request asks for."""
    found: list[tuple[str, str, Any]] = []
    fmt = request.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", "json_object", True))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise ApiError(400, "response_format.json_schema: required with type json_schema",
                           param="response_format.json_schema")
        found.append(("response_format", "json", fmt.json_schema.schema_))
    for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                       ("guided_grammar", "grammar")):
        if getattr(request, name) is not None:
            found.append((name, kind, getattr(request, name)))
    outputs = request.structured_outputs
    if outputs is not None:
        for kind in ("json", "regex", "choice", "grammar", "json_object"):
            value = getattr(outputs, "json_" if kind == "json" else kind)
            if value is not None and value is not False:
                found.append((f"structured_outputs.{kind}", kind, value))
    return found


def _refuse_unsupported(request: ChatRequest) -> None:
    outputs = request.structured_outputs
    unsupported = {
        "structural_tag": request.structural_tag is not None,
        "guided_whitespace_pattern": request.guided_whitespace_pattern is not None,
        "structured_outputs.structural_tag": outputs is not None and outputs.structural_tag is not None,
        "structured_outputs.whitespace_pattern": outputs is not None and outputs.whitespace_pattern is not None,
        "structured_outputs.disable_additional_properties": outputs is not None
        and outputs.disable_additional_properties,
    }
    for name, asked in unsupported.items():
        if asked:
            raise ApiError(400, f"{name}: not supported by vl2 (it constrains answers with a JSON schema, a regex, "
                                "a choice or a Lark grammar)", param=name)


def _constraint(request: ChatRequest, call: ChatCall) -> None:
    _refuse_unsupported(request)
    found = _constraints(request)
    if len(found) > 1:
        raise ApiError(400, f"{found[1][0]}: one constraint per request, and {found[0][0]} is one already",
                       param=found[1][0])
    if not found:
        return
    name, kind, value = found[0]
    call.constraint = name
    try:
        if kind == "json_object":  # any JSON object; a budget may cut it (finish_reason "length"), as with OpenAI
            call.grammar = Grammar.from_json_schema({"type": "object"})
        elif kind == "json":
            schema = json.loads(value) if isinstance(value, str) else value
            if not isinstance(schema, dict):
                raise ApiError(400, f"{name}: expected a JSON Schema object", param=name)
            call.schema_json = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
            call.grammar_for(call.max_tokens or SCHEMA_CHECK_BUDGET)  # a schema that cannot compile is refused now
        elif kind == "regex":
            call.grammar = Grammar.from_regex(value)
        elif kind == "choice":
            if not value:
                raise ApiError(400, f"{name}: expected at least one choice", param=name)
            call.grammar = Grammar.from_lark("start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in value))
        else:
            call.grammar = Grammar.from_lark(value)
    except GrammarError as exc:
        raise ApiError(400, f"{name}: {exc}", param=name) from None
    except ValueError as exc:  # a schema given as JSON text that is not JSON
        raise ApiError(400, f"{name}: not valid JSON ({exc})", param=name) from None


def user_text(text: str) -> list[str]:
    """A client's text as prompt pieces: DeepSeek-VL2's grounding marks (<|ref|>, <|grounding|>, ...) pass through as
    the model's own tokens; everything else is plain text (an `<image>` or `<|User|>` typed by a client stays text)."""
    return [p if p in GROUNDING_TOKENS else UserText(p) for p in _SPECIAL.split(text) if p]


def _messages(raw: list[ChatMessage], limits: Limits) -> tuple[list[Message], list[Image.Image]]:
    system: list[str] = []
    turns: list[tuple[str, list[str], list[Image.Image]]] = []
    images: list[Image.Image] = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if message.role in ("system", "developer"):
            pieces, found = _content(message, where, limits)
            system.append("".join(pieces))
            continue
        pieces, found = _content(message, where, limits)
        images += found
        if len(images) > limits.max_images:
            raise ApiError(400, f"{len(images)} images: this server takes at most {limits.max_images} per request",
                           param="messages")
        if turns and turns[-1][0] == message.role:  # consecutive turns of one role read as one
            turns[-1][1].extend(["\n", *pieces])
            turns[-1][2].extend(found)
        else:
            turns.append((message.role, pieces, found))
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "messages: the conversation must end with a user message", param="messages")
    if turns[0][0] != "user":
        raise ApiError(400, "messages: the conversation must start with a user message", param="messages")
    if system:
        first = turns[0]
        turns[0] = (first[0], [*user_text("\n\n".join(system)), "\n\n", *first[1]], first[2])
    return [Message(role, pieces, list(found)) for role, pieces, found in turns], images


def _content(message: ChatMessage, where: str, limits: Limits) -> tuple[list[str], list[Image.Image]]:
    """A message's text as prompt pieces, with an image mark where each image goes; only user messages may carry
    images. An assistant turn without content (a tool call elsewhere) is empty."""
    if message.content is None:
        if message.role == "user":
            raise ApiError(400, f"{where}.content: required", param=f"{where}.content")
        return [], []
    if isinstance(message.content, str):
        return user_text(message.content), []
    pieces: list[str] = []
    images: list[Image.Image] = []
    for j, part in enumerate(message.content):
        if isinstance(part, TextPart):
            pieces += user_text(part.text)
        elif isinstance(part, ImagePart) and message.role == "user":
            images.append(load_image(part.url, f"{where}.content[{j}]", limits))
            pieces.append("<image>\n")  # a template mark: the image goes here, in order
        else:
            raise ApiError(400, f"{where}.content[{j}]: only user messages may carry images", param="messages")
    return pieces, images


_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.ASCII)


def load_image(url: str, where: str, limits: Limits) -> Image.Image:
    """A data: URL (or, when allowed, an http(s) URL) -> an RGB image; ApiError(400) names the part and problem."""
    if url.startswith("data:"):
        match = _DATA_URL.match(url)
        if match is None or not match.group("b64"):
            raise ApiError(400, f"{where}: expected a base64 data URL (data:image/png;base64,...)", param="messages")
        if not (match.group("mime") or "").lower().startswith("image/"):
            raise ApiError(400, f"{where}: the data URL's type is {match.group('mime') or 'missing'!r}, not an image "
                                "type (data:image/png;base64,...)", param="messages")
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
        return fetch(url, limits.remote_timeout, limits.max_body_bytes)
    except FetchError as exc:
        raise ApiError(400, f"{where}: cannot fetch the image ({exc})", param="messages") from None


# ---------------------------------------------------------------------------------------------- answers


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def finish_reason(reason: str) -> FinishReason:
    """The engine's reasons in OpenAI's words: a runaway loop or a cut by the budget is 'length'."""
    return "stop" if reason == "stop" else "length"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return Usage.of(prompt_tokens, completion_tokens).model_dump()


def completion_body(cid: str, model: str, content: str, reason: str, prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    return ChatCompletion(id=cid, model=model, choices=[Choice(message=AnswerMessage(content=content),
                                                               finish_reason=finish_reason(reason))],
                          usage=Usage.of(prompt_tokens, completion_tokens)).model_dump()


def chunk_body(cid: str, model: str, delta: dict[str, Any], reason: str | None = None,
               include_usage: bool = False) -> dict[str, Any]:
    chunk = ChatCompletionChunk(id=cid, model=model, choices=[ChunkChoice(
        delta=Delta(**delta), finish_reason=None if reason is None else finish_reason(reason))])
    return chunk.body(include_usage)


class StopText:
    """Stop strings over the decoded answer: where the answer ends, and how much of it is safe to show while
    streaming (never the start of what may turn out to be a stop string). Each call is linear in the text: a
    search per stop, and a prefix match of each stop against only the text's last len(stop)-1 characters (the
    protocol bounds stops in number and length)."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.fails = [_prefix_function(s) for s in stops]

    def cut(self, text: str) -> tuple[str, bool]:
        """The text before the first stop string, and whether one was found."""
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return (text[:min(found)], True) if found else (text, False)

    def safe(self, text: str) -> str:
        """What may be shown now: the text less any tail that begins a stop string."""
        text, found = self.cut(text)
        if found:
            return text
        hold = max((_overlap(text, s, fail) for s, fail in zip(self.stops, self.fails)), default=0)
        return text[:len(text) - hold]


def _prefix_function(stop: str) -> list[int]:
    """Knuth-Morris-Pratt: for each i, the length of the longest proper prefix of stop[:i+1] that is also its
    suffix."""
    fail, k = [0] * len(stop), 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = fail[k - 1]
        if stop[i] == stop[k]:
            k += 1
        fail[i] = k
    return fail


def _overlap(text: str, stop: str, fail: list[int]) -> int:
    """The length of the longest proper prefix of `stop` that `text` ends with: the stop's matcher run over the last
    len(stop)-1 characters only (a longer match would be the whole stop, which `cut` has already ruled out)."""
    k = 0
    for ch in text[max(0, len(text) - len(stop) + 1):]:
        while k and stop[k] != ch:
            k = fail[k - 1]
        if stop[k] == ch:
            k += 1
    return k
