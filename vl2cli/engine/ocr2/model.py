"""DeepSeek-OCR 2: DeepEncoder V2 (SAM ViT-B -> a Qwen2-0.5B-shaped encoder with learnable queries -> linear
projector) in front of DeepSeek-VL2-tiny's decoder, and the order its image embeddings take in the prompt.

Follows deepseek-ai/DeepSeek-OCR-2 (commit 2f3699e) `DeepSeek-OCR2-master/DeepSeek-OCR2-vllm/deepseek_ocr2.py`,
`process/image_process.py`, `deepencoderv2/build_linear.py` and `config.py`; the behaviour is written in
shared/parity-ocr2/README.md sec. 5. What it shares with DeepSeek-OCR (SAM, the decoder, the linear projector, views
placed at the image positions) comes from engine.sam, engine.language and engine.views.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from vl2cli.engine.language import LanguageModel
from vl2cli.engine.ocr2.config import OCR2Config
from vl2cli.engine.ocr2.qwen2_encoder import ENCODER_WIDTH, QueryEncoder
from vl2cli.engine.sam import SamEncoder
from vl2cli.engine.views import LinearProjector, ReadsViews

if TYPE_CHECKING:
    from vl2cli.engine.processor import OcrViews


@dataclass
class View2Features:
    """One set of views (the global view, or the local tiles) through the encoder: each stage, tokens as rows."""

    sam: torch.Tensor  # [n, 896, g, g]
    first_layer: torch.Tensor  # [n, 2*g*g, 896]: the encoder's first layer at every position (the parity trace)
    encoded: torch.Tensor  # [n, g*g, 896]: the queries' outputs
    projected: torch.Tensor  # [n, g*g, hidden]


class DeepseekOCR2(ReadsViews):
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

    def project_views(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encode_views(pixels).projected

    def views_sequence(self, global_view: torch.Tensor, local: torch.Tensor | None, views: OcrViews) -> torch.Tensor:
        del views  # no newline rows: the tile grid's shape does not enter the layout
        return self.image_sequence(global_view, local)
