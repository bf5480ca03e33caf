"""Tasks: a prompt from `vl2cli/prompts/`, a parser of the model's answer, and the renderings a user can ask for.

The user's words (a question, a query) and a PDF's text layer enter the prompt as UserText: data, never
template (no image marks, no special tokens).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from typing_extensions import override

from vl2cli.engine.grammar import Grammar, GrammarError
from vl2cli.errors import UsageError
from vl2cli.extract import csv_row, schema_grammar, settle
from vl2cli.layout import blocks_markdown, furniture_of, page_blocks, strip_markdown
from vl2cli.options import ReadOptions
from vl2cli.parsers import (
    parse_grounding,
    parse_tables,
    strip_grounding_tags,
    table_to_csv,
    table_to_html,
    table_to_markdown,
)
from vl2cli.results import PageResult

MAX_PROMPT_FILE_BYTES = 64 * 1024
# The most of a page's text layer a --text-layer hint puts in the prompt: 4,000 characters are on the order of 1,000
# tokens, so beside a tiled page's image (up to ~2,100 tokens) the answer keeps about a quarter of the 4,096-token
# context. A longer text layer marks a dense page, which --split auto reads in bands, with no hint.
TEXT_LAYER_HINT_CHARS = 4000
IMAGE_MARK = "<image>"
FORMAT_EXTENSIONS = {"markdown": ".md", "text": ".txt", "json": ".json", "jsonl": ".jsonl", "csv": ".csv",
                     "html": ".html", "docling": ".docling.json"}


def _clean_prompt(text: str, where: str) -> str:
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    prompt = "\n".join(lines).strip()
    if not prompt:
        raise UsageError(f"{where}: the prompt file is empty")
    if IMAGE_MARK in prompt:
        raise UsageError(f"{where}: the prompt holds {IMAGE_MARK}; vl2 places the image marks itself")
    return prompt


def builtin_prompt(name: str, family: str = "vl2") -> str:
    """A task's own prompt (package data, found wherever the package is installed); '#' lines are comments.
    DeepSeek-OCR has its own prompt forms; where it has none for a task, that is said, not guessed."""
    package = "vl2cli.prompts" if family == "vl2" else "vl2cli.prompts.deepseek_ocr"
    resource = files(package).joinpath(f"{name}.txt")
    if not resource.is_file():
        raise UsageError(f"DeepSeek-OCR has no known prompt for {name.split('_')[0]}: pass --prompt-file, or read "
                         "with a DeepSeek-VL2 model (--model tiny/small/base)")
    return _clean_prompt(resource.read_text("utf-8"), f"{package.replace('.', '/')}/{name}.txt")


def prompt_file_text(path: str) -> str:
    """A --prompt-file: a path, read as it is named (small UTF-8 text, checked before any model loads)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_PROMPT_FILE_BYTES:
            raise UsageError(f"{path}: the prompt file is {size} bytes; prompts are at most {MAX_PROMPT_FILE_BYTES}")
        data = p.read_bytes()
    except IsADirectoryError:
        raise UsageError(f"{path}: cannot read prompt (is a folder)") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read prompt ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: the prompt file is not UTF-8 text") from None
    if "\x00" in text:
        raise UsageError(f"{path}: the prompt file is binary, not text")
    return _clean_prompt(text, path)


def image_marks(n: int) -> str:
    """One image: '<image>\\n'; several: 'This is image_1: <image>\\n...' as the official multi-image examples."""
    if n == 1:
        return IMAGE_MARK + "\n"
    return "".join(f"This is image_{i}: {IMAGE_MARK}\n" for i in range(1, n + 1))


def fill(template: str, text: str | None, schema: str | None = None) -> list[str]:
    """Template pieces with the user's words, as UserText, where {question} / {query} (and {schema}) stand."""
    from vl2cli.engine.processor import UserText  # here: the processor's numpy stays out of `vl2 --help`
    parts: list[str] = []
    for piece in re.split(r"(\{question\}|\{query\}|\{schema\})", template):
        if piece in ("{question}", "{query}"):
            parts.append(UserText((text or "").strip()))
        elif piece == "{schema}":
            parts.append(UserText(schema or ""))
        elif piece:
            parts.append(piece)
    return parts


