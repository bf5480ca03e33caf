"""DeepSeek-VL2: vision tower + projector + image-token layout + the DeepSeek-V2 language model.

Follows `DeepseekVLV2ForCausalLM.prepare_inputs_embeds` of deepseek-ai/DeepSeek-VL2
`deepseek_vl2/models/modeling_deepseek_vl_v2.py` (the "2D" tile tag: global view rows, separator, local grid).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from vl2cli.engine.language import LanguageModel, WithDecoder
from vl2cli.engine.vl2.config import VL2Config
from vl2cli.engine.vl2.vision import Projector, VisionTower

if TYPE_CHECKING:
    from vl2cli.engine.processor import Prepared


class DeepseekVL2(WithDecoder):
    def __init__(self, cfg: VL2Config):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision)
        self.projector = Projector(cfg.projector)
        self.image_newline = nn.Parameter(torch.zeros(cfg.projector.n_embed))
        self.view_seperator = nn.Parameter(torch.zeros(cfg.projector.n_embed))  # sic: the checkpoint's spelling
        self.language = LanguageModel(cfg.language)

    def encode_tiles(self, pixels: torch.Tensor, tiles_per_step: int = 16) -> torch.Tensor:
        """[tiles, 3, S, S] -> [tiles, h*w, d] projected tokens, a bounded number of tiles at a time."""
        dtype = self.vision.pos_embed.dtype
        out = []
        for chunk in pixels.split(tiles_per_step):
            feats = self.vision(chunk.to(self.vision.pos_embed.device, dtype))  # [t, 729, width]
            out.append(self.projector(feats).to(self.dtype))  # [t, 196, d]
        return torch.cat(out)

    def image_sequence(self, tokens: torch.Tensor, tiles_wide: int, tiles_high: int) -> torch.Tensor:
        """One image's embeddings in prompt order: global view rows + newline, separator, local grid rows + newline."""
        _, hw, d = tokens.shape
        h = w = int(hw**0.5)
        newline = self.image_newline.to(tokens.dtype)
        glob = torch.cat([tokens[0].view(h, w, d), newline.expand(h, 1, d)], dim=1).view(-1, d)  # [h*(w+1), d]
        local = tokens[1 : 1 + tiles_wide * tiles_high]
        # [(th tw), (h w), d] -> [th*h, tw*w, d]: tiles row by row become one big grid
        local = local.view(tiles_high, tiles_wide, h, w, d).permute(0, 2, 1, 3, 4).reshape(tiles_high * h, tiles_wide * w, d)
        local = torch.cat([local, newline.expand(tiles_high * h, 1, d)], dim=1).view(-1, d)
        sep = self.view_seperator.to(tokens.dtype)[None]
        parts = [glob, sep, local] if self.cfg.global_view_pos == "head" else [local, sep, glob]
        return torch.cat(parts)

    def embed_prompts(self, input_ids: torch.Tensor, image_mask: torch.Tensor, prompts: list[Prepared]) -> torch.Tensor:
        return self.embed(input_ids, image_mask, [torch.from_numpy(p.pixels) for p in prompts],
                          [p.spatial_crop for p in prompts])

    def embed(self, input_ids: torch.Tensor, image_mask: torch.Tensor, pixels: list[torch.Tensor],
              crops: list[list[list[int]]]) -> torch.Tensor:
        """input_ids, image_mask [b, T]; per row its tiles [n_tiles, 3, S, S] and [tiles_wide, tiles_high] per image."""
        embeds = self.language.embed_tokens(input_ids.to(self.device))  # [b, T, d]
        all_tiles = [p for p in pixels if p.shape[0]]
        if not all_tiles:
            return embeds
        tokens = self.encode_tiles(torch.cat(all_tiles))
        cursor = 0
        for row, row_crops in enumerate(crops):
            seqs = []
            for tw, th in row_crops:
                seqs.append(self.image_sequence(tokens[cursor : cursor + 1 + tw * th], tw, th))
                cursor += 1 + tw * th
            if seqs:
                self.place_images(embeds, row, image_mask[row], torch.cat(seqs))
        return embeds
