"""One page layout for every model: blocks with a label from a fixed vocabulary, their text, a box where the model
gave one, and their reading order; page furniture (headers, footers, page numbers) found in them; math delimiters
made uniform for the markdown.

DeepSeek-OCR's answers label their blocks (`<|ref|>label<|/ref|><|det|>[[box]]<|/det|>`): its labels are mapped
onto the vocabulary. DeepSeek-VL2's answers and PDF text layers are plain markdown: their blocks come from the
markdown's structure (headings, lists, tables, display math, paragraphs) and have no boxes, and their furniture is
found across a document's pages (short lines repeated at the top or bottom of several pages, up to varying digits;
lone page numbers and "Page N of M"), as PDF tools find running heads. Any string in; nothing here raises.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from vl2cli.parsers import parse_layout

LABELS = ("title", "section_header", "text", "list_item", "table", "figure", "caption", "formula", "page_header",
          "page_footer", "page_number", "footnote")
FURNITURE = ("page_header", "page_footer", "page_number")

# DeepSeek-OCR's own labels (and the common spellings of layout models) -> the vocabulary; an unknown one is text.
MODEL_LABELS = {
    "title": "title", "doc_title": "title",
    "sub_title": "section_header", "subtitle": "section_header", "section_header": "section_header",
    "section-header": "section_header", "heading": "section_header", "header_title": "section_header",
    "text": "text", "paragraph": "text", "plain_text": "text", "abstract": "text", "reference": "text",
    "list": "list_item", "list_item": "list_item", "list-item": "list_item",
    "table": "table",
    "image": "figure", "figure": "figure", "picture": "figure", "chart": "figure",
    "image_caption": "caption", "table_caption": "caption", "figure_caption": "caption", "caption": "caption",
    "figure_title": "caption", "chart_caption": "caption",
    "equation": "formula", "formula": "formula", "isolate_formula": "formula", "interline_equation": "formula",
    "header": "page_header", "page_header": "page_header", "page-header": "page_header",
    "footer": "page_footer", "page_footer": "page_footer", "page-footer": "page_footer",
    "page_number": "page_number", "page_num": "page_number", "page-number": "page_number",
    "footnote": "footnote", "table_footnote": "footnote", "page_footnote": "footnote", "image_footnote": "footnote",
}


def vocabulary_label(model_label: str) -> str:
    return MODEL_LABELS.get(model_label.strip().lower(), "text")


def block(label: str, text: str, order: int, box: list[int] | None = None, box_norm: list[float] | None = None,
          tag: str | None = None) -> dict[str, Any]:
    """A block as the record holds it: `tag` is the model's own label (null for blocks read off markdown)."""
    return {"label": label, "text": text, "box": box, "box_norm": box_norm, "order": order, "tag": tag}


def page_blocks(answer: str, width: int, height: int) -> list[dict[str, Any]]:
    """An answer's blocks: from DeepSeek-OCR's layout tags where it has them, else from its markdown structure."""
    if not isinstance(answer, str):
        return []
    tagged = parse_layout(answer, width, height)
    if tagged:
        return [block(vocabulary_label(b["label"]), b["text"], i, b["box"], b["box_norm"], b["label"])
                for i, b in enumerate(tagged)]
    return markdown_blocks(answer)


# ----------------------------------------------------------------------------- markdown structure

_HEADING = re.compile(r"^(#{1,6})\s+\S")
_LIST_ITEM = re.compile(r"^\s{0,3}(?:[-*+•]|\d{1,3}[.)])\s+\S")
_FENCE = re.compile(r"^\s*(```|~~~)")
_IMAGE = re.compile(r"^\s*!\[[^\]]*\]\([^)]*\)\s*$")
_DISPLAY_OPEN = re.compile(r"^\s*(\$\$|\\\[|\\begin\{(equation|align|gather|multline|eqnarray|displaymath)\*?\})")
_DISPLAY_CLOSE = re.compile(r"(\$\$|\\\]|\\end\{(equation|align|gather|multline|eqnarray|displaymath)\*?\})\s*$")