@dataclass(frozen=True)
class Task:
    name: str
    formats: tuple[str, ...] = ("markdown", "text", "json", "jsonl")
    splittable: bool = False  # dense pages may be read in bands and merged
    needs_text: str | None = None  # "question" or "query": the user's words fill the prompt
    whole_document: bool = False  # --out also gets one file per document (pages joined)
    structured: bool = False  # the answer is a complete document (JSON) or nothing: a cut answer has no data

    def template(self, prompt_file: str | None = None, family: str = "vl2", plain: bool = False) -> str:
        if prompt_file:
            return prompt_file_text(prompt_file)
        if family == "ocr" and plain and self.name == "ocr":
            return builtin_prompt("ocr_text", family)
        return builtin_prompt(self.name, family)

    def check_text(self, text: str | None) -> None:
        if self.needs_text and not (text or "").strip():
            raise UsageError(f"{self.name}: a {self.needs_text} is required")

    def prompt(self, n_images: int, template: str, text: str | None = None, hint: str | None = None,
               schema: str | None = None) -> list[str]:
        """The user turn: image marks, the template with the user's words, and an optional text-layer hint."""
        self.check_text(text)
        parts = [image_marks(n_images), *fill(template, text, schema)]
        if hint:
            from vl2cli.engine.processor import UserText
            parts += ["\nThe page's embedded text layer, for reference:\n", UserText(hint[:TEXT_LAYER_HINT_CHARS])]
        return parts

    def parse(self, answer: str, size: tuple[int, int], text: str | None) -> tuple[dict[str, Any], tuple[str, ...]]:
        """The task's fields from an answer (`size`: the page in pixels), and flags for what it lacks."""
        del answer, size, text  # plain-text tasks have no fields
        return {}, ()

    def render(self, result: PageResult, fmt: str, keep_furniture: bool = False) -> str:
        """One result in a format; `keep_furniture`: ocr's text keeps page headers, footers and numbers."""
        del keep_furniture
        if fmt == "json":
            return json.dumps(result.to_json(), ensure_ascii=False, indent=1)
        if fmt == "jsonl":
            return json.dumps(result.to_json(), ensure_ascii=False)
        if fmt == "text":
            return strip_markdown(result.answer or "")
        return result.answer or ""

    def extension(self, fmt: str) -> str:
        return FORMAT_EXTENSIONS[fmt]

    def render_all(self, results: list[PageResult], fmt: str, schema_json: str | None = None) -> str:
        """A whole answer in one format, as `vl2 TASK -f FMT` prints it on stdout (the server's documents endpoint
        answers with it): JSON as one list, JSON Lines a record a line, extraction CSV as one table; text formats
        page after page, each opened by `<!-- page N: SOURCE -->` (`--- … ---` for text) when there are several, a
        page that failed by that line with its error."""
        if self.whole_document:  # ocr: furniture is found across each document's pages, as the CLI's sinks do
            from vl2cli.document import settle_furniture
            sources = list(dict.fromkeys(r.source for r in results))
            results = [r for source in sources for r in settle_furniture([x for x in results if x.source == source])]
        if fmt == "json":
            return json.dumps([r.to_json() for r in results], ensure_ascii=False, indent=1) + "\n"
        if fmt == "jsonl":
            return "".join(self.render(r, "jsonl") + "\n" for r in results)
        if fmt == "csv" and self.structured:
            return self.csv_lines(results, schema_json)  # type: ignore[attr-defined]
        if fmt not in ("markdown", "text", "html"):  # a table's csv: each page's rows, as stdout has them
            return "".join(self.render(r, fmt).rstrip("\n") + "\n" for r in results if r.ok)
        parts = []
        for r in results:
            said = f"page {r.page}: {r.source}" + ("" if r.ok else f": {r.error}")
            opening = (f"--- {said} ---" if fmt == "text" else f"<!-- {said} -->") + "\n"
            body = self.render(r, fmt).rstrip("\n") + "\n" if r.ok else ""
            parts.append((opening if len(results) > 1 or not r.ok else "") + body)
        return "\n".join(parts)

    @property
    def text_formats(self) -> tuple[str, ...]:
        """The formats written as a file per page beside the record (json/jsonl are the record; docling is one file
        per document)."""
        return tuple(f for f in self.formats if f not in ("json", "jsonl", "docling"))

    strict_by_default: bool = False

    def grammar(self, opts: ReadOptions, budget: int, room: int | None = None) -> Grammar | None:
        """The grammar every answer must follow at this answer budget (`room`: what the context leaves, which a
        structured answer may be re-read with), if the task and options ask for one."""
        del opts, budget, room
        return None

    def settle(self, answer: str, complete: bool, grammar: Grammar | None,
               opts: ReadOptions) -> tuple[dict[str, Any], tuple[str, ...]]:
        """A structured task's fields and flags from its answer: an incomplete answer has no data."""
        del grammar, opts
        fields, flags = self.parse(answer, (0, 0), None)
        return (fields, flags) if complete else ({**fields, "data": None}, ("incomplete_json",))

    def check_strict(self, budget: int) -> None:
        """--strict: compile the task's grammar at the user's budget, so a problem is a usage error up front."""
        del budget
        raise UsageError(f"{self.name}: --strict applies to ground and table")


