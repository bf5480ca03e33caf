"""Extraction: JSON Schemas from a file or the --fields shorthand, bounded so a valid object always fits the
answer budget, rendered readably for the prompt, and page objects merged into one per document.

Bounding only narrows the schema, so whatever the bounded grammar generates is valid under the user's schema:
strings without `maxLength` get one (200 characters, less when the budget is short), arrays without `maxItems` get
one (50 items, less when short), numbers without bounds stay within +-10^15 with at most 6 decimals, objects get
no properties the schema does not name, a free value (`{}`) becomes a string, number, boolean or null, and a
`"format": "date"` string follows an exact calendar pattern (leap years included). Every character costs at most
4 bytes (compact JSON, no \\u escapes) and every token at least one byte, so the bounded schema's worst case in
bytes bounds the answer in tokens.
"""

from __future__ import annotations

import copy
import json
import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from vl2cli.engine.grammar import Grammar, GrammarError
from vl2cli.errors import UsageError
from vl2cli.results import PageResult

DEFAULT_STRING_CHARS, MIN_STRING_CHARS = 200, 8
DEFAULT_ARRAY_ITEMS, MIN_ARRAY_ITEMS = 50, 1
NUMBER_LIMIT = 10**15 - 1
NUMBER_DECIMALS = 6
BYTES_PER_CHAR = 4  # UTF-8
MAX_DEPTH = 24
MAX_SCHEMA_BYTES = 256 * 1024
DATE_PATTERN = (r"^(?:(?:\d\d(?:0[48]|[2468][048]|[13579][26])|(?:[02468][048]|[13579][26])00)-02-29"
                r"|\d{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12]\d|3[01])|(?:0[469]|11)-(?:0[1-9]|[12]\d|30)"
                r"|02-(?:0[1-9]|1\d|2[0-8])))$")
FORMAT_BYTES = {"date": 10, "date-time": 35, "time": 20, "email": 254, "uri": 512, "uuid": 36}


def load_schema_file(path: str) -> dict[str, Any]:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the schema ({exc.strerror or exc})") from None
    if len(data) > MAX_SCHEMA_BYTES:
        raise UsageError(f"{path}: the schema is {len(data)} bytes; at most {MAX_SCHEMA_BYTES}")
    try:
        schema = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not JSON ({exc})") from None
    if not isinstance(schema, dict):
        raise UsageError(f"{path}: a JSON Schema is a JSON object")
    return schema


# ---------------------------------------------------------------------------------------------- --fields

_TYPES = {"string": {"type": "string"}, "str": {"type": "string"}, "text": {"type": "string"},
          "number": {"type": "number"}, "float": {"type": "number"}, "integer": {"type": "integer"},
          "int": {"type": "integer"}, "boolean": {"type": "boolean"}, "bool": {"type": "boolean"},
          "date": {"type": "string", "format": "date"}}


def schema_from_fields(spec: str) -> dict[str, Any]:
    """'invoice_number, total:number, items:[{name, qty:integer}]' -> a JSON Schema.

    Every field is required and may be null (the document may not show it): a record always has every key."""
    fields, rest = _object_fields(spec.strip(), 0)
    if rest.strip():
        raise UsageError(f"--fields: unexpected {rest.strip()[:20]!r}")
    return {"type": "object", **fields}


def _object_fields(text: str, depth: int) -> tuple[dict[str, Any], str]:
    if depth > 8:
        raise UsageError("--fields: nested deeper than 8 levels")
    properties: dict[str, Any] = {}
    while text:
        match = re.match(r"\s*([A-Za-z_][\w-]*)\s*(:\s*)?", text)
        if not match:
            raise UsageError(f"--fields: expected a field name at {text[:20]!r}")
        name, text = match.group(1), text[match.end():]
        if name in properties:
            raise UsageError(f"--fields: {name!r} appears twice")
        value: dict[str, Any] = {"type": "string"}
        if match.group(2):
            value, text = _field_type(text, depth)
        properties[name] = {"anyOf": [value, {"type": "null"}]}
        text = text.lstrip()
        if text.startswith(","):
            text = text[1:]
        elif text and text[0] in "}]":
            break
    if not properties:
        raise UsageError("--fields: no field names")
    return {"properties": properties, "required": list(properties), "additionalProperties": False}, text


