"""Dense pages read in horizontal bands: when to split, how to cut, how to merge the band answers.

Every computation here is bounded by a fixed pixel budget, whatever the page's shape: a 2x20000 strip must
not become a 2.6-gigapixel intermediate.
"""

from __future__ import annotations

from PIL import Image

DENSE_TEXT_CHARS = 2500  # a text layer this long will not fit the answer budget in one pass
# The bands --split auto reads a page in (a dense page, or one whose answer the context cut): each band's answer is
# about a third of the page's, so a page holding up to three answers' worth of text (the ~2,000 tokens the 4,096-token
# context leaves after a tiled image) is read whole.
AUTO_BANDS = 3
MIN_BAND_HEIGHT = 64  # px: a thinner band holds no line of text worth a model call
BAND_OVERLAP = 0.08  # of the page height, shared by neighbouring bands
DENSITY_WIDTH, DENSITY_MAX_HEIGHT = 512, 2048


def band_count(image: Image.Image, wanted: int) -> int:
    """At most `wanted` bands, fewer when the page is too short for bands of MIN_BAND_HEIGHT."""
    return max(1, min(wanted, image.height // MIN_BAND_HEIGHT))


def split_bands(image: Image.Image, n: int, overlap: float = BAND_OVERLAP) -> list[Image.Image]:
    """n horizontal bands covering the page, each overlapping the next by `overlap` of the page height."""
    w, h = image.size
    n = band_count(image, n)
    band = h / n
    pad = int(h * overlap / 2)
    out = []
    for i in range(n):
        top = max(0, int(i * band) - pad)
        bottom = min(h, max(top + 1, int((i + 1) * band) + pad))
        out.append(image.crop((0, top, w, bottom)))
    return out


def merge_band_texts(texts: list[str], max_overlap_lines: int = 12) -> str:
    """Join band answers, dropping the lines a band repeats from the end of the previous one."""
    merged: list[str] = []
    for text in texts:
        lines = text.strip().splitlines()
        best = 0
        for k in range(1, min(max_overlap_lines, len(lines), len(merged)) + 1):
            tail = [x.strip() for x in merged[-k:]]
            head = [x.strip() for x in lines[:k]]
            if tail == head and any(tail):
                best = k
        merged.extend(lines[best:])
    return "\n".join(merged).strip()


def looks_dense(image: Image.Image) -> bool:
    """A quick estimate that a page is packed with small text (a candidate for --split auto).

    At 512 px wide, rows crossing text flip between ink and paper many times; a page where most
    rows do so (> 45 % of rows, > 90 flips each) is dense print. Photos and forms flip far less.
    The estimate image is at most 512 x 2048 px, whatever the page's aspect ratio.
    """
    import numpy as np
    if image.width < 8 or image.height < 8:
        return False
    height = min(DENSITY_MAX_HEIGHT, max(1, round(DENSITY_WIDTH * image.height / image.width)))
    gray = np.asarray(image.convert("L").resize((DENSITY_WIDTH, height)), dtype=np.uint8)
    ink = (gray < 160).astype(np.int8)
    flips = np.abs(np.diff(ink, axis=1)).sum(axis=1)
    text_rows = flips >= 6
    return bool(text_rows.mean() > 0.45 and flips[text_rows].mean() > 90)


def planned_bands(split: str, image: Image.Image, text_layer: str | None) -> tuple[int, str | None]:
    """Bands to read a page in before any answer is seen, and why: (1, None) when read whole."""
    if split == "never":
        return 1, None
    if split != "auto":
        n = band_count(image, int(split))
        return n, ("forced" if n > 1 else None)
    dense = len(text_layer) > DENSE_TEXT_CHARS if text_layer is not None else looks_dense(image)
    n = band_count(image, AUTO_BANDS) if dense else 1
    return n, ("dense" if n > 1 else None)
