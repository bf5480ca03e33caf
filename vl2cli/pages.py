"""Files become pages: PDFs through pypdfium2, images through Pillow, folders and globs expanded.

`plan_source` looks at a file once, before any model loads: its digest (results are keyed on content),
its kind and which pages to read; every problem becomes a message naming the file. `render_pages` then
produces the pages lazily, one at a time, so a 1000-page PDF never sits in memory. PDFium is not
thread-safe: call both from one thread at a time (the pipeline plans first, then renders in one thread).
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import sys
import threading
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageOps, UnidentifiedImageError

from vl2cli.errors import InputError, UsageError
from vl2cli.options import PageOptions
from vl2cli.orient import orientation, text_layer_rotation, turn

if TYPE_CHECKING:
    import pypdfium2 as pdfium

    from vl2cli.engine.processor import PageViews

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"}
PDF_SUFFIXES = {".pdf"}
SUPPORTED = IMAGE_SUFFIXES | PDF_SUFFIXES
STDIN = "-"
STDIN_LABEL = "<stdin>"


@dataclass
class Page:
    source: str  # the input as given, display-safe ("<stdin>" for standard input)
    number: int  # 1-based page (or frame) number
    image: Image.Image
    text_layer: str | None = None
    tiling: PageViews | None = None  # cut ahead in the rendering thread, for the model's family
    rotation: int = 0  # clockwise degrees `image` was turned from the page as given (vl2cli.orient)
    rotation_source: str | None = None  # "text_layer", "osd", "user", or None

    @property
    def label(self) -> str:
        return f"{self.source} p{self.number}"

    @property
    def size_as_given(self) -> tuple[int, int]:
        w, h = self.image.size
        return (h, w) if self.rotation in (90, 270) else (w, h)

    def as_given(self) -> Image.Image:
        """The page as the file shows it (`image` is the page as it is read, turned upright)."""
        return turn(self.image, -self.rotation)


def upright(page: Page, rotate: str, text_rotation: int | None = None) -> Page:
    """The page turned as --rotate says (auto: detected), its turn and where the turn came from recorded."""
    found = orientation(rotate, page.image, text_rotation)
    page.image = turn(page.image, found.rotation)
    page.rotation, page.rotation_source = found.rotation, found.source
    return page


@dataclass
class Source:
    """One input file as planned: what it is, which pages to read, or why it cannot be read."""

    path: str  # as given ("-" for stdin)
    label: str  # display-safe
    name: str = ""  # readable output name (pages.output_name)
    kind: str = ""  # "pdf" | "image"
    digest: str = ""  # sha256 of the bytes ("" when unreadable)
    page_count: int = 0
    numbers: list[int] = field(default_factory=list)  # pages to read
    error: str | None = None  # the file cannot be read at all
    missing: bool = False  # no such file (a usage error for commands on named files)
    note: str | None = None  # e.g. a page range clipped to the document
    data: bytes | None = None  # stdin's bytes, read once


def parse_page_ranges(spec: str | None) -> list[tuple[int, int]] | None:
    """'1-3,7,10-' -> [(1, 3), (7, 7), (10, maxsize)]; None means every page. Pages count from 1."""
    if not spec:
        return None
    ranges = []
    for part in spec.split(","):
        part = part.strip()
        if part.startswith("-"):
            raise UsageError(f"--pages {spec!r}: page numbers start at 1 (for the first N pages write 1-N)")
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b) if b else sys.maxsize
            else:
                lo = hi = int(part)
        except ValueError:
            raise UsageError(f"--pages {spec!r}: expected numbers and ranges like 1-3,7,10-") from None
        if lo < 1 or hi < lo:
            raise UsageError(f"--pages {spec!r}: range {part!r} is empty or below 1")
        ranges.append((lo, hi))
    return ranges


def select_pages(label: str, count: int, ranges: list[tuple[int, int]] | None) -> tuple[list[int], str | None]:
    """The page numbers of a `count`-page document that the ranges ask for, and a note when they were clipped.

    A range reaching past the end is clipped (with a note); a request wholly past the end is an error."""
    if ranges is None:
        return list(range(1, count + 1)), None
    numbers = sorted({n for lo, hi in ranges for n in range(lo, min(hi, count) + 1)})
    asked = ",".join(f"{lo}" if lo == hi else f"{lo}-{'' if hi == sys.maxsize else hi}" for lo, hi in ranges)
    pages = f"{count} page{'s' if count != 1 else ''}"
    if not numbers:
        raise UsageError(f"{label}: --pages {asked} asks for pages past the end; it has {pages}")
    over = [(lo, hi) for lo, hi in ranges if hi > count and hi != sys.maxsize]
    return numbers, (f"{label} has {pages}: --pages {asked} reads {_page_list(numbers)}" if over else None)


def _page_list(numbers: list[int]) -> str:
    """[2, 3, 7] -> 'pages 2-3,7' (sorted page numbers, as --pages writes them)."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    text = ",".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in runs)
    return f"page {text}" if len(numbers) == 1 else f"pages {text}"


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
        raise InputError(f"{where}: page is {w}x{h} pixels, too small to read")
    if w * h > max_pixels:
        raise InputError(f"{where}: page is {w}x{h} = {w * h / 1e6:.0f} Mpx, over the {max_pixels / 1e6:.0f} Mpx "
                         "per-page cap (a possible decompression bomb; raise it with --max-pixels)")