TABLE_MAX_COLUMNS, TABLE_MAX_ROWS, TABLE_CELL_CHARS = 24, 500, 120
@lru_cache(maxsize=1)
def table_grammar() -> Grammar:
    """A well-formed markdown table: a header row, the separator, then rows, each ending with a newline. Unlike
    extraction it is not sized to the budget: a table cut short still parses row by row (flag token_budget_reached)."""
    return Grammar.from_lark(f"""start: row sep row{{0,{TABLE_MAX_ROWS}}}
row: "|" CELL ("|" CELL){{0,{TABLE_MAX_COLUMNS - 1}}} "|" "\\n"
sep: "|" SEP ("|" SEP){{0,{TABLE_MAX_COLUMNS - 1}}} "|" "\\n"
CELL: /[^|\\n<>]{{1,{TABLE_CELL_CHARS}}}/
SEP: /:?-{{3}}:?/""")


class OcrTask(Task):
    """Page text. Every answer becomes blocks in one layout (vl2cli/layout.py): DeepSeek-OCR's from its layout tags,
    DeepSeek-VL2's and text layers' from their markdown. The markdown/text renderings leave page furniture out
    (unless kept) and write math as \\( \\) / \\[ \\]; the record keeps the answer as the model wrote it."""

    @override
    def parse(self, answer: str, size: tuple[int, int], text: str | None) -> tuple[dict[str, Any], tuple[str, ...]]:
        del text
        blocks = page_blocks(answer, *size)
        return {"blocks": blocks, "furniture": furniture_of(blocks)}, ()

    @override
    def render(self, result: PageResult, fmt: str, keep_furniture: bool = False) -> str:
        blocks = result.fields.get("blocks")
        if fmt in ("markdown", "text") and blocks is not None:
            clean = blocks_markdown(blocks, keep_furniture)
            return strip_markdown(clean) if fmt == "text" else clean
        return super().render(result, fmt, keep_furniture)


class TableTask(Task):
    @override
    def grammar(self, opts: ReadOptions, budget: int, room: int | None = None) -> Grammar | None:
        del budget, room
        return table_grammar() if opts.strict else None

    @override
    def check_strict(self, budget: int) -> None:
        del budget
        table_grammar()

    @override
    def parse(self, answer: str, size: tuple[int, int], text: str | None) -> tuple[dict[str, Any], tuple[str, ...]]:
        del size, text
        tables = parse_tables(answer)
        flags = ("merged_cells",) if any(t.get("spans") for t in tables) else ()  # csv flattens them (see table_to_csv)
        return {"tables": tables}, flags if tables else ("no_table",)

    @override
    def render(self, result: PageResult, fmt: str, keep_furniture: bool = False) -> str:
        tables = result.fields.get("tables") or []
        if fmt == "csv":
            return "\n".join(table_to_csv(t) for t in tables)
        if fmt == "html":
            return "\n".join(table_to_html(t) for t in tables)
        if fmt == "markdown":
            return "\n\n".join(table_to_markdown(t) for t in tables) if tables else (result.answer or "")
        return super().render(result, fmt, keep_furniture)


class ChartTask(Task):
    @override
    def parse(self, answer: str, size: tuple[int, int], text: str | None) -> tuple[dict[str, Any], tuple[str, ...]]:
        del size, text
        tables = parse_tables(answer)
        description = answer
        if tables:  # the description is what is not a table row
            description = "\n".join(line for line in answer.splitlines() if "|" not in line and "<t" not in line)
        return {"description": description.strip(), "data": tables[0] if tables else None}, ()


GROUND_LABEL_CHARS, GROUND_MAX_BOXES, GROUND_MAX_OBJECTS = 40, 6, 10
GROUND_BOX_TOKENS = 21  # "[999, 999, 999, 999], " at one byte a token, the worst case


