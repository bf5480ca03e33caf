"""DeepSeek-OCR 2's prompts: its one resolution setting (2-6 tiles of 768 px and a padded 1024 global view), the image
tokens it takes, and the raw prompt (no chat template).

Follows deepseek-ai/DeepSeek-OCR-2 (commit 2f3699e) `DeepSeek-OCR2-master/DeepSeek-OCR2-vllm/process/image_process.py`
and `config.py`; the behaviour is written in shared/parity-ocr2/README.md sec. 5. The tile rule and the raw prompt
are shared with DeepSeek-OCR (engine/processor.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from vl2cli.engine.ocr2.config import OCR2Config
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


@dataclass
class Ocr2Views(OcrViews):
    """DeepSeek-OCR 2's views, with where the page went inside the padded global view (the parity trace's
    geometry)."""

    global_resize: tuple[int, int]  # the page's size inside the global view
    global_paste: tuple[int, int] | None  # its top-left corner there; None when it fills the view


def padded_view(image: Image.Image, side: int, fill: tuple[int, ...]) -> tuple[Image.Image, tuple[int, int],
                                                                                tuple[int, int] | None]:
    """Pillow's ImageOps.pad written out, so that the geometry it chose is known: resize (BICUBIC) keeping the aspect
    ratio so the longer side is `side` (small pages are upscaled), then paste centred on `fill`."""
    resized = ImageOps.contain(image, (side, side))
    if resized.size == (side, side):
        return resized, resized.size, None
    out = Image.new(image.mode, (side, side), fill)
    if resized.width != side:
        at = (round((side - resized.width) * 0.5), 0)
    else:
        at = (0, round((side - resized.height) * 0.5))
    out.paste(resized, at)
    return out, resized.size, at


def ocr2_views(image: Image.Image, cfg: OCR2Config) -> Ocr2Views:
    """Tiles of 768 (2..6 of them, only when a side is over 768), and the page padded to 1024 on grey 127."""
    table = _lookup(cfg.image_mean, cfg.image_std)
    fill = tuple(int(m * 255) for m in cfg.image_mean)
    image = image.convert("RGB")
    local, tiles_wide, tiles_high = local_tiles(image, cfg.tile_size, cfg.min_crops, cfg.max_crops, table)
    view, resize, paste = padded_view(image, cfg.global_size, fill)
    return Ocr2Views(_normalise(view, table)[None], local, tiles_wide, tiles_high, resize, paste)


def ocr2_token_count(cfg: OCR2Config, tiles: int) -> int:
    """(1024/64)^2 = 256 global queries + 1 separator, plus (768/64)^2 = 144 per tile."""
    return (cfg.global_size // 64) ** 2 + 1 + tiles * (cfg.tile_size // 64) ** 2


class OCR2Processor:
    """DeepSeek-OCR 2's raw prompts (no chat template) and views, behind the same interface as the VL2 Processor."""

    def __init__(self, tokenizer: VL2Tokenizer, cfg: OCR2Config):
        self.tokenizer, self.cfg = tokenizer, cfg

    def tile(self, image: Image.Image, mode: str | None = None) -> Ocr2Views:
        del mode  # one setting only (the reader refuses any other mode)
        return ocr2_views(image, self.cfg)

    def prompt_ids(self, prompt: Content, image: Image.Image | PageViews) -> tuple[list[int], list[bool], OcrViews]:
        if isinstance(image, OcrViews):
            views = image
        elif isinstance(image, Image.Image):
            views = ocr2_views(image, self.cfg)
        else:
            raise UsageError(f"DeepSeek-OCR 2 cannot read a page cut for another model ({type(image).__name__})")
        tiles = 0 if views.local_pixels is None else len(views.local_pixels)
        ids, mask = raw_prompt_ids(self.tokenizer, self.cfg.image_token, prompt, ocr2_token_count(self.cfg, tiles))
        return ids, mask, views

    def prepare_prompt(self, prompt: Content, images: Sequence[Image.Image | PageViews], system_prompt: str = "",
                       mode: str | None = None) -> Prepared:
        del system_prompt, mode  # the raw prompt has no system turn; one setting only
        if len(images) != 1:
            raise UsageError(f"DeepSeek-OCR 2 reads one image per prompt, not {len(images)}")
        ids, mask, views = self.prompt_ids(prompt, images[0])
        text = prompt if isinstance(prompt, str) else "".join(prompt)
        return Prepared(text, ids, mask, np.zeros((0, 3, 1, 1), np.float32), [[views.tiles_wide, views.tiles_high]],
                        views=views)

    def prepare(self, messages: list[Message], system_prompt: str = "", mode: str | None = None) -> Prepared:
        if len(messages) != 1 or messages[0].role != "user":
            raise UsageError("DeepSeek-OCR 2 answers one prompt at a time (no conversation, no --chat)")
        return self.prepare_prompt(messages[0].content, messages[0].images, system_prompt, mode)
