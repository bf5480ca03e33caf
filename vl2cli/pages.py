"""Documents become pages: PDFs through pypdfium2, images through Pillow, folders and globs expanded.

Pages are produced lazily, one at a time, so a 1000-page PDF never sits in memory. Every problem
with an input becomes an InputError naming the file and what is wrong with it.
"""

from __future__ import annotations

import io
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from vl2cli.errors import InputError, UsageError

# 144 DPI: the largest tiling canvas is 1152 px on a side, which a letter page fills at about
# 105 DPI; rendering a little above that gives the bicubic downscale clean strokes to work
# from, and a band cut from the page by --split keeps 144 DPI effective instead of ~105.
DEFAULT_DPI = 144
DEFAULT_MAX_PIXELS = 64_000_000  # per page; larger images are refused as likely decompression bombs
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"}
PDF_SUFFIXES = {".pdf"}
SUPPORTED = IMAGE_SUFFIXES | PDF_SUFFIXES


@dataclass
class Page:
    source: str  # the path as given (or "-" for stdin)
    number: int  # 1-based page (or frame) number
    image: Image.Image
    text_layer: str | None = None
    dpi: int | None = None
    tiling: object | None = None  # processor.Tiling when tiled ahead (in the rendering thread)

    @property
    def label(self) -> str:
        return f"{self.source} p{self.number}"


def parse_page_ranges(spec: str | None) -> list[tuple[int, int]] | None:
    """'1-3,7,10-' -> [(1, 3), (7, 7), (10, inf)]; None means every page."""
    if not spec:
        return None
    ranges = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a) if a else 1, int(b) if b else sys.maxsize
            else:
                lo = hi = int(part)
        except ValueError:
            raise UsageError(f"--pages {spec!r}: expected numbers and ranges like 1-3,7") from None
        if lo < 1 or hi < lo:
            raise UsageError(f"--pages {spec!r}: range {part!r} is empty or below 1")
        ranges.append((lo, hi))
    return ranges


def _wanted(number: int, ranges) -> bool:
    return ranges is None or any(lo <= number <= hi for lo, hi in ranges)


def normalise_image(img: Image.Image) -> Image.Image:
    """Any mode to 8-bit RGB: 16-bit scaled down, CMYK converted, alpha and palettes flattened on white."""
    img = ImageOps.exif_transpose(img) or img
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        import numpy as np
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode != "I" or arr.max() > 255 else 255.0
        img = Image.fromarray((np.clip(arr / top, 0, 1) * 255).round().astype("uint8"), "L")
    elif mode == "F":
        img = img.convert("L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB") if img.mode != "RGB" else img


def _check_size(where: str, size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w < 2 or h < 2:
        raise InputError(f"{where}: image is {w}x{h} pixels, too small to read")
    if w * h > max_pixels:
        raise InputError(f"{where}: image is {w}x{h} = {w * h / 1e6:.0f} Mpx, over the {max_pixels / 1e6:.0f} Mpx "
                         "per-page cap (a possible decompression bomb; raise it with --max-pixels)")


def iter_image_pages(where: str, data: io.BytesIO | Path, ranges=None,
                     max_pixels: int = DEFAULT_MAX_PIXELS, skip=None) -> Iterator[Page]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(data)
            img.size  # noqa: B018 - header read
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise InputError(f"{where}: image dimensions are huge (a possible decompression bomb); refused") from None
        except UnidentifiedImageError as exc:
            raise InputError(f"{where}: not a readable image ({_short(exc)})") from None
        except OSError as exc:
            raise InputError(f"{where}: image data is damaged ({_short(exc)})") from None
        frames = getattr(img, "n_frames", 1) if img.format == "TIFF" else 1  # GIF/WebP: first frame only
        for index in range(frames):
            number = index + 1
            if not _wanted(number, ranges) or (skip and skip(number)):
                continue
            try:
                img.seek(index)
                _check_size(where, img.size, max_pixels)
                img.load()
                page = normalise_image(img.copy())
            except InputError:
                raise
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
                    Image.DecompressionBombWarning) as exc:
                raise InputError(f"{where}: image data is damaged ({_short(exc)})") from None
            yield Page(where, number, page)


def iter_pdf_pages(where: str, data: bytes | Path, ranges=None, dpi: int = DEFAULT_DPI, password: str | None = None,
                   max_pixels: int = DEFAULT_MAX_PIXELS, text_layer: bool = False, skip=None) -> Iterator[Page]:
    """Render pages one by one. Call from one thread only: PDFium is not thread-safe."""
    import pypdfium2 as pdfium

    try:
        pdf = pdfium.PdfDocument(data if isinstance(data, bytes) else str(data), password=password)
    except pdfium.PdfiumError as exc:
        msg = str(exc).lower()
        if "password" in msg:
            why = "the --password is wrong" if password else "the PDF is encrypted; pass --password"
            raise InputError(f"{where}: {why}") from None
        raise InputError(f"{where}: not a readable PDF ({_short(exc)})") from None
    try:
        count = len(pdf)
        if count == 0:
            raise InputError(f"{where}: PDF has no pages")
        for index in range(count):
            number = index + 1
            if not _wanted(number, ranges) or (skip and skip(number)):
                continue
            try:
                page = pdf[index]
                w_pt, h_pt = page.get_size()
                size = (int(w_pt * dpi / 72), int(h_pt * dpi / 72))
                _check_size(f"{where} page {number}", size, max_pixels)
                image = page.render(scale=dpi / 72).to_pil()
                text = None
                if text_layer:
                    textpage = page.get_textpage()
                    text = textpage.get_text_bounded().replace("\r\n", "\n")
                    textpage.close()
                page.close()
            except pdfium.PdfiumError as exc:
                raise InputError(f"{where} page {number}: cannot render ({_short(exc)})") from None
            yield Page(where, number, normalise_image(image), text_layer=text, dpi=dpi)
    finally:
        pdf.close()


