"""Parsers of model answers: tables (markdown, HTML, LaTeX), grounding boxes, and repetition loops.

They accept any string and never raise: a model's output is data, never code (no eval).
"""

from __future__ import annotations

import html
import math
import re
from html.parser import HTMLParser

Table = dict  # {"columns": [str], "rows": [[str]]}, and "spans": [{"row", "col", "rowspan", "colspan"}] when merged

_SEPARATOR_CELL = re.compile(r"^\s*:?-{1,}:?\s*$")


def _split_pipe_row(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    cells = re.split(r"(?<!\\)\|", line)
    return [c.strip().replace("\\|", "|") for c in cells]


def _shape(columns: list[str], rows: list[list[str]]) -> Table:
    width = max([len(columns)] + [len(r) for r in rows]) if (columns or rows) else 0
    columns = columns + [""] * (width - len(columns))
    rows = [r + [""] * (width - len(r)) for r in rows]
    return {"columns": columns, "rows": rows}


def parse_markdown_tables(text: str) -> list[Table]:
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if (line.count("|") >= 1 and line.strip().startswith("|")) or line.count("|") >= 2:
            block.append(line)
            continue
        if block:
            rows = [_split_pipe_row(b) for b in block]
            body = [r for r in rows if not all(_SEPARATOR_CELL.match(c) for c in r if c) or not any(r)]
            has_sep = len(rows) > 1 and all(_SEPARATOR_CELL.match(c) for c in rows[1] if c) and any(rows[1])
            if has_sep:
                tables.append(_shape(rows[0], [r for r in rows[2:] if any(c for c in r)]))
            elif len(body) >= 2:
                tables.append(_shape(body[0], body[1:]))
            block = []
    return tables


MAX_SPAN = 100  # a rowspan/colspan beyond this is the model rambling: it counts as 1


def _span(value: str | None) -> int:
    return int(value) if value and value.strip().isdigit() and 0 < int(value) <= MAX_SPAN else 1


class _HtmlTables(HTMLParser):
    """HTML tables onto a grid: a cell with rowspan/colspan holds its text in its top-left grid cell, the cells it
    covers stay empty, and the table's `spans` lists it (row 0 is the header row, `columns`)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[dict] = []
        self.stack: list[dict] = []  # nested tables: inner ones become their own tables
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.stack.append({"cells": [], "row": -1, "in_row": False})
        elif not self.stack:
            return
        elif tag == "tr":
            self._open_row()
        elif tag in ("td", "th"):
            t = self.stack[-1]
            if not t["in_row"]:
                self._open_row()
            a = dict(attrs)
            self.cell = []
            t["cells"].append([t["row"], _span(a.get("rowspan")), _span(a.get("colspan")), ""])

    def _open_row(self) -> None:
        t = self.stack[-1]
        t["row"] += 1
        t["in_row"] = True

    def handle_endtag(self, tag: str) -> None:
        if not self.stack:
            return
        t = self.stack[-1]
        if tag in ("td", "th") and self.cell is not None and t["cells"]:
            t["cells"][-1][3] = " ".join("".join(self.cell).split())
            self.cell = None
        elif tag == "tr":
            t["in_row"] = False
        elif tag == "table":
            self._close()

    def _close(self) -> None:
        table = _grid(self.stack.pop()["cells"])
        if table is not None:
            self.tables.append(table)

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)

    def finish(self) -> list[Table]:
        while self.stack:
            self._close()
        return self.tables


def _grid(cells: list[list]) -> Table | None:
    """Cells (row, rowspan, colspan, text) in document order -> a table; each cell takes the first free grid
    position of its row, as a browser places them."""
    taken: set[tuple[int, int]] = set()
    placed: dict[tuple[int, int], str] = {}
    spans = []
    for row, rowspan, colspan, text in cells:
        col = 0
        while (row, col) in taken:
            col += 1
        for r in range(row, row + rowspan):
            for c in range(col, col + colspan):
                taken.add((r, c))
        placed[(row, col)] = text
        if rowspan > 1 or colspan > 1:
            spans.append({"row": row, "col": col, "rowspan": rowspan, "colspan": colspan})
    if not placed:
        return None
    rows_used = sorted({r for r, _ in taken})
    height, width = rows_used[-1] + 1, max(c for _, c in taken) + 1
    grid = [[placed.get((r, c), "") for c in range(width)] for r in range(height)]
    grid = [row for r, row in enumerate(grid) if r in rows_used]  # a <tr> without cells adds no row
    table = _shape(grid[0], grid[1:])
    if spans:
        for span in spans:  # rows_used may have dropped an empty row above a span
            span["row"] = rows_used.index(span["row"])
            span["rowspan"] = min(span["rowspan"], len(grid) - span["row"])
        table["spans"] = [s for s in spans if s["rowspan"] > 1 or s["colspan"] > 1]
        if not table["spans"]:
            del table["spans"]
    return table


def parse_html_tables(text: str) -> list[Table]:
    if "<table" not in text.lower():
        return []
    parser = _HtmlTables()
    try:
        parser.feed(text)
        parser.close()
    except Exception:  # HTMLParser is lenient; stay safe on anything it still rejects
        pass
    return parser.finish()


def parse_latex_tables(text: str) -> list[Table]:
    tables = []
    for body in re.findall(r"\\begin\{tabular\}(?:\{[^}]*\})?(.*?)(?:\\end\{tabular\}|$)", text, flags=re.S):
        body = re.sub(r"\\(hline|toprule|midrule|bottomrule|cline\{[^}]*\})", "", body)
        rows = [[html.unescape(c).strip() for c in re.split(r"(?<!\\)&", r)] for r in re.split(r"\\\\", body)]
        rows = [[re.sub(r"\\textbf\{(.*?)\}", r"\1", c) for c in r] for r in rows if any(c.strip() for c in r)]
        if rows:
            tables.append(_shape(rows[0], rows[1:]))
    return tables


def parse_tables(text: str) -> list[Table]:
    """Every table in an answer, whatever form the model wrote it in (HTML, LaTeX, then markdown)."""
    if not isinstance(text, str):
        return []
    return parse_html_tables(text) or parse_latex_tables(text) or parse_markdown_tables(text)


def table_to_csv(table: Table) -> str:
    """A grid: a merged cell's text sits in its top-left cell and the cells it covers are empty (the record's
    `spans` and -f html keep the structure; the page is flagged merged_cells)."""
    import csv
    import io
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(table["columns"])
    writer.writerows(table["rows"])
    return buf.getvalue()


def table_to_markdown(table: Table) -> str:
    """A markdown table, or an HTML table where merged cells make the structure one a markdown table cannot hold."""
    if table.get("spans"):
        return table_to_html(table)

    def row(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"
    cols = table["columns"] or [""]
    lines = [row(cols), "| " + " | ".join("---" for _ in cols) + " |"]
    lines += [row(r) for r in table["rows"]]
    return "\n".join(lines)


def table_to_html(table: Table) -> str:
    """HTML with rowspan/colspan where the table has merged cells; row 0 (`columns`) is the header."""
    spans = {(s["row"], s["col"]): s for s in table.get("spans") or []}
    covered = {(s["row"] + r, s["col"] + c) for s in spans.values() for r in range(s["rowspan"])
               for c in range(s["colspan"]) if (r, c) != (0, 0)}

    def cells(tag: str, r: int, values: list[str]) -> str:
        out = []
        for c, value in enumerate(values):
            if (r, c) in covered:
                continue
            span = spans.get((r, c))
            attrs = "" if span is None else "".join(f' {k}="{span[k]}"' for k in ("rowspan", "colspan") if span[k] > 1)
            out.append(f"<{tag}{attrs}>{html.escape(value)}</{tag}>")
        return "".join(out)
    head = f"<tr>{cells('th', 0, table['columns'])}</tr>"
    body = "".join(f"<tr>{cells('td', r, row)}</tr>" for r, row in enumerate(table["rows"], start=1))
    if spans:  # a rowspan does not cross from <thead> into <tbody>: merged tables keep every row in one group
        return f"<table>{head}{body}</table>"
    return f"<table><thead>{head}</thead><tbody>{body}</tbody></table>"


# ----------------------------------------------------------------------------- grounding

_REF_DET = re.compile(r"<\|ref\|>(.*?)<\|/ref\|>\s*<\|det\|>(.*?)(?:<\|/det\|>|$)", re.S)
_DET_ONLY = re.compile(r"<\|det\|>(.*?)(?:<\|/det\|>|$)", re.S)
_NUMBER = r"[-+]?\d+(?:\.\d+)?"
_BOX = re.compile(rf"\[\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\]")


def _boxes(det: str) -> list[list[float]]:
    out = []
    for match in _BOX.finditer(det):
        values = [float(v) for v in match.groups()]
        if not all(math.isfinite(v) for v in values):
            continue
        x1, y1, x2, y2 = (min(max(v, 0.0), 999.0) for v in values)
        x1, x2 = sorted((x1, x2))
        y1, y2 = sorted((y1, y2))
        out.append([x1, y1, x2, y2])
    return out


def scale_box(box: list[float], width: int, height: int) -> list[int]:
    """0-999 normalised -> pixels of the original image (the official x / 999 * width), inside the image."""
    x1, y1, x2, y2 = box
    sx, sy = max(width, 1), max(height, 1)
    px = [int(x1 / 999 * sx), int(y1 / 999 * sy), int(x2 / 999 * sx), int(y2 / 999 * sy)]
    return [min(max(px[0], 0), sx), min(max(px[1], 0), sy), min(max(px[2], 0), sx), min(max(px[3], 0), sy)]


def parse_grounding(text: str, width: int, height: int, default_label: str = "") -> list[dict]:
    """Objects with boxes from `<|ref|>label<|/ref|><|det|>[[x1,y1,x2,y2],...]<|/det|>` answers."""
    if not isinstance(text, str):
        return []
    objects = []
    consumed = []
    for match in _REF_DET.finditer(text):
        label = match.group(1).strip()
        consumed.append(match.span())
        for box in _boxes(match.group(2)):
            objects.append({"label": label, "box_norm": box, "box": scale_box(box, width, height)})
    for match in _DET_ONLY.finditer(text):  # a det without its ref: label it with the query
        if any(a <= match.start() < b for a, b in consumed):
            continue
        for box in _boxes(match.group(1)):
            objects.append({"label": default_label, "box_norm": box, "box": scale_box(box, width, height)})
    return objects


_LAYOUT = re.compile(r"<\|ref\|>(.*?)<\|/ref\|>\s*<\|det\|>(.*?)(?:<\|/det\|>|$)", re.S)


def parse_layout(text: str, width: int, height: int) -> list[dict]:
    """DeepSeek-OCR's layout-tagged answer -> blocks in reading order: {"label", "text", "box", "box_norm"}.

    Each `<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2]]<|/det|>` opens a block whose text runs to the next tag
    (boxes 0-999 of the page, scaled to its pixels); an answer without tags has no blocks."""
    if not isinstance(text, str):
        return []
    matches = list(_LAYOUT.finditer(text))
    blocks = []
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        boxes = _boxes(match.group(2))
        box_norm = boxes[0] if boxes else None
        blocks.append({"label": match.group(1).strip(), "text": text[match.end():end].strip(),
                       "box_norm": box_norm, "box": scale_box(box_norm, width, height) if box_norm else None})
    return blocks


def strip_grounding_tags(text: str) -> str:
    """Readable caption: refs keep their words, boxes go."""
    text = re.sub(r"<\|det\|>.*?(<\|/det\|>|$)", "", text, flags=re.S)
    return re.sub(r"<\|/?(ref|grounding)\|>", "", text).strip()


# ----------------------------------------------------------------------------- runaway generation

def find_loop(ids: list[int], min_total: int = 96, max_period: int = 64, min_repeats: int = 6) -> int | None:
    """The period of a span repeated at the end of `ids` (covering >= min_total tokens), else None.

    The bounds keep legitimate repetition (a few identical table rows, a dotted leader) out: only a span
    repeated at least 6 times over at least 96 tokens counts as a runaway loop.
    """
    n = len(ids)
    for period in range(1, max_period + 1):
        span = period * max(min_repeats, math.ceil(min_total / period))
        if span > n:
            continue  # spans are not monotonic in the period: a longer period may still fit
        # Walk back from the end comparing each token with the one a period earlier; text that is
        # not looping fails on the first comparison, so this costs almost nothing per step.
        if all(ids[n - 1 - j] == ids[n - 1 - j - period] for j in range(span - period)):
            return period
    return None


def trim_loop(ids: list[int], period: int) -> list[int]:
    """Cut the repeated tail down to one copy of the repeated span."""
    n = len(ids)
    end = n
    while end - period >= period and ids[end - 2 * period:end - period] == ids[end - period:end]:
        end -= period
    return ids[:end]
