"""Regenerate the sample documents: `python samples/make_samples.py` (deterministic)."""

from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from vl2cli.pdfwrite import text_pdf

HERE = Path(__file__).parent


def invoice() -> Image.Image:
    img = Image.new("RGB", (850, 1100), "white")
    d = ImageDraw.Draw(img)
    d.text((60, 50), "INVOICE No. 2026-118", fill="black")
    d.text((60, 80), "Bill to: Harbor Archive Services", fill="black")
    rows = [("Item", "Qty", "Price"), ("Scanning (pages)", "1200", "96.00"), ("OCR review", "8", "240.00"),
            ("Storage box", "3", "27.00"), ("Total", "", "363.00")]
    for r, row in enumerate(rows):
        y = 160 + r * 40
        d.rectangle([60, y, 790, y + 40], outline="black")
        for c, cell in enumerate(row):
            d.text((70 + c * 250, y + 12), cell, fill="black")
    return img


def objects() -> Image.Image:
    img = Image.new("RGB", (640, 480), (235, 240, 245))
    d = ImageDraw.Draw(img)
    d.ellipse([60, 80, 220, 240], fill=(220, 30, 40))
    d.rectangle([300, 200, 560, 420], fill=(30, 90, 200))
    d.polygon([(420, 40), (520, 180), (320, 180)], fill=(40, 170, 60))
    return img


def scanned() -> Image.Image:
    page = invoice().convert("L").rotate(1.5, fillcolor=255, expand=True).filter(ImageFilter.GaussianBlur(0.8))
    return page.convert("RGB")


if __name__ == "__main__":
    (HERE / "report.pdf").write_bytes(text_pdf("Quarterly report 2026: revenue grew 12 percent", pages=3))
    invoice().save(HERE / "invoice.png")
    objects().save(HERE / "objects.png")
    scanned().save(HERE / "scan.png")
