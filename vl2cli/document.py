"""A document's pages together: page furniture found across them, the whole-document text with what a page break
cut joined again (a table continued on the next page, a paragraph or a hyphenated word), and a DoclingDocument.

Works on a document's ocr results (PageResult) in page order; failed pages are passed through untouched.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from vl2cli.layout import (
    FURNITURE,
    blocks_markdown,
    find_furniture,
    furniture_of,
    labelled_by_model,
    page_blocks,
    strip_markdown,
)
from vl2cli.parsers import parse_tables, table_to_html, table_to_markdown
from vl2cli.results import PageResult


def settle_furniture(results: Sequence[PageResult]) -> list[PageResult]:
    """Each page's blocks and `furniture` with the furniture of the whole document: pages whose model labelled its
    blocks (DeepSeek-OCR) keep its labels; the others (DeepSeek-VL2 answers, text layers) are compared with each other
    (vl2cli/layout.py find_furniture). Idempotent: the blocks are read off the answers again each time."""
    results = list(results)
    unlabelled = [i for i, r in enumerate(results) if r.ok and r.task == "ocr"
                  and not labelled_by_model(r.fields.get("blocks") or [])]
    pages = [page_blocks(results[i].answer or "", results[i].width or 0, results[i].height or 0) for i in unlabelled]
    for i, blocks in zip(unlabelled, find_furniture(pages)):
        results[i] = replace(results[i], fields={**results[i].fields, "blocks": blocks,
                                                 "furniture": furniture_of(blocks)})
    return results


# ----------------------------------------------------------------------------- continuity across page breaks

_SENTENCE_END = re.compile(r"[.!?:;。！？…]['\"”’)\]]*$")
_HYPHENATED = re.compile(r"[^\W\d_]-$")


def _content(blocks: list[dict[str, Any]], keep_furniture: bool) -> list[dict[str, Any]]:
    return [b for b in sorted(blocks, key=lambda b: b.get("order", 0))
            if keep_furniture or b["label"] not in FURNITURE]


def join_page_breaks(pages: Sequence[list[dict[str, Any]] | None],
                     keep_furniture: bool = False) -> list[list[dict[str, Any]] | None]:
    """Pages' content blocks (furniture left out unless kept) with what a page break cut joined, on the page where
    it starts: a table whose next page opens with a table of as many columns becomes one table (a repeated header
    row dropped); a paragraph that ends mid-sentence at the foot of a page takes the next page's first paragraph (a
    word hyphenated across the break is joined without its hyphen). None stands for a page not read: nothing joins
    across it."""
    out = [None if p is None else [dict(b) for b in _content(p, keep_furniture)] for p in pages]
    for i in range(len(out) - 1):
        here, there = out[i], out[i + 1]
        body_here = [b for b in here or [] if b["label"] not in FURNITURE]  # kept furniture sits at the edges
        body_there = [b for b in there or [] if b["label"] not in FURNITURE]
        if not body_here or not body_there or there is None:
            continue
        last, first = body_here[-1], body_there[0]
        joined = _joined(last, first)
        if joined is not None:
            last["text"] = joined
            there.remove(first)
    return out


def _joined(last: dict[str, Any], first: dict[str, Any]) -> str | None:
    """The text of `last` with `first` (the next page's first block) joined on, or None when they do not continue."""
    if last["label"] == "table" and first["label"] == "table":
        return _join_tables(last["text"], first["text"])
    if last["label"] == "text" and first["label"] == "text":
        tail, head = last["text"].rstrip(), first["text"].lstrip()
        if _HYPHENATED.search(tail) and head[:1].islower():
            return tail[:-1] + head
        if not _SENTENCE_END.search(tail) and head[:1].isalnum():
            return f"{tail} {head}"
    return None


def _join_tables(upper: str, lower: str) -> str | None:
    tables_up, tables_low = parse_tables(upper), parse_tables(lower)
    if len(tables_up) != 1 or len(tables_low) != 1:
        return None
    a, b = tables_up[0], tables_low[0]
    if len(a["columns"]) != len(b["columns"]) or b.get("spans"):
        return None
    repeated_header = [c.strip().lower() for c in b["columns"]] == [c.strip().lower() for c in a["columns"]]
    merged = {**a, "rows": a["rows"] + ([] if repeated_header else [b["columns"]]) + b["rows"]}
    html_answer = upper.lstrip().lower().startswith("<table")
    return table_to_html(merged) if html_answer or merged.get("spans") else table_to_markdown(merged)


def document_text(results: Sequence[PageResult], fmt: str, keep_furniture: bool = False) -> str:
    """The whole-document markdown or text file: each page opened by a line `<!-- page N -->` (markdown) or
    `--- page N ---` (text), as the pages are separated on stdout; furniture left out unless kept, page breaks
    joined (join_page_breaks); a page not read says why."""
    def opening(number: int, why: str | None = None) -> str:
        said = f"page {number}" + (f": {why}" if why else "")
        return f"--- {said} ---" if fmt == "text" else f"<!-- {said} -->"
    pages = join_page_breaks([r.fields.get("blocks") if r.ok else None for r in results], keep_furniture)
    parts = []
    for result, blocks in zip(results, pages):
        if blocks is None:
            parts.append(opening(result.page, result.error or "not read yet") + "\n")
            continue
        text = blocks_markdown(blocks, keep_furniture=True)  # furniture was left out by join_page_breaks already
        parts.append(f"{opening(result.page)}\n{(strip_markdown(text) if fmt == 'text' else text).rstrip()}\n")
    return "\n".join(parts)
