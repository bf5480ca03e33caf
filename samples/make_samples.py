"""Regenerate the sample documents: `python samples/make_samples.py` (Pillow, and fpdf2 from the test extra).

Deterministic in what a reader sees: the same images, pages and text layer each run. The PDFs' bytes may differ from
the committed ones (Pillow stamps the date into report.pdf; letter.pdf was first written by hand, and fpdf2's file
renders the same pixels with the same text layer).

report.pdf     three scanned-style pages: text, a table, a bar chart (no text layer)
letter.pdf     a born-digital page with a text layer (try --text-layer hint|only)
invoice.png    an invoice with a line-item table
scan.png       the invoice as a slightly rotated, blurred grey scan
objects.png    shapes to ground: a red circle, a blue square, a green triangle
"""

from datetime import datetime, timezone
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter, ImageFont

HERE = Path(__file__).parent
W, H = 1224, 1584  # US letter at 144 DPI


def font(size: int):
    return ImageFont.load_default(size=size)


def draw_table(d: ImageDraw.ImageDraw, rows, left: int, top: int, right: int, row_h: int, col_w: int, size: int):
    for r, row in enumerate(rows):
        y = top + r * row_h
        d.rectangle([left, y, right, y + row_h], outline="black", width=2)
        for c, cell in enumerate(row):
            d.text((left + 18 + c * col_w, y + (row_h - size) // 2), cell, font=font(size), fill="black")


def text_page() -> Image.Image:
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((110, 110), "Quarterly Report - Q3 2026", font=font(44), fill="black")
    body = ("Revenue grew 12% over the previous quarter, driven by the northern region. "
            "Operating costs were flat, and the archive digitisation programme finished "
            "ahead of schedule with 1.2 million pages processed.").split()
    line, y = "", 220
    for word in body:
        if len(line) + len(word) > 52:
            d.text((110, y), line, font=font(30), fill="black")
            line, y = "", y + 46
        line += word + " "
    d.text((110, y), line, font=font(30), fill="black")
    return img


def table_page() -> Image.Image:
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((110, 110), "Table 1. Revenue by region (kEUR)", font=font(36), fill="black")
    rows = [("Region", "Q2", "Q3"), ("North", "410", "498"), ("South", "372", "380"), ("East", "298", "305"),
            ("Total", "1080", "1183")]
    draw_table(d, rows, 110, 200, 1110, 70, 330, 32)
    return img


def chart_page() -> Image.Image:
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((110, 110), "Figure 1. Q3 revenue by region", font=font(36), fill="black")
    base, scale = 1000, 1.4
    d.line([(150, base), (1050, base)], fill="black", width=3)
    for i, (name, value) in enumerate([("North", 498), ("South", 380), ("East", 305)]):
        x = 220 + i * 280
        d.rectangle([x, base - value * scale, x + 160, base], fill=(60, 110, 200))
        d.text((x + 20, base + 20), name, font=font(30), fill="black")
        d.text((x + 40, base - value * scale - 45), str(value), font=font(30), fill="black")
    return img


def invoice() -> Image.Image:
    img = Image.new("RGB", (850, 1100), "white")
    d = ImageDraw.Draw(img)
    d.text((60, 50), "INVOICE No. 2026-118", font=font(32), fill="black")
    d.text((60, 100), "Bill to: Harbor Archive Services", font=font(22), fill="black")
    rows = [("Item", "Qty", "Price"), ("Scanning (pages)", "1200", "96.00"), ("OCR review", "8", "240.00"),
            ("Storage box", "3", "27.00"), ("Total", "", "363.00")]
    draw_table(d, rows, 60, 180, 790, 50, 250, 22)
    return img


def objects() -> Image.Image:
    img = Image.new("RGB", (640, 480), (235, 240, 245))
    d = ImageDraw.Draw(img)
    d.ellipse([60, 80, 220, 240], fill=(220, 30, 40))
    d.rectangle([300, 200, 560, 420], fill=(30, 90, 200))
    d.polygon([(420, 40), (520, 180), (320, 180)], fill=(40, 170, 60))
    return img


def letter_pdf(lines: list[str], size: int = 14) -> bytes:
    """A born-digital letter page (fpdf2, from the test extra): Helvetica lines a margin in from the top left."""
    from fpdf import FPDF

    pdf = FPDF(unit="pt", format="letter")
    pdf.set_creation_date(datetime(2026, 1, 1, tzinfo=timezone.utc))  # fpdf2 writes the date: fixed, so is the file
    pdf.set_font("Helvetica", size=size)
    pdf.add_page()
    for n, line in enumerate(lines):
        pdf.text(72, 52 + n * size * 1.2, line)  # baselines 1.2 font sizes apart
    return bytes(pdf.output())


def scanned() -> Image.Image:
    page = invoice().convert("L").rotate(1.5, fillcolor=255, expand=True).filter(ImageFilter.GaussianBlur(0.8))
    return page.convert("RGB")


if __name__ == "__main__":
    first, *rest = [text_page(), table_page(), chart_page()]
    first.save(HERE / "report.pdf", save_all=True, append_images=rest, resolution=144)
    (HERE / "letter.pdf").write_bytes(letter_pdf(["Dear archivist,", "", "the 1932 ledgers are scanned.",
                                                  "Kind regards, The Records Office"]))
    invoice().save(HERE / "invoice.png")
    objects().save(HERE / "objects.png")
    scanned().save(HERE / "scan.png")