@lru_cache(maxsize=32)
def grounding_grammar(budget: int) -> Grammar:
    """`<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>`, repeated, coordinates 0-999: every box parses.

    Sized to the budget: up to 10 objects of a 40-character label and 6 boxes (~290 tokens each); a short budget
    gets fewer, smaller objects, down to one object with one box and a 4-character label."""
    room = budget - 1  # the end token
    boxes, label = GROUND_MAX_BOXES, GROUND_LABEL_CHARS
    while 7 + label * 4 + boxes * GROUND_BOX_TOKENS > room and (boxes > 1 or label > 4):
        boxes, label = max(1, boxes - 1), max(4, label * 3 // 4)
    per_object = 7 + label * 4 + boxes * GROUND_BOX_TOKENS
    objects = min(GROUND_MAX_OBJECTS, room // per_object)
    if objects < 1:
        raise GrammarError(f"--strict grounding needs at least {per_object + 1} tokens; the answer budget is {budget} "
                           "(raise --max-new-tokens, or pass --no-strict)")
    more = f' (", " box){{0,{boxes - 1}}}' if boxes > 1 else ""
    return Grammar.from_lark(f"""start: item{{1,{objects}}}
item: <|ref|> LABEL <|/ref|> <|det|> "[" box{more} "]" <|/det|>
box: "[" N ", " N ", " N ", " N "]"
N: /[0-9]{{1,3}}/
LABEL: /[^<>\\n]{{1,{label}}}/""")


class GroundTask(Task):
    @override
    def grammar(self, opts: ReadOptions, budget: int, room: int | None = None) -> Grammar | None:
        return grounding_grammar(budget) if opts.strict and self.name == "ground" else None

    @override
    def check_strict(self, budget: int) -> None:
        if self.name == "ground":
            grounding_grammar(budget)

    @override
    def parse(self, answer: str, size: tuple[int, int], text: str | None) -> tuple[dict[str, Any], tuple[str, ...]]:
        objects = parse_grounding(answer, *size, default_label=(text or "").strip())
        return {"objects": objects, "caption": strip_grounding_tags(answer)}, () if objects else ("no_boxes",)

    @override
    def render(self, result: PageResult, fmt: str, keep_furniture: bool = False) -> str:
        if fmt in ("markdown", "text"):
            objects = result.fields.get("objects") or []
            lines = [f"{o['label'] or '?'}: {o['box']} (normalised {o['box_norm']})" for o in objects]
            caption = result.fields.get("caption", "")
            shown = ([caption] if caption and self.name == "caption" else []) + lines
            return "\n".join(shown) or "(no boxes in the answer)"
        return super().render(result, fmt, keep_furniture)


def annotate(image: Image.Image, objects: list[dict]) -> Image.Image:
    """The page with each box drawn and labelled."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    palette = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]
    width = max(2, round(min(out.size) / 300))
    for i, obj in enumerate(objects):
        color = palette[i % len(palette)]
        x1, y1, x2, y2 = obj["box"]
        draw.rectangle([x1, y1, max(x1, x2), max(y1, y2)], outline=color, width=width)
        if obj.get("label"):
            draw.text((x1 + width, max(0, y1 - 12)), obj["label"][:60], fill=color)
    return out


class ExtractTask(Task):
    """Fields from a JSON Schema: the answer is constrained to the schema, so `data` always validates."""

    @override
    def grammar(self, opts: ReadOptions, budget: int, room: int | None = None) -> Grammar | None:
        if not opts.schema_json:
            raise UsageError("extract: give --schema FILE or --fields SPEC")
        return schema_grammar(opts.schema_json, max(budget, room or 0))

    @override
    def settle(self, answer: str, complete: bool, grammar: Grammar | None,
               opts: ReadOptions) -> tuple[dict[str, Any], tuple[str, ...]]:
        return settle(answer, complete, grammar, opts.schema_json)

    @override
    def parse(self, answer: str, size: tuple[int, int], text: str | None) -> tuple[dict[str, Any], tuple[str, ...]]:
        del size, text
        try:
            return {"data": json.loads(answer)}, ()
        except (ValueError, RecursionError):  # nested deeper than Python's parser goes: not JSON it can read
            return {"data": None}, ("incomplete_json",)

    @override
    def render(self, result: PageResult, fmt: str, keep_furniture: bool = False) -> str:
        if fmt == "csv":
            schema = (result.grammar or {}).get("schema")
            return self.csv_lines([result], json.dumps(schema) if schema else None)
        return super().render(result, fmt, keep_furniture)

    def columns(self, schema_json: str | None) -> list[str]:
        schema = json.loads(schema_json) if schema_json else {}
        return list((schema.get("properties") or {}).keys())

    def csv_lines(self, results: list[PageResult], schema_json: str | None, header: bool = True) -> str:
        """One row per page (or document): source, page, then the top-level fields; nested values as JSON."""
        import csv
        import io
        columns = self.columns(schema_json)
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        if header:
            writer.writerow(["source", "page", *columns])
        for result in results:
            writer.writerow([result.source, result.page, *csv_row(result.fields.get("data"), columns)])
        return buf.getvalue()


TASKS: dict[str, Task] = {
    "ocr": OcrTask("ocr", formats=("markdown", "text", "json", "jsonl", "docling"), splittable=True, whole_document=True),
    "ask": Task("ask", needs_text="question"),
    "table": TableTask("table", formats=("json", "jsonl", "csv", "markdown", "html")),
    "chart": ChartTask("chart"),
    "ground": GroundTask("ground", needs_text="query", strict_by_default=True),
    "caption": GroundTask("caption"),
    "extract": ExtractTask("extract", formats=("json", "jsonl", "csv"), structured=True),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}: expected one of {', '.join(TASKS)}")
    return TASKS[name]