def _is_table_line(line: str) -> bool:
    stripped = line.strip()
    return stripped.startswith("|") or stripped.count("|") >= 2


def markdown_blocks(text: str) -> list[dict[str, Any]]:
    """Blocks of a markdown (or plain) answer, in its order: `#` is a title, deeper headings section headers, list
    items, pipe and HTML tables, fenced code (text), display math, images (figures), and paragraphs between blank
    lines. Each block's text is its markdown, as written."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    blocks: list[tuple[str, list[str]]] = []
    i, n = 0, len(lines)
    para: list[str] = []

    def flush() -> None:
        if para:
            blocks.append(("text", para.copy()))
            para.clear()

    while i < n:
        line = lines[i]
        stripped = line.strip()
        if not stripped:
            flush()
            i += 1
            continue
        if _FENCE.match(line) or stripped.lower().startswith("<table") or _DISPLAY_OPEN.match(line):
            flush()
            end = _closing(lines, i)
            label = "text" if _FENCE.match(line) else "table" if stripped.lower().startswith("<table") else "formula"
            blocks.append((label, lines[i:end + 1]))
            i = end + 1
            continue
        heading = _HEADING.match(line)
        if heading:
            flush()
            blocks.append(("title" if len(heading.group(1)) == 1 else "section_header", [line]))
        elif _IMAGE.match(line):
            flush()
            blocks.append(("figure", [line]))
        elif _is_table_line(line) and _table_follows(lines, i):
            flush()
            end = i
            while end + 1 < n and lines[end + 1].strip() and _is_table_line(lines[end + 1]):
                end += 1
            blocks.append(("table", lines[i:end + 1]))
            i = end + 1
            continue
        elif _LIST_ITEM.match(line):
            flush()
            item = [line]
            while i + 1 < n and lines[i + 1].startswith(("  ", "\t")) and lines[i + 1].strip() \
                    and not _LIST_ITEM.match(lines[i + 1]):
                i += 1
                item.append(lines[i])
            blocks.append(("list_item", item))
        else:
            para.append(line)
        i += 1
    flush()
    return [block(label, "\n".join(body).strip("\n"), k) for k, (label, body) in enumerate(blocks)]


def _table_follows(lines: list[str], i: int) -> bool:
    """A pipe table starts where a pipe line is followed by a separator line (or, starting a line with `|`, by another
    pipe row)."""
    if i + 1 >= len(lines) or not _is_table_line(lines[i + 1]):
        return False
    separator = re.fullmatch(r"\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*", lines[i + 1]) is not None
    return separator or (lines[i].lstrip().startswith("|") and lines[i + 1].lstrip().startswith("|"))


def _closing(lines: list[str], i: int) -> int:
    """The last line of the fenced, HTML-table or display-math block opened at line i (the end of the answer if
    it never closes)."""
    first = lines[i].strip()
    if _FENCE.match(first):
        fence = first[:3]
        return next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(fence)), len(lines) - 1)
    if first.lower().startswith("<table"):
        depth = 0
        for j in range(i, len(lines)):
            low = lines[j].lower()
            depth += low.count("<table") - low.count("</table")
            if depth <= 0:
                return j
        return len(lines) - 1
    opened = _DISPLAY_OPEN.match(first)
    rest = first[opened.end():] if opened else ""
    if _DISPLAY_CLOSE.search(rest):
        return i
    return next((j for j in range(i + 1, len(lines)) if _DISPLAY_CLOSE.search(lines[j].strip())), len(lines) - 1)


# ----------------------------------------------------------------------------- math

_CODE = re.compile(r"```.*?(?:```|$)|~~~.*?(?:~~~|$)|`[^`\n]*`", re.S)
_ENVIRONMENT = re.compile(r"\\begin\{(equation|displaymath|align|gather|multline|eqnarray)(\*?)\}(.*?)\\end\{\1\2\}",
                          re.S)
_DISPLAY_DOLLARS = re.compile(r"(?<!\\)\$\$(.+?)(?<!\\)\$\$", re.S)
_INLINE_DOLLAR = re.compile(r"(?<![\\$])\$(?=[^\s$])([^$\n]*?[^\s\\$])\$(?![\d$])")
_ALIGNED = {"align": "aligned", "eqnarray": "aligned", "gather": "gathered", "multline": "gathered"}


def normalize_math(text: str) -> str:
    """Inline math as `\\(...\\)` and display math as `\\[...\\]` (MathJax's and olmOCR-bench's convention), whatever
    the model wrote: `$...$`, `$$...$$`, or a bare equation/align/gather environment. Code spans are left alone,
    and a `$` that cannot open or close math (a price, "$5 and $10") stays a dollar sign, by pandoc's rules."""
    if "$" not in text and "\\begin{" not in text:
        return text
    out, last = [], 0
    for code in _CODE.finditer(text):
        out.append(_normalize_math_span(text[last:code.start()]))
        out.append(code.group(0))
        last = code.end()
    out.append(_normalize_math_span(text[last:]))
    return "".join(out)