def display_path(path: str) -> str:
    """A file name safe to print and to store as JSON (undecodable bytes become U+FFFD)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]


def sniff_kind(where: str, head: bytes) -> str:
    if head.startswith(b"%PDF") or b"%PDF-" in head[:1024]:
        return "pdf"
    if not head:
        raise InputError(f"{where}: file is empty")
    return "image"


def iter_pages(source: str, *, pages: str | None = None, dpi: int = DEFAULT_DPI, password: str | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS, text_layer: bool = False, skip=None) -> Iterator[Page]:
    """Pages of one file ('-' reads stdin). The kind is sniffed from content, not trusted from the name."""
    ranges = parse_page_ranges(pages)
    where = display_path(source)
    if source == "-":
        data = sys.stdin.buffer.read()
        kind = sniff_kind("<stdin>", data[:1024])
        if kind == "pdf":
            yield from iter_pdf_pages("<stdin>", data, ranges, dpi, password, max_pixels, text_layer, skip)
        else:
            yield from iter_image_pages("<stdin>", io.BytesIO(data), ranges, max_pixels, skip)
        return
    path = Path(source)
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
    except FileNotFoundError:
        raise InputError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{where}: is a folder (use vl2 batch, or pass the files)") from None
    except OSError as exc:
        raise InputError(f"{where}: cannot read ({exc.strerror or exc})") from None
    kind = sniff_kind(where, head)
    if kind == "pdf":
        yield from iter_pdf_pages(where, path, ranges, dpi, password, max_pixels, text_layer, skip)
    else:
        yield from iter_image_pages(where, path, ranges, max_pixels, skip)


def looks_dense(image: Image.Image) -> bool:
    """A quick estimate that a page is packed with small text (a candidate for --split auto).

    At 512 px wide, rows crossing text flip between ink and paper many times; a page where most
    rows do so (> 45 % of rows, > 90 flips each) is dense print. Photos and forms flip far less.
    """
    import numpy as np
    width = 512
    height = max(1, round(width * image.height / max(image.width, 1)))
    gray = np.asarray(image.convert("L").resize((width, height)), dtype=np.uint8)
    ink = (gray < 160).astype(np.int8)
    flips = np.abs(np.diff(ink, axis=1)).sum(axis=1)
    text_rows = flips >= 6
    return bool(text_rows.mean() > 0.45 and flips[text_rows].mean() > 90)


def count_pages(source: str, pages: str | None = None, password: str | None = None) -> int:
    """How many pages a source will yield (for progress totals); 1 for anything unreadable. Never raises."""
    try:
        ranges = parse_page_ranges(pages)
        with open(source, "rb") as f:
            head = f.read(1024)
        if head.startswith(b"%PDF") or b"%PDF-" in head:
            import pypdfium2 as pdfium
            pdf = pdfium.PdfDocument(source, password=password)
            try:
                n = len(pdf)
            finally:
                pdf.close()
        else:
            with Image.open(source) as img:
                n = getattr(img, "n_frames", 1) if img.format == "TIFF" else 1
        return max(1, sum(1 for i in range(1, n + 1) if _wanted(i, ranges)))
    except Exception:  # the real read reports the problem; a count only needs to be close
        return 1


def expand_inputs(inputs: list[str], glob: str | None = None, exclude: str | Path | None = None) -> list[str]:
    """Files as given; folders searched recursively for supported files (or --glob); sorted, deduplicated.

    Files under `exclude` (the output folder, which may sit inside an input folder) are left out.
    """
    out: list[str] = []
    for item in inputs:
        if item == "-":
            out.append(item)
            continue
        path = Path(item)
        if path.is_dir():
            pattern = glob or "*"
            found = sorted(p for p in path.rglob(pattern)
                           if p.is_file() and (glob or p.suffix.lower() in SUPPORTED) and not p.name.startswith("."))
            if not found:
                raise UsageError(f"{display_path(item)}: the folder holds no PDF or image files"
                                 + (f" matching {glob!r}" if glob else ""))
            out.extend(str(p) for p in found)
        elif any(ch in item for ch in "*?[") and not path.exists():
            import glob as globbing
            found = sorted(p for p in globbing.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                raise UsageError(f"{item}: the pattern matches no file")
            out.extend(found)
        else:
            out.append(item)
    if exclude is not None:
        root = os.path.abspath(exclude) + os.sep
        out = [item for item in out if item == "-" or not os.path.abspath(item).startswith(root)]
    seen, unique = set(), []
    for item in out:
        if item not in seen:
            seen.add(item)
            unique.append(item)
    return unique
