"""Typed results: one PageResult per page (every command, every sink) and one AskResult per `vl2 ask` question.

`to_json()` emits exactly the documented record, every key always present, in a fixed order; the JSON
Schemas in `vl2cli/schemas/` describe them and the tests validate real outputs against them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["ok", "failed", "interrupted"]

# Task fields: present in every record of that task (these values when the page failed).
TASK_FIELDS: dict[str, dict[str, Any]] = {
    "ocr": {"blocks": [], "furniture": []},
    "ask": {},
    "table": {"tables": []},
    "chart": {"description": None, "data": None},
    "ground": {"objects": [], "caption": ""},
    "caption": {"objects": [], "caption": ""},
    "extract": {"data": None, "warnings": []},
}
SCHEMA_FILES = {"page": "page-record.schema.json", "ask": "ask-record.schema.json"}


@dataclass(frozen=True)
class Split:
    bands: int
    reason: Literal["dense", "budget", "forced"]


@dataclass(frozen=True)
class PageResult:
    source: str  # the input as given (a display-safe path, or "<stdin>")
    page: int  # 1-based page (or frame) number
    task: str
    status: Status
    question: str | None = None  # what was asked: the question (ask) or the query (ground); null otherwise
    width: int | None = None  # of the page as given (rendered, before any turn), in pixels
    height: int | None = None
    rotation: int = 0  # clockwise degrees the page was turned by before it was read (0, 90, 180, 270)
    rotation_source: str | None = None  # what decided the turn: text_layer, osd, user; None: nothing did
    answer: str | None = None  # the model's answer, unedited (loops trimmed to one copy)
    finish_reason: str | None = None  # stop | length | loop | split | text_layer | interrupted
    flags: tuple[str, ...] = ()
    prompt_tokens: int = 0
    generated_tokens: int = 0
    retry_temperature: float | None = None  # set when a repetition loop made vl2 re-read the page
    seconds: float = 0.0
    split: Split | None = None
    error: str | None = None  # why a failed page failed
    grammar: Mapping[str, Any] | None = None  # the grammar that constrained the answer: {"kind", "schema" | "lark"}
    fields: Mapping[str, Any] = field(default_factory=dict)  # the task's parsed fields (see TASK_FIELDS)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def label(self) -> str:
        return f"{self.source} p{self.page}"

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "source": self.source, "page": self.page, "task": self.task, "status": self.status,
            "question": self.question, "width": self.width, "height": self.height, "rotation": self.rotation,
            "rotation_source": self.rotation_source, "answer": self.answer,
            "finish_reason": self.finish_reason, "flags": list(self.flags), "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens, "retry_temperature": self.retry_temperature,
            "seconds": round(self.seconds, 3),
            "split": None if self.split is None else {"bands": self.split.bands, "reason": self.split.reason},
            "error": self.error, "grammar": None if self.grammar is None else dict(self.grammar),
        }
        for name, default in TASK_FIELDS.get(self.task, {}).items():
            record[name] = self.fields.get(name, default)
        return record


def failed_page(source: str, page: int, task: str, error: str, question: str | None = None) -> PageResult:
    return PageResult(source, page, task, "failed", question=question, error=error)


@dataclass(frozen=True)
class AskResult:
    inputs: tuple[str, ...]
    pages: int  # images in the prompt
    question: str
    answer: str
    finish_reason: str
    flags: tuple[str, ...] = ()
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"inputs": list(self.inputs), "pages": self.pages, "question": self.question, "answer": self.answer,
                "finish_reason": self.finish_reason, "flags": list(self.flags), "prompt_tokens": self.prompt_tokens,
                "generated_tokens": self.generated_tokens, "seconds": round(self.seconds, 3)}


def load_schema(kind: str = "page") -> dict:
    import json
    from importlib.resources import files
    return json.loads(files("vl2cli.schemas").joinpath(SCHEMA_FILES[kind]).read_text("utf-8"))
