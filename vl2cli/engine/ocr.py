"""DeepSeek-OCR: DeepEncoder (SAM ViT-B -> CLIP-L -> linear projector) in front of DeepSeek-VL2-tiny's decoder,
its resolution modes and tiling, and the order its image embeddings take in the prompt.

Follows deepseek-ai/DeepSeek-OCR (commit e4ac34e) `DeepSeek-OCR-master/DeepSeek-OCR-vllm/deepseek_ocr.py` and
`process/image_process.py`; the behaviour is written in shared/parity-ocr/README.md sec. 5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from vl2cli.engine.clip import ClipEncoder
from vl2cli.engine.config import OCR_MODES, OCRConfig
from vl2cli.engine.language import LanguageModel, WithDecoder
from vl2cli.engine.processor import (
    Content,
    Message,
    OcrViews,
    Prepared,
    _lookup,
    _normalise,
    local_tiles,
    raw_prompt_ids,
    tile_grid,
)
from vl2cli.engine.sam import SamEncoder
from vl2cli.engine.vision import LinearProjector
from vl2cli.errors import UsageError

if TYPE_CHECKING:
    from vl2cli.engine.processor import VL2Tokenizer

OCR_TILE = 640


@dataclass
class ViewFeatures:
    """One set of views (the global view, or the local tiles) through the encoder: each stage, tokens as rows."""

    sam: torch.Tensor  # [n, 1024, g, g]
    clip: torch.Tensor  # [n, 1 + g*g, 1024]
    projected: torch.Tensor  # [n, g*g, hidden]


class DeepseekOCR(WithDecoder):
    def __init__(self, cfg: OCRConfig):
        super().__init__()
        self.cfg = cfg
        self.sam_model = SamEncoder()
        self.vision_model = ClipEncoder()
        self.projector = LinearProjector(cfg.projector_input, cfg.language.hidden_size)
        self.image_newline = nn.Parameter(torch.zeros(cfg.language.hidden_size))
        self.view_seperator = nn.Parameter(torch.zeros(cfg.language.hidden_size))  # sic: the checkpoint's spelling
        self.language = LanguageModel(cfg.language)

    def encode_views(self, pixels: torch.Tensor) -> ViewFeatures:
        """[n, 3, S, S] -> SAM [n, 1024, S/64, S/64], CLIP [n, 1 + (S/64)^2, 1024], projected [n, (S/64)^2, d]."""
        dtype = self.sam_model.pos_embed.dtype
        sam = self.sam_model(pixels.to(self.sam_model.pos_embed.device, dtype))
        clip = self.vision_model(sam)
        # The projector sees CLIP's patch outputs (class token dropped) beside SAM's own features.
        joined = torch.cat([clip[:, 1:], sam.flatten(2).permute(0, 2, 1)], dim=-1)
        return ViewFeatures(sam, clip, self.projector(joined).to(self.dtype))

    def embed_prompts(self, input_ids: torch.Tensor, image_mask: torch.Tensor, prompts: list[Prepared]) -> torch.Tensor:
        """input_ids, image_mask [b, T]; each row's views run through the encoder, their embeddings at its image
        positions (one image per prompt, as the official scripts use it)."""
        embeds = self.language.embed_tokens(input_ids.to(self.device))
        for row, prompt in enumerate(prompts):
            views = prompt.views
            if views is None:
                continue
            glob = self.encode_views(torch.from_numpy(views.global_pixels)).projected
            local = (None if views.local_pixels is None
                     else self.encode_views(torch.from_numpy(views.local_pixels)).projected)
            self.place_images(embeds, row, image_mask[row], self.image_sequence(glob, local, views.tiles_wide,
                                                                                 views.tiles_high))
        return embeds

    def image_sequence(self, global_view: torch.Tensor, local: torch.Tensor | None, tiles_wide: int,
                       tiles_high: int) -> torch.Tensor:
        """Embeddings in prompt order: local grid rows + newline, global rows + newline, then the separator."""
        d = global_view.shape[-1]
        g = int(global_view.shape[1] ** 0.5)
        newline = self.image_newline.to(global_view.dtype)
        glob = torch.cat([global_view[0].view(g, g, d), newline.expand(g, 1, d)], dim=1).view(-1, d)
        parts = [glob, self.view_seperator.to(global_view.dtype)[None]]
        if local is not None:
            t = int(local.shape[1] ** 0.5)
            grid = local.view(tiles_high, tiles_wide, t, t, d).permute(0, 2, 1, 3, 4)
            grid = grid.reshape(tiles_high * t, tiles_wide * t, d)
            parts.insert(0, torch.cat([grid, newline.expand(tiles_high * t, 1, d)], dim=1).view(-1, d))
        return torch.cat(parts)


# ---------------------------------------------------------------------------------------------- processing


def closest_ratio(width: int, height: int, min_crops: int, max_crops: int) -> tuple[int, int]:
    """DeepSeek-OCR's tile grid (columns, rows) for 640-pixel tiles: processor.tile_grid's rule."""
    return tile_grid(width, height, min_crops, max_crops, OCR_TILE)


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

    def prepare_prompt(self, prompt: Content, images: list[Image.Image | OcrViews], system_prompt: str = "",
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
        return self.prepare_prompt(messages[0].content, list(messages[0].images), system_prompt,  # type: ignore[arg-type]
                                   mode)


def prepare_ocr_prompt(tokenizer: VL2Tokenizer, cfg: OCRConfig, prompt: Content, image: Image.Image | OcrViews,
                       mode: str) -> OcrPrompt:
    """The raw prompt, no chat template: [bos] + text before <image> + image ids + text after (one image)."""
    views = image if isinstance(image, OcrViews) else ocr_views(image, mode, cfg)
    mode = views.mode or mode  # views cut ahead were cut in their own mode: the image tokens follow them
    n = ocr_token_count(mode, views.tiles_wide, views.tiles_high, views.local_pixels is not None)
    ids, mask = raw_prompt_ids(tokenizer, cfg.image_token, prompt, n)
    return OcrPrompt(ids, mask, views, mode)
