"""Minimal hand-written PDFs with a real text layer (samples, tests and the pages benchmark)."""

from __future__ import annotations

# Where the first line starts for text drawn at each angle (counterclockwise), so the lines stay on a letter page.
_TEXT_ORIGIN = {0: (72, 740), 90: (72, 72), 180: (540, 72), 270: (540, 720)}
_TEXT_MATRIX = {0: "1 0 0 1", 90: "0 1 -1 0", 180: "-1 0 0 -1", 270: "0 -1 1 0"}


def text_pdf(text: str, pages: int = 1, lines: list[str] | None = None, size: int = 24, angle: int = 0,
             rotate: int = 0, page_lines: list[list[str]] | None = None) -> bytes:
    """A PDF with Helvetica text: one line per page ("{text} pN"), the given lines on every page, or each page's own
    lines (`page_lines`, one list per page). `angle`: the text is drawn turned counterclockwise by it (0, 90, 180,
    270); `rotate`: each page's /Rotate."""
    objs = ["<< /Type /Catalog /Pages 2 0 R >>", None, "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    pages = len(page_lines) if page_lines else pages
    for i in range(pages):
        page_lines_here = page_lines[i] if page_lines else lines or [f"{text} p{i + 1}"]
        ops = " ".join(f"({_escape(line)}) Tj 0 -{size * 1.2:.1f} Td" for line in page_lines_here)
        x, y = _TEXT_ORIGIN[angle]
        place = f"{_TEXT_MATRIX[angle]} {x} {y} Tm" if angle else f"{x} {y} Td"
        stream = f"BT /F1 {size} Tf {place} {ops} ET".encode("latin-1", "replace")
        objs.append(f"<< /Length {len(stream)} >>\nstream\n{stream.decode('latin-1')}\nendstream")
        content_id = len(objs)
        turned = f"/Rotate {rotate} " if rotate else ""
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] {turned}/Contents {content_id} 0 R "
                    "/Resources << /Font << /F1 3 0 R >> >> >>")
        kids.append(f"{len(objs)} 0 R")
    objs[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {pages} >>"
    out, offsets = b"%PDF-1.4\n", []
    for n, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{n} 0 obj\n{body}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def _escape(line: str) -> str:
    return line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