def _normalize_math_span(text: str) -> str:
    def environment(match: re.Match) -> str:
        name, body = match.group(1), match.group(3).strip()
        inner = _ALIGNED.get(name)
        return f"\\[{body}\\]" if inner is None else f"\\[\\begin{{{inner}}}{body}\\end{{{inner}}}\\]"

    # An environment already inside display delimiters stays as it is.
    text = re.sub(r"(\\\[|\$\$)\s*(\\begin\{)", r"\1\2", text)
    pieces = re.split(r"(\\\[.*?\\\]|\$\$.*?\$\$)", text, flags=re.S)
    for k in range(0, len(pieces), 2):
        pieces[k] = _ENVIRONMENT.sub(environment, pieces[k])
    text = "".join(pieces)
    text = _DISPLAY_DOLLARS.sub(lambda m: f"\\[{m.group(1).strip()}\\]", text)
    return _INLINE_DOLLAR.sub(lambda m: f"\\({m.group(1)}\\)", text)


# ----------------------------------------------------------------------------- page furniture

EDGE_LINES = 2  # lines at the top and at the bottom of a page that may be furniture
FURNITURE_MAX_CHARS = 120  # a running head is a short line
_PAGE_NUMBER = re.compile(r"^(?:(?:page|p\.|pg\.?|seite|página|pagina)\s*)?[-–—(\[]?\s*(?:\d{1,4}|[ivxlcdm]{1,7})"
                          r"\s*[-–—)\]]?(?:\s*(?:of|/|von|de|sur)\s*\d{1,4})?$", re.I)
_DIGITS = re.compile(r"\d+")
_NOT_CANDIDATES = ("table", "formula", "figure")


def furniture_key(line: str) -> str:
    """A line as running heads repeat it: case, spacing and digits (page numbers, dates) do not count."""
    return _DIGITS.sub("#", " ".join(line.lower().split()))


def is_page_number(line: str) -> bool:
    return bool(_PAGE_NUMBER.match(line.strip()))


