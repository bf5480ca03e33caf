"""The OpenAI wire format, as pydantic models: what a chat completions request may hold and what vl2 answers with
(as vLLM's and mlx-vlm's servers do). This is the one place a request body's shape and types are checked.

A field OpenAI knows but vl2 does not use is ignored when it cannot change the answer (user, metadata), as OpenAI
ignores unknown fields; one that would (penalties, logit_bias, tools) is declared so chat.py can refuse it.
A field of the wrong type is a 400 whose message and `param` name it (`max_tokens: expected an integer, got
'100'`). Types are strict (a number in a string is wrong, as with OpenAI). What a value means (roles in
order, images, the budget, grammars) is chat.py's business.

vLLM's structured-output extras (guided_regex, guided_json, guided_choice, guided_grammar, structured_outputs)
are declared here so that a constraint vl2 cannot honour is refused by name, never dropped.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator


class ApiError(Exception):
    """An error a client gets as HTTP `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return ErrorBody(error=ErrorDetail(message=self.message, type=self.kind, param=self.param,
                                           code=self.code)).model_dump()


class _Wire(BaseModel):
    """Strict types, unknown fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


# Unions are picked by the value's JSON type (or a part's "type"), under tags that `_path` leaves out of an
# error's location, so a wrong value is reported at its field, not once per union branch.
_TAGS = {"string", "list", "object", "text part", "image part"}


def _json_type(value: Any) -> str | None:
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return None


def _part_type(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return {"text": "text part", "image_url": "image part"}.get(kind) if isinstance(kind, str) else None


# ---------------------------------------------------------------------------------------------- requests


class ImageURL(_Wire):
    url: str
    detail: str | None = None


class TextPart(_Wire):
    type: Literal["text"]
    text: str


class ImagePart(_Wire):
    type: Literal["image_url"]
    image_url: Annotated[Annotated[ImageURL, Tag("object")] | Annotated[str, Tag("string")],
                         Discriminator(_json_type, custom_error_type="image_url_type",
                                       custom_error_message="expected an object with a 'url'")]

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


ContentPart = Annotated[Annotated[TextPart, Tag("text part")] | Annotated[ImagePart, Tag("image part")],
                        Discriminator(_part_type, custom_error_type="part_type",
                                      custom_error_message="expected a text or image_url part")]


class ChatMessage(_Wire):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[Annotated[str, Tag("string")] | Annotated[list[ContentPart], Tag("list")],
                       Discriminator(_json_type, custom_error_type="content_type",
                                     custom_error_message="expected a string or a list of parts")] | None = None
    name: str | None = None


class JsonSchemaSpec(_Wire):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Wire):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class StreamOptions(_Wire):
    include_usage: bool = False


_SchemaOrText = Annotated[Annotated[dict[str, Any], Tag("object")] | Annotated[str, Tag("string")],
                          Discriminator(_json_type, custom_error_type="schema_type",
                                        custom_error_message="expected a JSON Schema (an object, or its JSON text)")]


class StructuredOutputs(_Wire):
    """vLLM's `structured_outputs` object (its SamplingParams' StructuredOutputsParams): one constraint, and
    options about it."""

    json_: _SchemaOrText | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: Any = None  # not supported: refused by name (see chat.py)
    disable_fallback: bool = False  # vl2 has one grammar engine and never falls back
    disable_any_whitespace: bool = False  # vl2's JSON is always compact
    disable_additional_properties: bool = False  # not supported when true: refused by name
    whitespace_pattern: str | None = None  # not supported: refused by name


class ChatRequest(_Wire):
    """POST /v1/chat/completions."""

    model: str = ""
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)  # as vLLM: a seed the generator takes, or a 400
    stop: Annotated[Annotated[str, Tag("string")] | Annotated[list[str], Tag("list")],
                    Discriminator(_json_type, custom_error_type="stop_type",
                                  custom_error_message="expected a string or a list of strings")] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    response_format: ResponseFormat | None = None
    # what vl2 does not do, declared so that asking for it is a 400 rather than ignored (chat.py refuses them)
    tools: Any = None
    functions: Any = None
    audio: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    # sampling shapers vl2's sampler does not apply: 0 / {} (OpenAI's defaults) are no-ops, anything else a 400
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    # vLLM's extras (sent in the body, e.g. through the openai SDK's extra_body)
    guided_json: _SchemaOrText | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None  # not supported: refused by name
    guided_decoding_backend: str | None = None  # a backend choice, not a constraint: vl2 has one (llguidance)
    structural_tag: Any = None  # not supported: refused by name
    structured_outputs: StructuredOutputs | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if (isinstance(value, list) and not all(value)) or value == "":
            raise ValueError("stop strings must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in ([value] if isinstance(value, str) else value or ())):
            raise ValueError(f"a stop string may be at most {MAX_STOP_CHARS} characters long")
        return value


MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_CHARS = 256  # each: matching a stop costs its length per token streamed


def parse_request(model: type[_Wire], body: Any) -> Any:
    """Validate a parsed JSON body against a request model; ApiError(400) names the first wrong field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


def validation_error(exc: ValidationError) -> ApiError:
    """pydantic's first complaint as OpenAI's 400: `messages[0].content[1].image_url: expected ...`."""
    first = exc.errors(include_url=False)[0]
    where = _path(first["loc"])
    message = _expected(first["type"], first["msg"])
    if first["type"] not in ("missing",) and not isinstance(first.get("input"), (dict, list)):
        message += f", got {_shown(first.get('input'))}"
    return ApiError(400, f"{where}: {message}" if where else message, param=where or None)


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in _TAGS:
            out += f".{part}" if out else part
    return out


_EXPECTED = {"int_type": "expected an integer", "float_type": "expected a number", "string_type": "expected a string",
             "bool_type": "expected true or false", "list_type": "expected a list", "dict_type": "expected an object",
             "model_type": "expected an object", "missing": "required", "int_from_float": "expected an integer"}


def _expected(kind: str, message: str) -> str:
    if kind in _EXPECTED:
        return _EXPECTED[kind]
    message = message.removeprefix("Value error, ")
    return message[0].lower() + message[1:] if message else kind


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------------------------- answers


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


FinishReason = Literal["stop", "length"]


class AnswerMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class Choice(BaseModel):
    index: int = 0
    message: AnswerMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: None = None
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: None = None
    choices: list[ChunkChoice]
    usage: Usage | None = None

    def body(self, include_usage: bool) -> dict[str, Any]:
        """OpenAI's chunk: a delta holds only what it carries; `usage` is present (null but on the last chunk)
        only when the client asked for it with stream_options.include_usage."""
        out = self.model_dump(exclude={"usage"} if not include_usage else set())
        for choice in out["choices"]:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        return out


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vl2"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