def _field_type(text: str, depth: int) -> tuple[dict[str, Any], str]:
    text = text.lstrip()
    if text.startswith("["):
        item, text = _field_type(text[1:], depth + 1)
        text = text.lstrip()
        if not text.startswith("]"):
            raise UsageError("--fields: a '[' is not closed")
        return {"type": "array", "items": item}, text[1:]
    if text.startswith("{"):
        fields, text = _object_fields(text[1:], depth + 1)
        if not text.startswith("}"):
            raise UsageError("--fields: a '{' is not closed")
        return {"type": "object", **fields}, text[1:]
    match = re.match(r"([A-Za-z]+)", text)
    if not match or match.group(1).lower() not in _TYPES:
        raise UsageError(f"--fields: unknown type {text[:15]!r}: use {', '.join(sorted(_TYPES))}, [type] or {{fields}}")
    return dict(_TYPES[match.group(1).lower()]), text[match.end():]


# ---------------------------------------------------------------------------------------------- bounding


class _Bounder:
    def __init__(self, root: dict[str, Any], string_chars: int, array_items: int):
        self.root, self.string_chars, self.array_items = root, string_chars, array_items

    def resolve(self, ref: str) -> dict[str, Any]:
        if not ref.startswith("#/"):
            raise GrammarError(f"$ref {ref!r}: only references inside the schema (#/...) are supported")
        node: Any = self.root
        for part in ref[2:].split("/"):
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            raise GrammarError(f"$ref {ref!r} points nowhere")
        return node

    def bound(self, s: Any, depth: int = 0) -> tuple[dict[str, Any], int]:
        """A narrowed copy of schema node `s` and its worst case in bytes."""
        if depth > MAX_DEPTH:
            raise GrammarError(f"the schema nests (or recurses through $ref) deeper than {MAX_DEPTH} levels")
        if s is True or s == {}:
            s = {"type": ["string", "number", "boolean", "null"]}
        if not isinstance(s, dict):
            raise GrammarError(f"schema node {s!r} is not an object")
        s = dict(s)
        if "$ref" in s:
            target = self.resolve(s.pop("$ref"))
            return self.bound({**target, **s}, depth + 1)
        if "const" in s or "enum" in s:
            values = [s["const"]] if "const" in s else s["enum"]
            return s, max(len(json.dumps(v, ensure_ascii=False, separators=(",", ":")).encode()) for v in values)
        for key in ("anyOf", "oneOf", "allOf"):
            if key in s:
                branches = [self.bound({**{k: v for k, v in s.items() if k != key}, **b}, depth + 1) for b in s[key]]
                s[key] = [b for b, _ in branches]
                sizes = [n for _, n in branches]
                return s, (min(sizes) if key == "allOf" else max(sizes))
        types = s.get("type", ["object"] if "properties" in s else ["string", "number", "boolean", "null"])
        if isinstance(types, list):
            if len(types) == 1:
                types = types[0]
            else:
                return self.bound({"anyOf": [{**s, "type": t} for t in types]}, depth + 1)
        return getattr(self, f"_{types}", self._unknown)(s, depth)

    def _unknown(self, s: dict[str, Any], _depth: int) -> tuple[dict[str, Any], int]:
        raise GrammarError(f"type {s.get('type')!r} is not a JSON Schema type")

    def _null(self, s: dict[str, Any], _depth: int) -> tuple[dict[str, Any], int]:
        return s, 4

    def _boolean(self, s: dict[str, Any], _depth: int) -> tuple[dict[str, Any], int]:
        return s, 5

    def _integer(self, s: dict[str, Any], _depth: int) -> tuple[dict[str, Any], int]:
        s.setdefault("minimum", -NUMBER_LIMIT)
        s.setdefault("maximum", NUMBER_LIMIT)
        widest = max(abs(float(s["minimum"])), abs(float(s["maximum"])))
        return s, len(str(int(widest))) + 1

    def _number(self, s: dict[str, Any], _depth: int) -> tuple[dict[str, Any], int]:
        s.setdefault("minimum", -NUMBER_LIMIT)
        s.setdefault("maximum", NUMBER_LIMIT)
        s.setdefault("multipleOf", 10.0**-NUMBER_DECIMALS)
        widest = max(abs(float(s["minimum"])), abs(float(s["maximum"])), 1)
        decimals = max(0, -math.floor(math.log10(float(s["multipleOf"])))) if s["multipleOf"] > 0 else 17
        return s, len(str(int(widest))) + decimals + 3

    def _string(self, s: dict[str, Any], _depth: int) -> tuple[dict[str, Any], int]:
        fmt = s.get("format")
        if fmt == "date" and "pattern" not in s:
            s.pop("format")
            s["pattern"] = DATE_PATTERN
            return s, FORMAT_BYTES["date"] + 2
        if fmt in FORMAT_BYTES and "maxLength" not in s:
            return s, FORMAT_BYTES[fmt] * BYTES_PER_CHAR + 2
        if "maxLength" not in s:
            s["maxLength"] = max(self.string_chars, int(s.get("minLength", 0)))
        return s, int(s["maxLength"]) * BYTES_PER_CHAR + 2

    def _array(self, s: dict[str, Any], depth: int) -> tuple[dict[str, Any], int]:
        if "maxItems" not in s:
            s["maxItems"] = max(self.array_items, int(s.get("minItems", 0)))
        prefix = [self.bound(p, depth + 1) for p in s.get("prefixItems", [])]
        if prefix:
            s["prefixItems"] = [p for p, _ in prefix]
        item, size = self.bound(s.get("items", {}), depth + 1)
        s["items"] = item
        rest = max(0, int(s["maxItems"]) - len(prefix))
        return s, 2 + sum(n + 1 for _, n in prefix) + rest * (size + 1)

    def _object(self, s: dict[str, Any], depth: int) -> tuple[dict[str, Any], int]:
        properties = {}
        total = 2
        for name, sub in (s.get("properties") or {}).items():
            bounded, size = self.bound(sub, depth + 1)
            properties[name] = bounded
            total += len(json.dumps(name, ensure_ascii=False).encode()) + 1 + size + 1
        s["properties"] = properties
        s["additionalProperties"] = False  # vl2 writes only the properties the schema names
        s.pop("patternProperties", None)
        return s, total


