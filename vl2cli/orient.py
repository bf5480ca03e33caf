"""Which way up a page is, the turn that makes it upright, and boxes mapped back to the page as given.

Angles are clockwise degrees, 0, 90, 180 or 270: a page's `rotation` is how far the page as given (what a viewer
shows: EXIF orientation and a PDF's /Rotate already applied) was turned before it was read. Detection, cheapest
first: a PDF page's text layer (PDFium knows each character's angle: no image work at all), else Tesseract's
orientation and script detection (OSD, `tesseract --psm 0`) on a downscaled grey copy, trusted only above a
confidence calibrated by `benchmarks/rotation.py`. Without Tesseract, scanned pages are read as given and the log
says so once.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass
from typing import Any

from PIL import Image

log = logging.getLogger("vl2cli")

ROTATIONS = (0, 90, 180, 270)

# The text layer decides when it has enough visible characters and most of them agree (the rest may be a margin
# note or a sideways table header). At most TEXT_SAMPLE characters are asked for their angle: a dense page costs
# what a light one does.
TEXT_MIN_CHARS = 16
TEXT_MAJORITY = 0.6
TEXT_SAMPLE = 2000
TEXT_TOLERANCE_DEGREES = 15  # a character further than this from every right angle (skewed text) does not vote

# OSD. Tesseract wants text near 300 DPI: at vl2's 144 DPI small print (9 pt and less) comes out upside down with
# high confidence, and a 1.5x copy reads it right (benchmarks/rotation.py). So the copy it gets is OSD_SIDE on its
# long side, a letter page at ~220 DPI: large scans and photos downscaled, small pages enlarged at most
# OSD_MAX_ENLARGE times. This also bounds its time and memory whatever the input. OSD_MIN_CONFIDENCE is Tesseract's
# "Orientation confidence" below which its answer is not trusted (the page is read as given): see
# benchmarks/RESULTS.md, "Rotation detection", for the calibration.
OSD_SIDE = 2400
OSD_MAX_ENLARGE = 2.0
OSD_MIN_CONFIDENCE = 2.0
OSD_TIMEOUT_SECONDS = 20.0
TESSERACT_ENV = "VL2_TESSERACT"  # the tesseract program (a name on PATH or a path); "tesseract" by default


@dataclass(frozen=True)
class Orientation:
    rotation: int = 0  # clockwise degrees the page as given is turned by before reading
    source: str | None = None  # "text_layer", "osd", "user", or None (nothing decided: read as given)


@dataclass(frozen=True)
class OsdAnswer:
    rotation: int  # Tesseract's "Rotate": the clockwise turn that makes the page upright
    confidence: float  # its "Orientation confidence"


# ----------------------------------------------------------------------------- turning and mapping back


_TRANSPOSE = {90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_90}


def turn(image: Image.Image, rotation: int) -> Image.Image:
    """The image turned clockwise by `rotation` degrees (a negative angle turns it back); lossless."""
    rotation %= 360
    return image if rotation == 0 else image.transpose(_TRANSPOSE[rotation])


def box_as_given(box: list, rotation: int, width: float, height: float) -> list:
    """A box [x1, y1, x2, y2] on the turned page back onto the page as given, which is `width` x `height` (in the
    box's own units: pixels, or 999 for 0-999 boxes). Corners stay ordered; ints stay ints."""
    x1, y1, x2, y2 = box
    rotation %= 360
    if rotation == 90:  # given (x, y) went to (height - y, x)
        return [y1, height - x2, y2, height - x1]
    if rotation == 180:
        return [width - x2, height - y2, width - x1, height - y1]
    if rotation == 270:  # given (x, y) went to (y, width - x)
        return [width - y2, x1, width - y1, x2]
    return list(box)


def fields_as_given(fields: dict[str, Any], rotation: int, size: tuple[int, int]) -> dict[str, Any]:
    """A task's parsed fields with every box ("box" in pixels, "box_norm" in 0-999) of every list of objects or
    blocks mapped back to the page as given (`size`: its width and height)."""
    if rotation % 360 == 0:
        return fields
    width, height = size
    out = dict(fields)
    for name, value in fields.items():
        if not isinstance(value, list) or not any(isinstance(v, dict) and "box" in v for v in value):
            continue
        mapped = []
        for item in value:
            if isinstance(item, dict):
                item = dict(item)
                if _is_box(item.get("box")):
                    item["box"] = box_as_given(item["box"], rotation, width, height)
                if _is_box(item.get("box_norm")):
                    item["box_norm"] = box_as_given(item["box_norm"], rotation, 999, 999)
            mapped.append(item)
        out[name] = mapped
    return out


def _is_box(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 4 and all(isinstance(v, int | float) for v in value)


# ----------------------------------------------------------------------------- the text layer


def text_layer_rotation(textpage: Any, page_rotation: int) -> int | None:
    """The clockwise turn that makes a rendered PDF page's text upright, from its characters' angles; None when the
    text layer is too thin or too mixed to say. Call under the PDFium lock; the page's /Rotate is `page_rotation`."""
    import pypdfium2.raw as pdfium_c
    handle = textpage.raw
    count = pdfium_c.FPDFText_CountChars(handle)
    if count < TEXT_MIN_CHARS:
        return None
    step = max(1, count // TEXT_SAMPLE)
    votes = dict.fromkeys(ROTATIONS, 0)
    for i in range(0, count, step):
        code = pdfium_c.FPDFText_GetUnicode(handle, i)
        if code == 0 or chr(code).isspace() or pdfium_c.FPDFText_IsGenerated(handle, i) == 1:
            continue
        radians = pdfium_c.FPDFText_GetCharAngle(handle, i)  # clockwise in PDF user space, [0, 2 pi); -1: error
        if radians < 0:
            continue
        degrees = math.degrees(radians) % 360
        nearest = round(degrees / 90) * 90
        if abs(degrees - nearest) <= TEXT_TOLERANCE_DEGREES:
            votes[nearest % 360] += 1
    voters = sum(votes.values())
    if voters * step < TEXT_MIN_CHARS:
        return None
    angle, best = max(votes.items(), key=lambda kv: kv[1])
    if best < TEXT_MAJORITY * voters:
        return None
    # Text drawn at `angle` clockwise reads upright once the page turns clockwise by -angle; /Rotate already turned
    # the rendered page clockwise by page_rotation.
    return (-angle - page_rotation) % 360


# ----------------------------------------------------------------------------- Tesseract OSD


_warned = threading.Event()


def tesseract_program() -> str | None:
    """The tesseract program's path, or None when it is not installed."""
    return shutil.which(os.environ.get(TESSERACT_ENV) or "tesseract")


def osd_available() -> bool:
    return tesseract_program() is not None


def _warn_once(why: str) -> None:
    if not _warned.is_set():
        _warned.set()
        log.warning("rotation detection for pages without a text layer is off: %s; such pages are read as given "
                    "(install Tesseract: apt install tesseract-ocr, brew install tesseract; or pass --rotate "
                    "0/90/180/270)", why)


def osd_image(image: Image.Image, side: int = OSD_SIDE) -> bytes:
    """The copy OSD reads: grey, `side` px on its long side (enlarged at most OSD_MAX_ENLARGE times), as PGM bytes
    (no compression cost)."""
    scale = min(side / max(image.size), OSD_MAX_ENLARGE)
    if scale < 1:  # shrink first, then go grey: a huge scan is never copied at full size
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BOX, reducing_gap=2.0)
    grey = image.convert("L")
    if scale > 1:
        grey = grey.resize((round(grey.width * scale), round(grey.height * scale)), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    grey.save(buffer, format="PPM")
    return buffer.getvalue()


_ROTATE = re.compile(r"^Rotate:\s*(\d+)\s*$", re.M)
_CONFIDENCE = re.compile(r"^Orientation confidence:\s*([0-9.]+)\s*$", re.M)


def run_osd(image: Image.Image, side: int = OSD_SIDE) -> OsdAnswer | None:
    """Tesseract's orientation answer for an image, whatever its confidence; None when it has none (too few
    characters, a timeout, Tesseract or its OSD data missing: the last two are said once in the log)."""
    program = tesseract_program()
    if program is None:
        _warn_once(f"Tesseract is not installed ({os.environ.get(TESSERACT_ENV) or 'tesseract'} is not on PATH)")
        return None
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}  # one core: the model keeps the others
    try:
        done = subprocess.run([program, "stdin", "stdout", "--psm", "0", "-l", "osd"], input=osd_image(image, side),
                              capture_output=True, timeout=OSD_TIMEOUT_SECONDS, env=env, check=False)
    except subprocess.TimeoutExpired:
        log.debug("tesseract OSD took over %.0f s: page read as given", OSD_TIMEOUT_SECONDS)
        return None
    except OSError as exc:
        _warn_once(f"Tesseract cannot run ({exc.strerror or exc})")
        return None
    out, err = done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")
    rotate, confidence = _ROTATE.search(out), _CONFIDENCE.search(out)
    if rotate is None or confidence is None:
        if "osd" in err.lower() and ("failed loading" in err.lower() or "traineddata" in err.lower()):
            _warn_once("Tesseract's OSD data is missing (Debian: apt install tesseract-ocr-osd)")
        else:
            log.debug("tesseract OSD found no orientation: %s", err.strip().splitlines()[-1:] or "no output")
        return None
    angle = int(rotate.group(1)) % 360
    return OsdAnswer(angle, float(confidence.group(1))) if angle in ROTATIONS else None


def orientation(rotate: str, image: Image.Image, text_rotation: int | None = None) -> Orientation:
    """How a page is to be turned: `rotate` is the user's --rotate; `text_rotation` what its text layer says."""
    if rotate == "off":
        return Orientation()
    if rotate != "auto":
        return Orientation(int(rotate), "user")
    if text_rotation is not None:
        return Orientation(text_rotation, "text_layer")
    try:
        answer = run_osd(image)
    except Exception as exc:  # detection never fails a page: it is read as given
        log.debug("rotation detection failed (%s: %s): page read as given", type(exc).__name__, exc)
        return Orientation()
    if answer is None or answer.confidence < OSD_MIN_CONFIDENCE:
        return Orientation()
    return Orientation(answer.rotation, "osd")
