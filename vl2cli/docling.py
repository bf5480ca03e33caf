"""`-f docling`: a document's ocr results as a docling-core DoclingDocument, so docling's chunkers (HybridChunker)
and exporters run on vl2's output.

Blocks map onto docling's items: title, section headers (their markdown level), text, list items (consecutive ones
in one list group), tables (cells with their row and column spans), pictures (the cropped figure when there is one),
captions, formulas, footnotes; page headers, footers and numbers go to the furniture layer. Boxes become
provenance (page pixels, top-left origin) where the model gave them. What a page break cut is joined first
(vl2cli/document.py), as in the whole-document file. docling-core is an optional extra: `pip install vl2cli[docling]`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vl2cli.document import join_page_breaks
from vl2cli.errors import UsageError
from vl2cli.layout import FURNITURE, normalize_math, strip_markdown
from vl2cli.parsers import parse_tables
from vl2cli.results import PageResult

_MARKER = re.compile(r"^\s*([-*+•]|\d{1,3}[.)])\s+")
_HEADING = re.compile(r"^\s*(#{1,6})\s+")
_DELIMITERS = re.compile(r"^\s*(\\\[|\\\(|\$\$|\$)(.*?)(\\\]|\\\)|\$\$|\$)\s*$", re.S)


def _docling() -> Any:
    try:
        from docling_core.types import doc
    except ImportError:
        raise UsageError("-f docling needs docling-core: pip install 'vl2cli[docling]'") from None
    return doc


def check_docling() -> None:
    """Before any model loads: -f docling is refused at once where docling-core is missing."""
    _docling()


def docling_document(results: Sequence[PageResult]) -> Any:
    """A DoclingDocument of one document's ocr results in page order (failed pages have no items)."""
    d = _docling()
    name = Path(results[0].source).name if results else "document"
    doc = d.DoclingDocument(name=name)
    pages = join_page_breaks([r.fields.get("blocks") if r.ok else None for r in results], keep_furniture=True)
    for result, blocks in zip(results, pages):
        if blocks is None:
            continue
        doc.add_page(page_no=result.page, size=d.Size(width=result.width or 0, height=result.height or 0))
        group = None
        for index, blk in enumerate(blocks):
            prov = _provenance(d, result.page, blk, len(blk["text"]))
            if blk["label"] == "list_item":
                group = group or doc.add_list_group()
                _add_list_item(doc, blk["text"], prov, group)
                continue
            group = None
            if blk["label"] in FURNITURE:
                top = blk["label"] == "page_header" or (blk["label"] == "page_number" and index < len(blocks) / 2)
                doc.add_text(label=d.DocItemLabel.PAGE_HEADER if top else d.DocItemLabel.PAGE_FOOTER, text=blk["text"],
                             prov=prov, content_layer=d.ContentLayer.FURNITURE)
            else:
                _add_body_block(d, doc, blk, prov)
    return doc


def _add_list_item(doc: Any, text: str, prov: Any, group: Any) -> None:
    marker = _MARKER.match(text)
    doc.add_list_item(text=_MARKER.sub("", strip_markdown(normalize_math(text))).strip(), orig=text,
                      enumerated=bool(marker and marker.group(1)[0].isdigit()),
                      marker=marker.group(1) if marker else None, prov=prov, parent=group)


def _add_body_block(d: Any, doc: Any, blk: dict[str, Any], prov: Any) -> None:
    text, label = blk["text"], blk["label"]
    if label in ("title", "section_header"):
        heading = _HEADING.match(text)
        plain = _HEADING.sub("", strip_markdown(text)).strip()
        if label == "title":
            doc.add_title(text=plain, orig=text, prov=prov)
        else:  # "## x" is a level-1 section ("# x" is the title)
            doc.add_heading(text=plain, orig=text, level=max(1, len(heading.group(1)) - 1) if heading else 1, prov=prov)
    elif label == "table":
        _add_tables(d, doc, text, prov)
    elif label == "figure":
        doc.add_picture(image=_figure(d, blk), prov=prov)
    elif label == "formula":
        bare = _DELIMITERS.match(normalize_math(text))
        doc.add_formula(text=(bare.group(2) if bare else text).strip(), orig=text, prov=prov)
    else:
        kind = {"caption": d.DocItemLabel.CAPTION, "footnote": d.DocItemLabel.FOOTNOTE}.get(label, d.DocItemLabel.TEXT)
        doc.add_text(label=kind, text=strip_markdown(normalize_math(text)).strip(), orig=text, prov=prov)


def docling_json(results: Sequence[PageResult], indent: int | None = 1) -> str:
    return json.dumps(docling_document(results).export_to_dict(), ensure_ascii=False, indent=indent)


def _provenance(d: Any, page: int, blk: dict[str, Any], length: int) -> Any:
    box = blk.get("box")
    if not box:
        return None
    x1, y1, x2, y2 = box
    return d.ProvenanceItem(page_no=page, charspan=(0, length),
                            bbox=d.BoundingBox(l=x1, t=y1, r=x2, b=y2, coord_origin=d.CoordOrigin.TOPLEFT))


def _add_tables(d: Any, doc: Any, text: str, prov: Any) -> None:
    for table in parse_tables(text):
        grid = [table["columns"], *table["rows"]]
        spans_of = {(s["row"], s["col"]): s for s in table.get("spans") or []}
        covered = {(s["row"] + r, s["col"] + c) for s in spans_of.values() for r in range(s["rowspan"])
                   for c in range(s["colspan"]) if (r, c) != (0, 0)}
        cells = []
        for r, row in enumerate(grid):
            for c, value in enumerate(row):
                if (r, c) in covered:
                    continue
                span = spans_of.get((r, c), {"rowspan": 1, "colspan": 1})
                cells.append(d.TableCell(text=value, row_span=span["rowspan"], col_span=span["colspan"],
                                         start_row_offset_idx=r, end_row_offset_idx=r + span["rowspan"],
                                         start_col_offset_idx=c, end_col_offset_idx=c + span["colspan"],
                                         column_header=r == 0))
        data = d.TableData(num_rows=len(grid), num_cols=len(table["columns"]), table_cells=cells)
        doc.add_table(data=data, prov=prov)


def _figure(d: Any, blk: dict[str, Any]) -> Any:
    """The cropped figure (--out writes it beside the page's files and this document's file), by its file name."""
    name, box = blk.get("figure"), blk.get("box")
    if not name or not box:
        return None
    return d.ImageRef(mimetype="image/png", dpi=72, size=d.Size(width=box[2] - box[0], height=box[3] - box[1]),
                      uri=Path(name))
