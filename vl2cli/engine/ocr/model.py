"""DeepSeek-OCR: DeepEncoder (SAM ViT-B -> CLIP-L -> linear projector) in front of DeepSeek-VL2-tiny's decoder, and
the order its image embeddings take in the prompt.

Follows deepseek-ai/DeepSeek-OCR (commit e4ac34e) `DeepSeek-OCR-master/DeepSeek-OCR-vllm/deepseek_ocr.py` and
`process/image_process.py`; the behaviour is written in shared/parity-ocr/README.md sec. 5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from vl2cli.engine.language import LanguageModel
from vl2cli.engine.ocr.clip import ClipEncoder
from vl2cli.engine.ocr.config import OCRConfig
from vl2cli.engine.sam import SamEncoder
from vl2cli.engine.views import LinearProjector, ReadsViews

if TYPE_CHECKING:
    from vl2cli.engine.processor import OcrViews


@dataclass
class ViewFeatures:
    """One set of views (the global view, or the local tiles) through the encoder: each stage, tokens as rows."""

    sam: torch.Tensor  # [n, 1024, g, g]
    clip: torch.Tensor  # [n, 1 + g*g, 1024]
    projected: torch.Tensor  # [n, g*g, hidden]


class DeepseekOCR(ReadsViews):
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

    def project_views(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encode_views(pixels).projected

    def views_sequence(self, global_view: torch.Tensor, local: torch.Tensor | None, views: OcrViews) -> torch.Tensor:
        return self.image_sequence(global_view, local, views.tiles_wide, views.tiles_high)

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
