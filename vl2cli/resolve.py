"""Words -> a task and its options: the one place per-task defaults are decided.

The CLI, the server's document endpoint and the library (`vl2cli.read`) all call `resolve_options` with the
option table's words (`vl2cli/options.py`), so the same words read the same way everywhere; Ray's actors get the
resolved `Job`. Every check, the extraction schema's compilation included, happens here, before any model loads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from vl2cli.errors import UsageError
from vl2cli.extract import schema_from_fields, schema_grammar
from vl2cli.options import DEFAULT_ASK_TOKENS, DEFAULT_BATCH_SIZE, OPTION, PageOptions, ReadOptions
from vl2cli.tasks import get_task

if TYPE_CHECKING:
    from vl2cli.tasks import Task

READ_FIELDS = {f.name for f in fields(ReadOptions)}
PAGE_FIELDS = {f.name for f in fields(PageOptions)} - {"text_layer"}  # a page's text layer follows the reading's


@dataclass(frozen=True)
class Resolved:
    task: Task
    read: ReadOptions
    pages: PageOptions
    fmt: str


def task_default(name: str, task: Task, *, asking: bool = False) -> Any:
    """An option's default for `task`: the table's, except the per-task ones. `asking`: one answer about the images
    together (`vl2 ask`), which has a shorter budget than a page."""
    if name == "fmt":
        return task.formats[0]
    if name == "strict":
        return task.strict_by_default  # ground: every box parses; table: off
    if name == "max_new_tokens" and asking:
        return DEFAULT_ASK_TOKENS
    return OPTION[name].default


def resolve_options(task_name: str, words: Mapping[str, Any] | None = None, *, read: ReadOptions | None = None,
                    pages: PageOptions | None = None, asking: bool = False) -> Resolved:
    """`words` are the table's options by name (None: not given); `read` and `pages`, option objects a library
    caller built, whose values stand unless a word is given. Words outside the table are a TypeError (a caller's
    bug); a bad value is a UsageError naming its flag."""
    task = get_task(task_name)
    given = {k: v for k, v in (words or {}).items() if v is not None}
    unknown = sorted(set(given) - set(OPTION))
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(unknown)}")
    fmt = given.get("fmt") or task_default("fmt", task)
    if fmt not in task.formats:
        raise UsageError(f"--format {fmt!r}: {task.name} writes {', '.join(task.formats)}")
    base = read or ReadOptions(max_new_tokens=task_default("max_new_tokens", task, asking=asking))
    changes = {k: v for k, v in given.items() if k in READ_FIELDS}
    if "question" in given:
        changes["text"] = given["question"]
    if "batch_size" not in given and read is None:
        changes["batch_size"] = DEFAULT_BATCH_SIZE
    opts = replace(base, **changes)
    schema_json = _schema_json(task, given, opts)
    strict = task_default("strict", task) if opts.strict is None else opts.strict
    if strict:
        task.check_strict(opts.max_new_tokens)  # a budget too short for a strict answer is a usage error, now
    opts = replace(opts, schema_json=schema_json, strict=strict, plain=opts.plain or fmt == "text")
    page_opts = replace(pages or PageOptions(), **{k: v for k, v in given.items() if k in PAGE_FIELDS},
                        text_layer=opts.text_layer != "off")  # PDF text layers are extracted when the reading uses them
    return Resolved(task, opts, page_opts, fmt)


def _schema_json(task: Task, given: Mapping[str, Any], opts: ReadOptions) -> str | None:
    """extract: the JSON Schema every answer must satisfy (compact JSON, the user's field order kept), from `schema`
    (an object, or its JSON text) or `fields` (the shorthand), or the one `opts` already holds; compiled now."""
    if task.name != "extract":
        return opts.schema_json
    schema, spec = given.get("schema"), given.get("fields")
    if (schema is None) == (spec is None):
        if schema is not None or opts.schema_json is None:
            raise UsageError("extract: give either --schema FILE or --fields SPEC")
        schema_json = opts.schema_json  # a library caller's own ReadOptions(schema_json=...)
    else:
        raw = schema_from_fields(str(spec)) if schema is None else json.loads(schema) if isinstance(schema, str) else schema
        schema_json = json.dumps(raw, separators=(",", ":"), ensure_ascii=False)
    schema_grammar(schema_json, opts.max_new_tokens)
    return schema_json
