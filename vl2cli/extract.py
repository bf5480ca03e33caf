"""Extraction: JSON Schemas from a file or the --fields shorthand, rewritten for constrained decoding, rendered
readably for the prompt, checked after decoding, and page objects merged into one per document.

The rewrite (bound_schema) only narrows the schema, and only where it leaves something open: a string without
`maxLength` gets one and an array without `maxItems` gets one, both sized to the room the context leaves for the
answer (never below 200 characters / 50 items), every such bound listed in the record; objects hold the properties
the schema names (allOf branches and references merged first); a node whose keywords assume a type gets it written;
`format: date` follows an exact calendar pattern. A bound the user wrote is never touched. Nothing is sized to the
worst case of the whole answer: an answer that does not complete within its budget is re-read with the room the
context leaves (vl2cli/reader.py), and one that still does not complete has no data and says where it stopped.
References stay references (rewritten once each), so recursion is kept and a schema's work is linear in its size.
"""

from __future__ import annotations

import copy
import json
import re
import urllib.parse
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from vl2cli.engine.grammar import Grammar, GrammarError
from vl2cli.errors import UsageError
from vl2cli.results import PageResult

DEFAULT_STRING_CHARS, DEFAULT_ARRAY_ITEMS = 200, 50  # the least vl2 adds where a schema sets no bound
MAX_NESTING = 128  # schema nodes inside one another (JSON nesting of the schema document, not through $ref)
MAX_TOKEN_BYTES = 16  # far above what a token of compact JSON carries: a refusal on size is never premature
HUGE, INFINITE = 1 << 64, 1 << 100  # sizes are clamped at HUGE; INFINITE marks a recursion in progress
MAX_SCHEMA_BYTES = 256 * 1024
DATE_PATTERN = (r"^(?:(?:\d\d(?:0[48]|[2468][048]|[13579][26])|(?:[02468][048]|[13579][26])00)-02-29"
                r"|\d{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12]\d|3[01])|(?:0[469]|11)-(?:0[1-9]|[12]\d|30)"
                r"|02-(?:0[1-9]|1\d|2[0-8])))$")


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
    except RecursionError:
        raise UsageError(f"{path}: the schema nests too deeply") from None
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




