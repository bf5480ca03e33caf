"""DeepSeek-OCR 2: DeepEncoder V2 (SAM ViT-B -> a Qwen2-0.5B-shaped encoder with learnable queries -> linear
projector) in front of DeepSeek-VL2-tiny's decoder, its one resolution setting (2-6 tiles of 768 px and a padded
1024 global view), and the order its image embeddings take in the prompt.

Follows deepseek-ai/DeepSeek-OCR-2 (commit 2f3699e) `DeepSeek-OCR2-master/DeepSeek-OCR2-vllm/deepseek_ocr2.py`,
`process/image_process.py`, `deepencoderv2/build_linear.py` and `config.py`; the behaviour is written in
shared/parity-ocr2/README.md sec. 5. What it shares with DeepSeek-OCR (SAM, the decoder, the tile rule, the raw
prompt, the processor's interface) comes from engine.processor, engine.sam and engine.vision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from vl2cli.engine.config import OCR2Config
from vl2cli.engine.language import LanguageModel, WithDecoder
from vl2cli.engine.processor import Content, Message, OcrViews, Prepared, _lookup, _normalise, local_tiles, raw_prompt_ids
from vl2cli.engine.qwen2_encoder import ENCODER_WIDTH, QueryEncoder
from vl2cli.engine.sam import SamEncoder
from vl2cli.engine.vision import LinearProjector
from vl2cli.errors import UsageError

if TYPE_CHECKING:
    from vl2cli.engine.processor import VL2Tokenizer

OCR2_MODE = "gundam"  # its one setting is DeepSeek-OCR's gundam mode with 768-pixel tiles; no other mode exists


def ocr2_mode_refused(mode: str) -> str:
    return (f"--ocr-mode {mode}: DeepSeek-OCR 2 reads in one setting only, gundam (2-6 tiles of 768 px and a 1024 "
            "view); the other modes are DeepSeek-OCR's (--model ocr)")


@dataclass
class View2Features:
    """One set of views (the global view, or the local tiles) through the encoder: each stage, tokens as rows."""

    sam: torch.Tensor  # [n, 896, g, g]
    first_layer: torch.Tensor  # [n, 2*g*g, 896]: the encoder's first layer at every position (the parity trace)
    encoded: torch.Tensor  # [n, g*g, 896]: the queries' outputs
    projected: torch.Tensor  # [n, g*g, hidden]


class DeepseekOCR2(WithDecoder):
    def __init__(self, cfg: OCR2Config):
        super().__init__()
        self.cfg = cfg
        self.sam_model = SamEncoder(out_channels=ENCODER_WIDTH)
        self.qwen2_model = QueryEncoder()
        self.projector = LinearProjector(cfg.projector_input, cfg.language.hidden_size)
        self.view_seperator = nn.Parameter(torch.zeros(cfg.language.hidden_size))  # sic: the checkpoint's spelling
        self.language = LanguageModel(cfg.language)

    def encode_views(self, pixels: torch.Tensor) -> View2Features:
        """[n, 3, S, S] -> SAM [n, 896, S/64, S/64], then the queries' outputs and their projection [n, (S/64)^2, d]."""
        dtype = self.sam_model.pos_embed.dtype
        sam = self.sam_model(pixels.to(self.sam_model.pos_embed.device, dtype))
        encoded, first = self.qwen2_model(sam.flatten(2).transpose(1, 2))  # SAM tokens row-major, then the queries
        return View2Features(sam, first, encoded, self.projector(encoded).to(self.dtype))

    def image_sequence(self, global_view: torch.Tensor, local: torch.Tensor | None) -> torch.Tensor:
        """Embeddings in prompt order: every local tile's rows (tile by tile, row-major tile order), the global
        view's, then the separator. No newline rows, and local first although config.json says
        `global_view_pos: head` (the reference does not read it)."""
        parts = [global_view.reshape(-1, global_view.shape[-1]), self.view_seperator.to(global_view.dtype)[None]]
        if local is not None:
            parts.insert(0, local.reshape(-1, local.shape[-1]))
        return torch.cat(parts)

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
            self.place_images(embeds, row, image_mask[row], self.image_sequence(glob, local))
        return embeds


# ---------------------------------------------------------------------------------------------- processing


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

    def prompt_ids(self, prompt: Content, image: Image.Image | OcrViews) -> tuple[list[int], list[bool], OcrViews]:
        views = image if isinstance(image, OcrViews) else ocr2_views(image, self.cfg)
        tiles = 0 if views.local_pixels is None else len(views.local_pixels)
        ids, mask = raw_prompt_ids(self.tokenizer, self.cfg.image_token, prompt, ocr2_token_count(self.cfg, tiles))
        return ids, mask, views

    def prepare_prompt(self, prompt: Content, images: list[Image.Image | OcrViews], system_prompt: str = "",
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
        return self.prepare_prompt(messages[0].content, list(messages[0].images), system_prompt,  # type: ignore[arg-type]
                                   mode)
