"""Typed options, validated on construction, and the defaults (written once, here).

`PageOptions`: everything that turns files into pages. `ReadOptions`: everything that turns pages into
answers. A bad value is a UsageError naming the option, raised before any model is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from vl2cli.errors import UsageError

# 144 DPI: the largest tiling canvas is 1152 px on a side, which a letter page fills at about
# 105 DPI; rendering a little above that gives the bicubic downscale clean strokes to work
# from, and a band cut from the page by --split keeps 144 DPI effective instead of ~105.
DEFAULT_DPI = 144
MAX_DPI = 1200
DEFAULT_MAX_PIXELS = 64_000_000  # per page; larger images are refused as likely decompression bombs
MAX_MAX_PIXELS = 1_000_000_000  # --max-pixels may raise the cap (also above Pillow's own 89 Mpx guard) up to this
DEFAULT_BATCH_SIZE = 4
DEFAULT_MAX_NEW_TOKENS = 2048  # per page; the context (4096) leaves less after a tiled page
DEFAULT_ASK_TOKENS = 512
MAX_BATCH_SIZE = 64
MAX_SPLIT_BANDS = 16
LOOP_RETRY_TEMPERATURES = (0.3, 0.5, 0.7)  # the model card advises temperature <= 0.7
DEFAULT_ROTATE = "auto"  # sideways and upside-down pages are turned upright before reading (vl2cli/orient.py)
ROTATE_CHOICES = ("auto", "off", "0", "90", "180", "270")

OCR_MODE_NAMES = ("tiny", "small", "base", "large", "gundam")  # engine.config.OCR_MODES holds their sizes
TextLayer = Literal["off", "hint", "only"]
TEXT_LAYERS: tuple[TextLayer, ...] = ("off", "hint", "only")
Redo = Literal["none", "failed", "all"]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


@dataclass(frozen=True)
class PageOptions:
    pages: str | None = None  # "1-3,7,10-"; None = every page
    dpi: int = DEFAULT_DPI
    password: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    text_layer: bool = False  # also extract PDF text layers
    rotate: str = DEFAULT_ROTATE  # auto (detect), off, or the clockwise turn 0/90/180/270 for every page

    def __post_init__(self) -> None:
        _check(self.rotate in ROTATE_CHOICES, f"--rotate {self.rotate!r}: expected auto, off, 0, 90, 180 or 270")
        _check(isinstance(self.dpi, int) and 18 <= self.dpi <= MAX_DPI, f"--dpi {self.dpi}: expected 18..{MAX_DPI}")
        _check(isinstance(self.max_pixels, int) and 4 <= self.max_pixels <= MAX_MAX_PIXELS,
               f"--max-pixels {self.max_pixels}: expected 4..{MAX_MAX_PIXELS}")


@dataclass(frozen=True)
class ReadOptions:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0  # 0 = greedy
    top_p: float | None = None  # None: 0.9 when sampling, else 1.0
    seed: int | None = None  # None: 0 when sampling (runs repeat), unused when greedy
    text: str | None = None  # the question (ask) or query (ground)
    prompt_file: str | None = None
    split: str = "auto"  # auto | never | N bands
    text_layer: TextLayer = "off"
    batch_size: int = DEFAULT_BATCH_SIZE
    loop_retries: bool = True
    schema_json: str | None = None  # extract: the JSON Schema (compact JSON) every answer must satisfy
    strict: bool = False  # ground: answers constrained to the grounding format
    ocr_mode: str = "gundam"  # DeepSeek-OCR: tiny, small, base, large or gundam
    plain: bool = False  # plain text wanted (DeepSeek-OCR then asks "Free OCR." instead of markdown with layout)
    no_repeat: bool = True  # DeepSeek-OCR: no repeated 30-gram within 90 tokens (its own scripts' rule)

    def __post_init__(self) -> None:
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
               f"--max-new-tokens {self.max_new_tokens}: expected a positive number")
        _check(isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
               and 0 <= self.temperature <= 2, f"--temperature {self.temperature}: expected 0..2 (0 = greedy)")
        _check(self.top_p is None or (math.isfinite(self.top_p) and 0 < self.top_p <= 1),
               f"--top-p {self.top_p}: expected a number in (0, 1]")
        _check(isinstance(self.batch_size, int) and 1 <= self.batch_size <= MAX_BATCH_SIZE,
               f"--batch-size {self.batch_size}: expected 1..{MAX_BATCH_SIZE}")
        _check(self.split in ("auto", "never") or (self.split.isdigit() and 1 <= int(self.split) <= MAX_SPLIT_BANDS),
               f"--split {self.split!r}: expected auto, never or a number 1-{MAX_SPLIT_BANDS}")
        _check(self.text_layer in TEXT_LAYERS, f"--text-layer {self.text_layer!r}: expected off, hint or only")
        _check(self.ocr_mode in OCR_MODE_NAMES, f"--ocr-mode {self.ocr_mode!r}: expected {', '.join(OCR_MODE_NAMES)}")

    @property
    def sampling_top_p(self) -> float:
        return self.top_p if self.top_p is not None else (0.9 if self.temperature else 1.0)

    @property
    def sampling_seed(self) -> int | None:
        return self.seed if self.seed is not None else (0 if self.temperature else None)

    def settings(self) -> dict:
        """What changes an answer (the page key digests it)."""
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.sampling_top_p,
                "seed": self.sampling_seed, "text": self.text, "split": self.split, "text_layer": self.text_layer,
                "loop_retries": self.loop_retries, "schema": self.schema_json, "strict": self.strict,
                "ocr_mode": self.ocr_mode, "plain": self.plain, "no_repeat": self.no_repeat}