def _edge_lines(blocks: Sequence[dict[str, Any]]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(block index, line index) of the first and last EDGE_LINES text lines of a page (tables, math and figures are
    never furniture; a block already labelled furniture is left as it is)."""
    lines = [(b, k) for b, blk in enumerate(blocks) if blk["label"] not in _NOT_CANDIDATES + FURNITURE
             for k, line in enumerate(blk["text"].split("\n")) if line.strip()]
    top = lines[:EDGE_LINES]
    bottom = [x for x in lines[-EDGE_LINES:] if x not in top]
    return top, bottom


def find_furniture(pages: Sequence[Sequence[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    """Pages' blocks with their furniture labelled: a line at the top (bottom) of a page whose digit-blind form
    recurs at the top (bottom) of at least two pages and of 40% of them is a page header (footer); a lone page
    number or "Page N of M" there is a page number. Lines are taken from the page's edge inwards (at most
    EDGE_LINES) and the first one that is not furniture ends the search. A furniture line that shares a block with
    other lines is split off into its own block. A one-page document has nothing to compare with: it keeps every
    line."""
    copies = [list(p) for p in pages]
    if len(copies) < 2:
        return copies
    edges = [_edge_lines(p) for p in copies]
    seen: dict[str, Counter[str]] = {"top": Counter(), "bottom": Counter()}
    for blocks, (top, bottom) in zip(copies, edges):
        for where, spots in (("top", top), ("bottom", bottom)):
            keys = {furniture_key(_line(blocks, spot)) for spot in spots}
            seen[where].update(k for k in keys if len(k) <= FURNITURE_MAX_CHARS)
    needed = max(2, math.ceil(0.4 * len(copies)))
    out = []
    for blocks, (top, bottom) in zip(copies, edges):
        marks: dict[tuple[int, int], str] = {}
        for where, spots, label in (("top", top, "page_header"), ("bottom", bottom[::-1], "page_footer")):
            for spot in spots:  # from the page's edge inwards, up to the first line that is content
                line = _line(blocks, spot).strip()
                if is_page_number(line):
                    marks[spot] = "page_number"
                elif len(line) <= FURNITURE_MAX_CHARS and seen[where][furniture_key(line)] >= needed:
                    marks[spot] = label
                else:
                    break
        out.append(_split_marked(blocks, marks))
    return out


def _line(blocks: Sequence[dict[str, Any]], spot: tuple[int, int]) -> str:
    return blocks[spot[0]]["text"].split("\n")[spot[1]]


def _split_marked(blocks: list[dict[str, Any]], marks: dict[tuple[int, int], str]) -> list[dict[str, Any]]:
    if not marks:
        return blocks
    out: list[dict[str, Any]] = []
    for b, blk in enumerate(blocks):
        lines = blk["text"].split("\n")
        if not any((b, k) in marks for k in range(len(lines))):
            out.append(blk)
            continue
        run: list[str] = []
        for k, line in enumerate(lines):
            label = marks.get((b, k))
            if label is None:
                run.append(line)
                continue
            if run and "\n".join(run).strip():
                out.append({**blk, "text": "\n".join(run).strip("\n")})
            run = []
            out.append({**blk, "label": label, "text": line.strip()})
        if run and "\n".join(run).strip():
            out.append({**blk, "text": "\n".join(run).strip("\n")})
    return [{**blk, "order": i} for i, blk in enumerate(out)]


def furniture_of(blocks: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The record's `furniture`: what the text outputs leave out, in reading order."""
    return [{"label": b["label"], "text": b["text"], "order": b["order"]} for b in blocks if b["label"] in FURNITURE]


def labelled_by_model(blocks: Sequence[dict[str, Any]]) -> bool:
    return any(b.get("tag") for b in blocks)


# ----------------------------------------------------------------------------- markdown from blocks

def strip_markdown(text: str) -> str:
    """Plain text from markdown: heading marks and bold go."""
    text = re.sub(r"^#{1,6}\s*", "", text, flags=re.M)
    return re.sub(r"(\*\*|__)(.*?)\1", r"\2", text)


def blocks_markdown(blocks: Sequence[dict[str, Any]], keep_furniture: bool = False) -> str:
    """Markdown from blocks in reading order: furniture left out unless kept, math delimiters uniform, a cropped
    figure as an image link; list items stay one list."""
    parts: list[str] = []
    previous = None
    for blk in sorted(blocks, key=lambda b: b.get("order", 0)):
        if blk["label"] in FURNITURE and not keep_furniture:
            continue
        if blk.get("figure"):
            text = f"![{blk.get('tag') or blk['label']}]({blk['figure']})"
        else:
            text = normalize_math(blk["text"]) if blk["label"] != "table" else blk["text"]
        if not text.strip():
            continue
        if parts and previous == "list_item" and blk["label"] == "list_item":
            parts[-1] += "\n" + text
        else:
            parts.append(text)
        previous = blk["label"]
    return "\n\n".join(parts)