def bound_schema(schema: dict[str, Any], budget: int) -> tuple[dict[str, Any], int]:
    """The schema narrowed so that any object it admits fits `budget` tokens; and that worst case in tokens."""
    chars, items = DEFAULT_STRING_CHARS, DEFAULT_ARRAY_ITEMS
    while True:
        bounded, worst = _Bounder(schema, chars, items).bound(copy.deepcopy(schema))
        if worst + 1 <= budget:  # + the end token
            for key in ("$defs", "definitions"):
                if key in schema:
                    bounded[key] = schema[key]
            return bounded, worst
        if chars == MIN_STRING_CHARS and items == MIN_ARRAY_ITEMS:
            raise GrammarError(f"the schema can need up to {worst} tokens but the answer budget is {budget}: "
                               "raise --max-new-tokens, or bound its strings (maxLength) and arrays (maxItems)")
        chars, items = max(MIN_STRING_CHARS, chars * 3 // 4), max(MIN_ARRAY_ITEMS, items * 3 // 4)


@lru_cache(maxsize=64)
def schema_grammar(schema_json: str, budget: int) -> Grammar:
    """The compiled grammar of a schema at an answer budget (pages with the same budget share it)."""
    bounded, _ = bound_schema(json.loads(schema_json), budget)
    return Grammar.from_json_schema(bounded)


# ---------------------------------------------------------------------------------------------- prompt, merge


def describe(schema: dict[str, Any], indent: str = "") -> str:
    """A readable rendering of a schema for the prompt: one line per field, nested fields indented."""
    lines = []
    for name, sub in (schema.get("properties") or {}).items():
        kind, inner = _kind(sub)
        note = f" - {sub['description']}" if isinstance(sub, dict) and sub.get("description") else ""
        lines.append(f"{indent}- {name}: {kind}{note}")
        if inner:
            lines.append(describe(inner, indent + "  "))
    return "\n".join(lines)


def _kind(sub: Any) -> tuple[str, dict[str, Any] | None]:
    if not isinstance(sub, dict):
        return "any value", None
    for key in ("anyOf", "oneOf"):
        if key in sub:
            kinds = [_kind(b) for b in sub[key] if not (isinstance(b, dict) and b.get("type") == "null")]
            if kinds:
                return kinds[0][0] + " (or null)", kinds[0][1]
    if "enum" in sub:
        return "one of " + ", ".join(json.dumps(v) for v in sub["enum"]), None
    kind = sub.get("type", "object" if "properties" in sub else "value")
    if kind == "array":
        inner_kind, inner = _kind(sub.get("items", {}))
        return f"list of {inner_kind}", inner
    if kind == "string" and sub.get("format") == "date":
        return "date (YYYY-MM-DD)", None
    return (str(kind), sub) if kind == "object" else (str(kind), None)


@lru_cache(maxsize=64)
def describe_json(schema_json: str) -> str:
    """describe() of a schema given as JSON (every page of a run shares the rendering)."""
    return describe(json.loads(schema_json))


def merge_objects(objects: list[Any]) -> Any:
    """One object per document from its pages' objects: scalars (and nested objects' scalars) from the first page
    that fills them (not null, not ""), arrays concatenated in page order."""
    merged: Any = None
    for obj in objects:
        merged = _merge(merged, obj)
    return merged


def _merge(a: Any, b: Any) -> Any:
    if a is None or a == "":
        return copy.deepcopy(b)
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for key, value in b.items():
            out[key] = _merge(out.get(key), value)
        return out
    if isinstance(a, list) and isinstance(b, list):
        return a + copy.deepcopy(b)
    return a


def merged_result(results: list[PageResult]) -> PageResult:
    """A document's record from its pages' records (page 0 stands for the whole document)."""
    ok = [r for r in results if r.ok]
    first = results[0]
    if not ok:
        return PageResult(first.source, 0, first.task, "failed", question=first.question,
                          error="no page of the document could be read: " + "; ".join(r.error or "" for r in results))
    data = merge_objects([r.fields.get("data") for r in ok if r.fields.get("data") is not None])
    return PageResult(first.source, 0, first.task, "ok", question=first.question, width=ok[0].width,
                      height=ok[0].height, answer=json.dumps(data, ensure_ascii=False), finish_reason="stop",
                      flags=tuple(dict.fromkeys(f for r in ok for f in r.flags)),
                      prompt_tokens=sum(r.prompt_tokens for r in ok), generated_tokens=sum(r.generated_tokens for r in ok),
                      seconds=sum(r.seconds for r in ok), grammar=ok[0].grammar, fields={"data": data})


def csv_row(data: Any, columns: list[str]) -> list[str]:
    """One CSV row: top-level values as text, nested values as JSON."""
    data = data if isinstance(data, dict) else {}
    out = []
    for column in columns:
        value = data.get(column)
        out.append("" if value is None else value if isinstance(value, str)
                   else json.dumps(value, ensure_ascii=False, separators=(",", ":")))
    return out
