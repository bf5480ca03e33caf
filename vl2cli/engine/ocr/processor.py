"""DeepSeek-OCR's prompts: its resolution modes and tiling (a padded global view, 640-pixel tiles), the image tokens
each takes, and the raw prompt (no chat template).

Follows deepseek-ai/DeepSeek-OCR (commit e4ac34e) `DeepSeek-OCR-master/DeepSeek-OCR-vllm/process/image_process.py`;
the behaviour is written in shared/parity-ocr/README.md sec. 5. The tile rule and the raw prompt are shared with
DeepSeek-OCR 2 (engine/processor.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from vl2cli.engine.ocr.config import OCR_MODES, OCRConfig
from vl2cli.engine.processor import (
    Content,
    Message,
    OcrViews,
    PageViews,
    Prepared,
    VL2Tokenizer,
    _lookup,
    _normalise,
    local_tiles,
    raw_prompt_ids,
)
from vl2cli.errors import UsageError

OCR_TILE = 640


def ocr_views(image: Image.Image, mode: str, cfg: OCRConfig) -> OcrViews:
    if mode not in OCR_MODES:
        raise UsageError(f"--ocr-mode {mode!r}: expected one of {', '.join(OCR_MODES)}")
    base, _, cropping = OCR_MODES[mode]
    table = _lookup(cfg.image_mean, cfg.image_std)
    fill = tuple(int(m * 255) for m in cfg.image_mean)
    image = image.convert("RGB")
    local, tiles_wide, tiles_high = (local_tiles(image, OCR_TILE, cfg.min_crops, cfg.max_crops, table) if cropping
                                     else (None, 1, 1))
    view = image.resize((base, base)) if not cropping and base <= OCR_TILE else image
    global_pixels = _normalise(ImageOps.pad(view, (base, base), color=fill), table)[None]
    return OcrViews(global_pixels, local, tiles_wide, tiles_high, mode=mode)


def ocr_token_count(mode: str, tiles_wide: int, tiles_high: int, tiled: bool) -> int:
    """Global view g*(g+1) + 1 separator (g = base/64), plus (10*rows)*(10*columns + 1) for 640-pixel tiles."""
    base = OCR_MODES[mode][0]
    g = base // 16 // 4
    count = g * (g + 1) + 1
    if tiled:
        t = OCR_TILE // 16 // 4
        count += (t * tiles_high) * (t * tiles_wide + 1)
    return count


@dataclass
class OcrPrompt:
    input_ids: list[int]
    image_mask: list[bool]
    views: OcrViews
    mode: str


class OCRProcessor:
    """DeepSeek-OCR's raw prompts (no chat template) and views, behind the same interface as the VL2 Processor.

    The mode is each call's own (`mode`, else the default given here): two requests in different modes never see
    each other's; views cut ahead carry the mode they were cut in."""

    def __init__(self, tokenizer: VL2Tokenizer, cfg: OCRConfig, mode: str = "gundam"):
        self.tokenizer, self.cfg, self.mode = tokenizer, cfg, mode

    def tile(self, image: Image.Image, mode: str | None = None) -> OcrViews:
        return ocr_views(image, mode or self.mode, self.cfg)

    def prepare_prompt(self, prompt: Content, images: Sequence[Image.Image | PageViews], system_prompt: str = "",
                       mode: str | None = None) -> Prepared:
        del system_prompt  # the raw prompt has no system turn
        if len(images) != 1:
            raise UsageError(f"DeepSeek-OCR reads one image per prompt, not {len(images)}")
        done = prepare_ocr_prompt(self.tokenizer, self.cfg, prompt, images[0], mode or self.mode)
        text = prompt if isinstance(prompt, str) else "".join(prompt)
        v = done.views
        return Prepared(text, done.input_ids, done.image_mask, np.zeros((0, 3, 1, 1), np.float32),
                        [[v.tiles_wide, v.tiles_high]], views=v)

    def prepare(self, messages: list[Message], system_prompt: str = "", mode: str | None = None) -> Prepared:
        if len(messages) != 1 or messages[0].role != "user":
            raise UsageError("DeepSeek-OCR answers one prompt at a time (no conversation, no --chat)")
        return self.prepare_prompt(messages[0].content, messages[0].images, system_prompt, mode)


def prepare_ocr_prompt(tokenizer: VL2Tokenizer, cfg: OCRConfig, prompt: Content, image: Image.Image | PageViews,
                       mode: str) -> OcrPrompt:
    """The raw prompt, no chat template: [bos] + text before <image> + image ids + text after (one image)."""
    if isinstance(image, OcrViews):
        views = image
    elif isinstance(image, Image.Image):
        views = ocr_views(image, mode, cfg)
    else:
        raise UsageError(f"DeepSeek-OCR cannot read a page cut for another model ({type(image).__name__})")
    mode = views.mode or mode  # views cut ahead were cut in their own mode: the image tokens follow them
    n = ocr_token_count(mode, views.tiles_wide, views.tiles_high, views.local_pixels is not None)
    ids, mask = raw_prompt_ids(tokenizer, cfg.image_token, prompt, n)
    return OcrPrompt(ids, mask, views, mode)