def default_bounds(room: int) -> tuple[int, int]:
    """The bounds vl2 adds where a schema leaves strings and arrays open, sized to the room the context leaves
    for the answer (rounded down to 256 tokens so that pages of about the same size share one grammar): a string
    gets as many characters as the room has tokens, an array a quarter as many items; never below 200 / 50."""
    chars = max(DEFAULT_STRING_CHARS, room // 256 * 256)
    return chars, max(DEFAULT_ARRAY_ITEMS, chars // 4)


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


_APPLICATORS = ("allOf", "anyOf", "oneOf")
_OBJECT_KEYWORDS = ("properties", "required", "additionalProperties", "patternProperties", "minProperties",
                    "maxProperties", "propertyNames", "dependencies", "dependentRequired", "dependentSchemas")
_FAMILIES = {"object": _OBJECT_KEYWORDS, "array": ("items", "prefixItems", "minItems", "maxItems", "contains"),
             "string": ("minLength", "maxLength", "pattern", "format"),
             "number": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")}
_SUBSCHEMA = ("items", "additionalProperties", "additionalItems", "contains", "propertyNames")
_SUBSCHEMA_MAPS = ("properties", "patternProperties")
_UNENFORCED = ("not", "if", "then", "else", "unevaluatedProperties", "unevaluatedItems")  # checked after decoding


class _Bounder:
    """One pass over a schema: each `$ref` target is rewritten once (memoized, so the work and the output grow
    with the schema's size, never with what its references expand to) and kept as a reference, so recursion stays
    recursion. What it writes only narrows the schema: bounds where none is given, objects closed to the names
    the schema gives them, the type a node's keywords assume."""

    def __init__(self, root: dict[str, Any], string_chars: int, array_items: int):
        self.root, self.string_chars, self.array_items = root, string_chars, array_items
        self.base = root.get("$id") or root.get("id")
        self.defs: dict[str, Any] = {}
        self.names: dict[tuple[str, bool], str] = {}
        self.narrowed: list[dict[str, Any]] = []
        self.relaxed: list[str] = []
        self.visited = 0  # schema nodes rewritten: at most twice the schema's own (each reference open and closed)

    def pointer(self, ref: Any, where: str) -> str:
        """A reference's JSON pointer inside this schema; other references are refused."""
        if not isinstance(ref, str):
            raise GrammarError(f"{where or '/'}: $ref must be a string")
        if isinstance(self.base, str) and ref.startswith(self.base.rstrip("#")) and ref != self.base.rstrip("#"):
            ref = ref[len(self.base.rstrip("#")):]
        if ref in ("#", ""):
            return ""
        if not ref.startswith("#/"):
            raise GrammarError(f"{where or '/'}: $ref {ref[:80]!r}: only references inside the schema (#/...) "
                               "are supported")
        return ref[1:]

    def resolve(self, pointer: str) -> Any:
        node: Any = self.root
        for part in pointer.split("/")[1:]:
            part = urllib.parse.unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise GrammarError(f"$ref '#{pointer[:80]}' points nowhere in the schema")
        return node

    def ref(self, pointer: str, open_: bool) -> str:
        """The rewritten target of a reference (open: its object constraints merge with its siblings'), once."""
        key = (pointer, open_)
        if key not in self.names:
            name = f"vl2_{len(self.names)}"
            self.names[key] = name
            self.defs[name] = True  # a placeholder while the target (which may refer to itself) is rewritten
            self.defs[name] = self.node(self.resolve(pointer), pointer, open_, 0)
        return f"#/$defs/{self.names[key]}"

    def node(self, s: Any, where: str, open_: bool, depth: int) -> Any:
        """Schema node `s` at `where`, rewritten. `open_`: its object constraints are intersected with a parent's
        (an allOf branch, a $ref beside properties), so the parent closes the object, not this node."""
        self.visited += 1
        if depth > MAX_NESTING:
            raise GrammarError(f"{where or '/'}: the schema nests deeper than {MAX_NESTING} levels")
        if isinstance(s, bool):
            return s
        if not isinstance(s, dict):
            raise GrammarError(f"{where or '/'}: a schema is a JSON object or a boolean, not {json.dumps(s)[:40]}")
        branches_open = open_ or any(k in s for k in _OBJECT_KEYWORDS)
        out: dict[str, Any] = {}
        for key, value in s.items():
            self._keyword(key, value, s, out, (where, branches_open, depth))
        for key in ("dependencies", "dependentRequired", "dependentSchemas"):
            if isinstance(s.get(key), dict):
                self._dependencies(s, s[key], out, f"{where}/{key}", depth)
        for flag, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if isinstance(s.get(flag), bool):  # draft 4: a flag on minimum / maximum
                if s[flag] and bound in s:
                    out[flag] = out.pop(bound)
                else:
                    out.pop(flag, None)
        self._assume_type(out)
        self._bound(out, where)
        if not open_:
            self._close(s, out, branches_open)
        return out

    def _keyword(self, key: str, value: Any, s: dict[str, Any], out: dict[str, Any],
                 at: tuple[str, bool, int]) -> None:
        """One keyword of node `s` into `out`: its subschemas rewritten, the rest as written."""
        where, branches_open, depth = at
        here = f"{where}/{key}"
        if key in ("$defs", "definitions", "x-guidance", "$schema", "$id", "id", "$comment", "additionalItems",
                   "dependencies", "dependentRequired", "dependentSchemas"):
            return  # definitions are rewritten where referenced; the others are folded in by node()
        if key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            out[key] = {n: self.node(v, f"{here}/{_escape(n)}", False, depth + 1) for n, v in value.items()}
        elif key == "items" and isinstance(value, list):  # draft 4-7 tuples
            out["prefixItems"] = [self.node(v, f"{here}/{i}", False, depth + 1) for i, v in enumerate(value)]
            out["items"] = self.node(s.get("additionalItems", True), f"{where}/additionalItems", False, depth + 1)
        elif key in _SUBSCHEMA:
            out[key] = self.node(value, here, False, depth + 1)
        elif key == "prefixItems" and isinstance(value, list):
            out[key] = [self.node(v, f"{here}/{i}", False, depth + 1) for i, v in enumerate(value)]
        elif key in _APPLICATORS and isinstance(value, list):
            inner = True if key == "allOf" else branches_open
            out[key] = [self.node(b, f"{here}/{i}", inner, depth + 1) for i, b in enumerate(value)]
        elif key == "$ref":
            out[key] = self.ref(self.pointer(value, where), branches_open)
        elif key in _UNENFORCED:
            self.relaxed.append(f"{here}: not enforced while decoding, checked after")
        else:
            out[key] = value

    def _dependencies(self, s: dict[str, Any], value: dict[str, Any], out: dict[str, Any], at: str,
                      depth: int) -> None:
        """`dependencies` narrowed soundly: a required property brings its dependencies in (required names, or
        its schema as an allOf branch); an optional one is left out, which satisfies them vacuously."""
        required = set(s.get("required") or ())
        for name, dependency in value.items():
            if name in required:
                if isinstance(dependency, list):
                    out["required"] = list(dict.fromkeys([*out.get("required", s.get("required", [])), *dependency]))
                else:
                    branch = self.node(dependency, f"{at}/{_escape(name)}", True, depth + 1)
                    out["allOf"] = [*out.get("allOf", []), branch]
            else:
                out.setdefault("properties", {})[name] = False
                self.narrowed.append({"path": f"{at}/{_escape(name)}", "omitted": name})

    def _assume_type(self, out: dict[str, Any]) -> None:
        """A node with only one family's keywords (properties, items, maxLength, minimum...) and no type, enum,
        const or applicator: write the type those keywords assume (a schema of properties alone also admits a
        number; an answer written as one would be as long as the budget)."""
        if "type" in out or "enum" in out or "const" in out or "$ref" in out or any(k in out for k in _APPLICATORS):
            return
        families = [t for t, keys in _FAMILIES.items() if any(k in out for k in keys)]
        if len(families) == 1:
            out["type"] = families[0]

    def _bound(self, out: dict[str, Any], where: str) -> None:
        types = out.get("type")
        types = set(types) if isinstance(types, list) else {types}
        if "enum" in out or "const" in out:
            return
        if "string" in types:
            if out.get("format") == "date" and "pattern" not in out:
                out.pop("format")
                out["pattern"] = DATE_PATTERN  # exact calendar dates (llguidance's own admits 2023-02-29)
            elif not any(k in out for k in ("maxLength", "format", "pattern")):  # a pattern is the user's own
                out["maxLength"] = max(self.string_chars, int(out.get("minLength", 0)))
                self.narrowed.append({"path": where or "/", "maxLength": out["maxLength"]})
        if "array" in types and "maxItems" not in out:
            out["maxItems"] = max(self.array_items, int(out.get("minItems", 0)))
            self.narrowed.append({"path": where or "/", "maxItems": out["maxItems"]})

    def _close(self, s: dict[str, Any], out: dict[str, Any], branches_open: bool) -> None:
        """Objects hold only the properties the schema names, those its allOf branches and references add
        included (merged before closing, so a base-plus-extension schema stays satisfiable)."""
        types = out.get("type")
        types = set(types) if isinstance(types, list) else {types}
        if "additionalProperties" in out or "unevaluatedProperties" in s:
            return
        names = self.visible_names(s, branches_open)
        if not (names or "object" in types or any(k in s for k in _OBJECT_KEYWORDS)):
            return
        properties = out.setdefault("properties", {})
        for name in names:
            properties.setdefault(name, True)
        out["additionalProperties"] = False

    def visible_names(self, s: dict[str, Any], branches_open: bool) -> list[str]:
        """The property names a node gives its objects: its own, and those of its open branches and references."""
        names: dict[str, None] = {}
        stack: list[tuple[Any, bool]] = [(s, branches_open)]
        seen: set[str] = set()
        while stack:
            node, inner_open = stack.pop()
            if not isinstance(node, dict):
                continue
            names.update(dict.fromkeys(node.get("properties") or {}))
            names.update(dict.fromkeys(n for n in node.get("required") or () if isinstance(n, str)))
            for key in _APPLICATORS:
                if key == "allOf" or inner_open:
                    stack += [(b, True) for b in node.get(key) or () if isinstance(node.get(key), list)]
            ref = node.get("$ref")
            if inner_open and isinstance(ref, str) and ref not in seen:
                seen.add(ref)
                stack.append((self.resolve(self.pointer(ref, "")), True))
        return list(names)


class _MinimumSize:
    """A lower bound on the bytes of the smallest JSON value a schema admits (compact), memoized per reference,
    so a schema whose references multiply ("billion laughs") is sized in time linear in its own size."""

    def __init__(self, bounder: _Bounder):
        self.bounder = bounder
        self.memo: dict[str, int] = {}
        self.active: set[str] = set()

    def of(self, s: Any, depth: int = 0) -> tuple[int, bool]:
        """(bytes, exact) where exact is False when a recursive reference in progress was counted as endless."""
        if depth > MAX_NESTING * 4:
            return 1, False
        if s is True or not isinstance(s, dict):
            return 1, True
        if "const" in s:
            return _json_bytes(s["const"]), True
        if isinstance(s.get("enum"), list) and s["enum"]:
            return min(_json_bytes(v) for v in s["enum"]), True
        sizes: list[tuple[int, bool]] = []
        ref = s.get("$ref")
        if isinstance(ref, str):
            sizes.append(self.reference(ref, depth))
        for b in s.get("allOf") or ():
            sizes.append(self.of(b, depth + 1))
        for key in ("anyOf", "oneOf"):
            if s.get(key):
                options = [self.of(b, depth + 1) for b in s[key]]
                best = min(n for n, _ in options)
                sizes.append((best, all(e for _, e in options)))
        sizes.append(self.own(s, depth))
        size = max(n for n, _ in sizes)
        return (size if size >= INFINITE else min(size, HUGE)), all(e for _, e in sizes)

    def reference(self, ref: str, depth: int) -> tuple[int, bool]:
        pointer = self.bounder.pointer(ref, "")
        if pointer in self.memo:
            return self.memo[pointer], True
        if pointer in self.active:
            return INFINITE, False  # a derivation that recurses here is larger than one that does not
        self.active.add(pointer)
        try:
            size, exact = self.of(self.bounder.resolve(pointer), depth + 1)
        finally:
            self.active.discard(pointer)
        if exact:
            self.memo[pointer] = size
        return size, exact

    def own(self, s: dict[str, Any], depth: int) -> tuple[int, bool]:
        types = s.get("type")
        types = types if isinstance(types, list) else [types] if isinstance(types, str) else []
        if not types:
            return 1, True
        best: list[tuple[int, bool]] = []
        for t in types:
            if t == "object":
                total, exact = 2, True
                properties = s.get("properties") or {}
                for name in s.get("required") or ():
                    if not isinstance(name, str):
                        continue
                    n, e = self.of(properties.get(name, True), depth + 1)
                    total, exact = total + _json_bytes(name) + 2 + n, exact and e
                best.append((total, exact))
            elif t == "array":
                items = s.get("items")
                prefix: list[Any] = s.get("prefixItems") or (items if isinstance(items, list) else [])
                count = int(s.get("minItems", 0) or 0)
                n, e = self.of(True if isinstance(items, list) or items is None else items, depth + 1) \
                    if count > len(prefix) else (0, True)
                fixed = [self.of(p, depth + 1) for p in prefix[:count]]
                best.append((2 + sum(x + 1 for x, _ in fixed) + max(0, count - len(prefix)) * (n + 1),
                             e and all(x for _, x in fixed)))
            elif t == "string":
                best.append((2 + int(s.get("minLength", 0) or 0), True))
            else:
                best.append((1 if t in ("integer", "number") else 4, True))
        return min(n for n, _ in best), all(e for _, e in best)


def _json_bytes(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


@dataclass(frozen=True)
class BoundedSchema:
    schema: dict[str, Any]  # what the grammar is compiled from
    narrowed: tuple[dict[str, Any], ...]  # {"path", "maxLength"|"maxItems"|"omitted"}: what vl2 added
    relaxed: tuple[str, ...]  # what the grammar does not enforce (checked after decoding)
    min_bytes: int  # the smallest answer the schema admits, in bytes (a lower bound)
    visited: int  # schema nodes the rewrite visited (bounded by the schema's size)


def bound_schema(schema: dict[str, Any], room: int) -> BoundedSchema:
    """The schema as vl2 decodes it with `room` tokens of context for the answer: bounds added only where it
    leaves strings and arrays open (sized to the room), objects closed, types written; and a lower bound on the
    size of its smallest answer (schema_grammar refuses one that cannot fit)."""
    if not isinstance(schema, dict):
        raise GrammarError("a JSON Schema is a JSON object")
    chars, items = default_bounds(room)
    bounder = _Bounder(schema, chars, items)
    try:
        root = bounder.node(schema, "", False, 0)
        smallest, _ = _MinimumSize(bounder).of(schema)
    except RecursionError:
        raise GrammarError("the schema nests (directly or through $ref) too deeply to compile") from None
    if bounder.defs:
        root = {**root, "$defs": bounder.defs} if isinstance(root, dict) else {"allOf": [root], "$defs": bounder.defs}
    if not isinstance(root, dict):
        root = {} if root else {"not": {}}
    return BoundedSchema(root, tuple(bounder.narrowed), tuple(bounder.relaxed), smallest, bounder.visited)


@lru_cache(maxsize=64)
def schema_grammar(schema_json: str, room: int, relax: bool = True) -> Grammar:
    """The compiled grammar of a schema for an answer with `room` tokens of context (pages with the same room
    share it). `relax`: what llguidance cannot enforce (`not`, overlapping `oneOf`, unknown formats, ...) is left
    to the check after decoding instead of refused (the CLI checks every answer; the server cannot, so it refuses)."""
    bounded = bound_schema(json.loads(schema_json), room)
    if bounded.relaxed and not relax:
        raise GrammarError(bounded.relaxed[0].replace("not enforced while decoding, checked after",
                                                      "not supported by the grammar compiler"))
    grammar = Grammar.from_json_schema(bounded.schema, lenient=relax, narrowed=bounded.narrowed,
                                       relaxed=bounded.relaxed)  # first: a refusal names the construct, not a size
    if bounded.min_bytes >= INFINITE:
        raise GrammarError("the schema admits no finite answer (every branch recurses)")
    if bounded.min_bytes > room * MAX_TOKEN_BYTES:
        raise GrammarError(f"the smallest answer the schema admits is {bounded.min_bytes} bytes: more than {room} "
                           "tokens can hold (raise --max-new-tokens, or make fewer properties required)")
    return grammar


# ---------------------------------------------------------------------------------------------- after decoding


def settle(answer: str, complete: bool, grammar: Grammar | None,
           schema_json: str | None) -> tuple[dict[str, Any], tuple[str, ...]]:
    """An answer's `data`, flags and warnings: data only when the answer completed and validates against the
    user's own schema; `bound_reached` when a value stops at a bound vl2 added (it is valid, but may be cut)."""
    if not complete:
        return ({"data": None, "warnings": [f"the answer stopped inside {stopped_at(answer)} before the object was "
                                            "complete"]}, ("incomplete_json",))
    try:
        data = json.loads(answer)
    except (ValueError, RecursionError):
        return {"data": None, "warnings": ["the answer is not JSON"]}, ("incomplete_json",)
    problem = schema_problem(schema_json, data) if schema_json else None
    if problem:
        return {"data": None, "warnings": [f"the answer does not validate against the schema: {problem}"]}, \
            ("schema_mismatch",)
    reached = bounds_reached(data, grammar.narrowed if grammar is not None else ())
    return {"data": data, "warnings": reached}, ("bound_reached",) if reached else ()


def stopped_at(answer: str) -> str:
    """The JSON pointer of the value a cut answer was writing (its innermost open array item or property)."""
    path: list[Any] = []  # per open container: [key or None] for objects, [index] for arrays
    kinds: list[str] = []
    i, n = 0, len(answer)
    while i < n:
        c = answer[i]
        if c == '"':
            j = i + 1
            while j < n and answer[j] != '"':
                j += 2 if answer[j] == "\\" else 1
            text = answer[i + 1:j]
            rest = answer[j + 1:j + 2]
            if kinds and kinds[-1] == "object" and (rest == ":" or (j >= n and path[-1] is None)):
                try:
                    path[-1] = json.loads(f'"{text}"')
                except ValueError:
                    path[-1] = text
            i = j + 1
            continue
        if c in "{[":
            kinds.append("object" if c == "{" else "array")
            path.append(None if c == "{" else 0)
        elif c in "}]":
            kinds.pop()
            path.pop()
        elif c == "," and kinds:
            path[-1] = None if kinds[-1] == "object" else path[-1] + 1
        i += 1
    parts = [str(p).replace("~", "~0").replace("/", "~1") for p in path if p is not None]
    return "/" + "/".join(parts) if parts else "the top-level value"


@lru_cache(maxsize=64)
def _validator(schema_json: str) -> Any:
    import jsonschema
    schema = json.loads(schema_json)
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def schema_problem(schema_json: str, data: Any) -> str | None:
    """Why `data` does not validate against the user's schema (jsonschema, formats included), or None."""
    try:
        import jsonschema
        error = jsonschema.exceptions.best_match(_validator(schema_json).iter_errors(data))
    except RecursionError:
        return "the answer nests too deeply to check"
    except Exception as exc:  # a schema jsonschema cannot apply (an unresolvable reference): nothing is passed
        return f"it could not be checked ({type(exc).__name__}: {str(exc)[:160]})"
    if error is None:
        return None
    where = "/" + "/".join(str(p) for p in error.absolute_path)
    return f"{where}: {error.message[:200]}"


def bounds_reached(data: Any, narrowed: tuple[dict[str, Any], ...]) -> list[str]:
    """Where a value stops exactly at a bound vl2 added: a string of that many characters, an array of that many
    items. (A value of the user's own that happens to have that length is reported too: a false alarm, not a
    missed one.)"""
    chars = {n["maxLength"] for n in narrowed if "maxLength" in n}
    items = {n["maxItems"] for n in narrowed if "maxItems" in n}
    if not chars and not items:
        return []
    found: list[str] = []
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str) and len(value) in chars:
            found.append(f"{where or '/'} reached the {len(value)}-character bound vl2 added (the schema sets none)")
        elif isinstance(value, list):
            if len(value) in items:
                found.append(f"{where or '/'} reached the {len(value)}-item bound vl2 added (the schema sets none)")
            stack += [(v, f"{where}/{i}") for i, v in enumerate(value)]
        elif isinstance(value, dict):
            stack += [(v, f"{where}/{str(k).replace('~', '~0').replace('/', '~1')}") for k, v in value.items()]
    return sorted(found)


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
                      seconds=sum(r.seconds for r in ok), grammar=ok[0].grammar,
                      fields={"data": data, "warnings": [f"p{r.page}: {w}" for r in results
                                                         for w in r.fields.get("warnings") or ()]})


def csv_row(data: Any, columns: list[str]) -> list[str]:
    """One CSV row: top-level values as text, nested values as JSON."""
    data = data if isinstance(data, dict) else {}
    out = []
    for column in columns:
        value = data.get(column)
        out.append("" if value is None else value if isinstance(value, str)
                   else json.dumps(value, ensure_ascii=False, separators=(",", ":")))
    return out