@contextmanager
def _pillow_cap(max_pixels: int) -> Iterator[None]:
    """Pillow's own bomb guard follows --max-pixels (our check refuses larger pages with a clear message)."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _open_image(where: str, data: io.BytesIO | Path, max_pixels: int) -> Image.Image:
    try:
        with _pillow_cap(max_pixels):
            img = Image.open(data)
            img.size  # noqa: B018 - header read
    except Image.DecompressionBombError:
        raise InputError(f"{where}: image dimensions are huge (a possible decompression bomb); refused") from None
    except UnidentifiedImageError:  # its message names Pillow's file object: "<_io.BytesIO object at 0x...>"
        raise InputError(f"{where}: not a readable image (not PNG, JPEG, WebP, TIFF, BMP or GIF data)") from None
    except Exception as exc:  # Pillow raises many types on hostile files (OSError, ValueError, SyntaxError, ...)
        raise InputError(f"{where}: not a readable image ({_short(exc)})") from None
    return img


def open_image_bytes(where: str, data: bytes, max_pixels: int) -> Image.Image:
    """An image sent as bytes (a server's data URL), checked as a page is: its first frame, RGB; InputError says why
    it cannot be read."""
    return next(_image_pages(where, io.BytesIO(data), [1], max_pixels, "off")).image


def _frames(img: Image.Image) -> int:
    return getattr(img, "n_frames", 1) if img.format == "TIFF" else 1  # GIF/WebP: first frame only


def _image_pages(where: str, data: io.BytesIO | Path, numbers: list[int], max_pixels: int,
                 rotate: str) -> Iterator[Page]:
    img = _open_image(where, data, max_pixels)
    for number in numbers:
        label = where if _frames(img) == 1 else f"{where} frame {number}"
        try:
            with _pillow_cap(max_pixels):
                img.seek(number - 1)
                _check_size(label, img.size, max_pixels)
                img.load()
                page = normalise_image(img.copy())
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{label}: image data is damaged ({_short(exc)})") from None
        yield upright(Page(where, number, page), rotate)


def _open_pdf(where: str, data: bytes | Path, password: str | None) -> pdfium.PdfDocument:
    import pypdfium2 as pdfium
    try:
        return pdfium.PdfDocument(data if isinstance(data, bytes) else str(data), password=password)
    except pdfium.PdfiumError as exc:
        if "password" in str(exc).lower():
            why = "the --password is wrong" if password else "the PDF is encrypted; pass --password"
            raise InputError(f"{where}: {why}") from None
        raise InputError(f"{where}: not a readable PDF ({_short(exc)})") from None


# A PDF's compressed streams (page contents, fonts) inflate inside PDFium when a page is rendered, up to 1000x their
# size: a 500 KB content stream can become 500 MB (and twice that in memory). --max-pixels caps what a page renders
# to; these cap what its streams inflate to. Both are checked here, before PDFium sees a page.
MAX_PDF_STREAM_BYTES = 64 * 1024 * 1024  # any one compressed stream, inflated
_STREAM = re.compile(rb"(?<!end)stream(?:\r\n|\n|\r)")
_ARMOUR = re.compile(rb"/(ASCIIHexDecode|AHx|ASCII85Decode|A85)\b")


def check_pdf_streams(where: str, data: bytes, pages: int, limit: int | None = None) -> None:
    """Inflate every zlib-compressed stream of a PDF (after any ASCII armour), counting and discarding, and refuse
    the file (InputError) when one would inflate beyond `limit` bytes, or all of them beyond `limit` per page. The
    work is bounded the same way: at most `limit` per page is inflated here. Every stream that starts as zlib data
    counts, whatever its dictionary says (a filter can hide behind an indirect reference); streams this cannot read
    ahead of PDFium (an encrypted file's, or behind an LZW or run-length filter) are left to it."""
    limit = MAX_PDF_STREAM_BYTES if limit is None else limit
    budget, since = limit * max(1, pages), 0
    for match in _STREAM.finditer(data):
        head = data[since:match.start()]  # from the previous stream keyword: each byte is looked at once
        since = match.end()
        if not head.rstrip().endswith(b">>"):
            continue  # not a stream object's keyword (those bytes are inside some other stream's data)
        own = head.rfind(b"obj")  # this stream's own dictionary follows its "N 0 obj"
        armour = [m.group(1) for m in _ARMOUR.finditer(head[own + 3:] if own >= 0 else head)]
        size = _inflated_size(_unarmoured(data, match.end(), armour), min(limit, budget) + 1)
        if size > limit:
            raise InputError(f"{where}: a compressed PDF stream inflates to more than {limit // (1 << 20)} MB "
                             "(a possible decompression bomb); refused")
        budget -= size
        if budget < 0:
            raise InputError(f"{where}: its compressed PDF streams inflate to more than {limit // (1 << 20)} MB per "
                             "page (a possible decompression bomb); refused")


def _unarmoured(data: bytes, start: int, armour: list[bytes]) -> memoryview:
    """A stream's bytes from `start`, ASCII armour (hex, base-85) taken off first where the filters name it."""
    if not armour:
        return memoryview(data)[start:]
    end = data.find(b"endstream", start)
    raw = data[start:end if end >= 0 else len(data)]
    try:
        for name in armour:
            text = re.sub(rb"\s", b"", raw)
            hexed = text.split(b">")[0]
            raw = bytes.fromhex((hexed + b"0" * (len(hexed) % 2)).decode("ascii")) \
                if name in (b"ASCIIHexDecode", b"AHx") else base64.a85decode(text.split(b"~>")[0])
    except ValueError:  # damaged armour: PDFium cannot inflate it either
        return memoryview(b"")
    return memoryview(raw)


def _inflated_size(stream: memoryview, stop_after: int) -> int:
    """How many bytes a zlib stream inflates to, counted a megabyte at a time (never held), up to `stop_after`."""
    inflater, size, pos = zlib.decompressobj(), 0, 0
    try:
        while not inflater.eof and size < stop_after:
            tail = inflater.unconsumed_tail  # input held back when the last call's megabyte was full
            chunk = tail or stream[pos:pos + 65536]
            pos += 0 if tail else 65536
            out = len(inflater.decompress(chunk, 1 << 20))
            if not out and not chunk:
                break  # nothing in, nothing out: the file ends before the stream does
            size += out
    except zlib.error:  # damaged: PDFium reads what it can of it, no more than was counted here
        pass
    return size


# PDFium is not thread-safe: every call into it holds this lock (a server renders several uploads at once).
PDFIUM = threading.RLock()


def _pdf_pages(where: str, data: bytes | Path, numbers: list[int], opts: PageOptions) -> Iterator[Page]:
    """Render pages one by one (the lock is held per page, never across a yield)."""
    with PDFIUM:
        pdf = _open_pdf(where, data, opts.password)
    try:
        for number in numbers:
            label = f"{where} page {number}"
            try:
                with PDFIUM:
                    image, text, text_rotation = _render_pdf_page(pdf, number, label, opts)
            except InputError:
                raise
            except Exception as exc:
                raise InputError(f"{label}: cannot render ({_short(exc)})") from None
            yield upright(Page(where, number, normalise_image(image), text_layer=text), opts.rotate, text_rotation)
    finally:
        with PDFIUM:
            pdf.close()


def _render_pdf_page(pdf: pdfium.PdfDocument, number: int, label: str,
                     opts: PageOptions) -> tuple[Image.Image, str | None, int | None]:
    """The rendered page, its text layer (when asked for) and the turn its text layer says makes it upright
    (--rotate auto; None when it cannot tell)."""
    page = pdf[number - 1]
    try:
        w_pt, h_pt = page.get_size()
        _check_size(label, (int(w_pt * opts.dpi / 72), int(h_pt * opts.dpi / 72)), opts.max_pixels)
        image = page.render(scale=opts.dpi / 72).to_pil()
        text, text_rotation = None, None
        if opts.text_layer or opts.rotate == "auto":
            textpage = page.get_textpage()
            try:
                if opts.text_layer:
                    text = textpage.get_text_bounded().replace("\r\n", "\n")
                if opts.rotate == "auto":
                    text_rotation = text_layer_rotation(textpage, page.get_rotation())
            finally:
                textpage.close()
    finally:
        page.close()
    return image, text, text_rotation


def display_path(path: str) -> str:
    """A file name safe to print and to store as JSON (undecodable bytes become U+FFFD)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _short(exc: BaseException) -> str:
    """An exception's first line for a message a user reads, without Python object reprs in it."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return _REPR.sub("the data", text)[:160]


def sniff_kind(head: bytes) -> str:
    return "pdf" if head.startswith(b"%PDF") or b"%PDF-" in head[:1024] else "image"


def _read_bytes(source: Source) -> bytes:
    if source.path == STDIN:
        return sys.stdin.buffer.read()
    try:
        with open(source.path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        source.missing = True
        raise InputError(f"{source.label}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{source.label}: is a folder (use vl2 batch, or pass the files)") from None
    except OSError as exc:
        raise InputError(f"{source.label}: cannot read ({exc.strerror or exc})") from None


def _count(source: Source, data: bytes, opts: PageOptions) -> int:
    if source.kind == "pdf":
        with PDFIUM:
            pdf = _open_pdf(source.label, data if source.path == STDIN else Path(source.path), opts.password)
            try:
                count = len(pdf)
            finally:
                pdf.close()
        if count == 0:
            raise InputError(f"{source.label}: PDF has no pages")
        check_pdf_streams(source.label, data, count)
        return count
    return _frames(_open_image(source.label, io.BytesIO(data), opts.max_pixels))


def plan_source(path: str, opts: PageOptions) -> Source:
    """Read a file once: digest, kind, page count, the pages to read. Input problems land in `error`;
    a --pages request this document cannot satisfy raises UsageError."""
    source = Source(path, STDIN_LABEL if path == STDIN else display_path(path))
    try:
        data = _read_bytes(source)
        if not data:
            raise InputError(f"{source.label}: file is empty")
        source.digest = hashlib.sha256(data).hexdigest()
        source.kind = sniff_kind(data[:1024])
        source.data = data if path == STDIN else None
        source.page_count = _count(source, data, opts)
    except InputError as exc:
        source.error = str(exc)
        return source
    except Exception as exc:  # a library bug on a hostile file fails this file only
        source.error = f"{source.label}: unreadable ({type(exc).__name__}: {_short(exc)})"
        return source
    source.numbers, source.note = select_pages(source.label, source.page_count, parse_page_ranges(opts.pages))
    return source


def render_pages(source: Source, opts: PageOptions, numbers: list[int] | None = None) -> Iterator[Page]:
    """The planned pages (or these `numbers`) of a source, rendered one at a time; InputError names the problem."""
    wanted = source.numbers if numbers is None else numbers
    if not wanted:
        return
    data: bytes | Path = source.data if source.data is not None else Path(source.path)
    if source.kind == "pdf":
        yield from _pdf_pages(source.label, data, wanted, opts)
    else:
        yield from _image_pages(source.label, io.BytesIO(data) if isinstance(data, bytes) else data, wanted,
                                opts.max_pixels, opts.rotate)


@dataclass
class Inputs:
    files: list[str]
    names: dict[str, str] = field(default_factory=dict)  # readable output name of each file (see output_name)
    hidden_skipped: int = 0  # files whose names start with a dot, left out of folders
    other_skipped: int = 0  # files in folders whose extension is not a PDF's or an image's, left out


def output_name(path: str, folder: str | None) -> str:
    """A file's readable name under --out: its path inside the folder given on the command line, or its file
    name when given directly. It depends only on how the file itself was named, never on the other inputs."""
    if path == STDIN:
        return "stdin"
    rel = Path(os.path.relpath(path, folder)) if folder else Path(os.path.basename(path))
    return "/".join(p for p in rel.parts if p not in ("", ".", "..", os.sep)) or "_"


def _same_or_inside(path: str, folder: str) -> bool:
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _folder_files(folder: Path, glob: str | None, inputs: Inputs) -> list[str]:
    found = []
    for p in sorted(folder.rglob(glob or "*")):
        if not p.is_file():
            continue
        if any(part.startswith(".") for part in p.relative_to(folder).parts):
            inputs.hidden_skipped += 1
            continue
        if not (glob or p.suffix.lower() in SUPPORTED):
            inputs.other_skipped += 1
            continue
        found.append(str(p))
    if not found:
        raise UsageError(f"{display_path(str(folder))}: the folder holds no PDF or image files"
                         + (f" matching {glob!r}" if glob else ""))
    return found


def expand_inputs(items: list[str], glob: str | None = None, exclude: str | Path | None = None) -> Inputs:
    """Files as given; folders searched recursively for supported files (or --glob); sorted, deduplicated.

    Files under `exclude` (the output folder, compared by real path so a symlinked --out counts too) are
    left out. Files and folders whose names start with a dot, and files that are not PDFs or images (by their
    extension), are left out of folder searches and counted.
    """
    inputs = Inputs([])
    out: list[str] = []
    for item in items:
        path = Path(item)
        if item == STDIN:
            out.append(item)
            inputs.names[item] = output_name(item, None)
        elif path.is_dir():
            if exclude is not None and _same_or_inside(item, str(exclude)):
                raise UsageError(f"--out {exclude} is the input folder {display_path(item)} itself: outputs would "
                                 "mix with inputs; choose a subfolder (e.g. --out results)")
            for file in _folder_files(path, glob, inputs):
                out.append(file)
                inputs.names.setdefault(file, output_name(file, item))
        elif any(ch in item for ch in "*?[") and not path.exists():
            import glob as globbing
            found = sorted(p for p in globbing.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                raise UsageError(f"{item}: the pattern matches no file")
            out.extend(found)
            for match in found:
                inputs.names.setdefault(match, output_name(match, None))
        else:
            out.append(item)
            inputs.names.setdefault(item, output_name(item, None))
    if exclude is not None:
        out = [f for f in out if f == STDIN or not _same_or_inside(f, str(exclude))]
    inputs.files = list(dict.fromkeys(out))
    return inputs
