"""What DeepSeek-OCR and DeepSeek-OCR 2 share on the model side: the linear projector, and a page's views (a global
view, local tiles) run through the family's encoder and placed at the prompt's image positions.

Follows `DeepSeek-OCR-vllm/deepseek_ocr.py` and `DeepSeek-OCR2-vllm/deepseek_ocr2.py` (`_pixel_values_to_embedding`,
`get_multimodal_embeddings`) and `deepencoder/build_linear.py` of each; the views themselves are cut by
engine/processor.py's tile rule.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import nn

from vl2cli.engine.language import WithDecoder

if TYPE_CHECKING:
    from vl2cli.engine.processor import OcrViews, Prepared


class LinearProjector(nn.Module):
    """DeepSeek-OCR's and DeepSeek-OCR 2's projector: one linear layer (`build_linear.py`, projector_type linear)."""

    def __init__(self, inputs: int, outputs: int):
        super().__init__()
        self.layers = nn.Linear(inputs, outputs)  # the checkpoint names it `projector.layers`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ReadsViews(WithDecoder):
    """A decoder that reads one image per prompt as views: each set (the global view, the local tiles) through the
    family's encoder, then laid out in the family's prompt order."""

    @abstractmethod
    def project_views(self, pixels: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] views -> [n, tokens, hidden]: the encoder's tokens in the decoder's width."""

    @abstractmethod
    def views_sequence(self, global_view: torch.Tensor, local: torch.Tensor | None, views: OcrViews) -> torch.Tensor:
        """One image's embeddings in prompt order, from its projected global view and local tiles."""

    def embed_prompts(self, input_ids: torch.Tensor, image_mask: torch.Tensor, prompts: list[Prepared]) -> torch.Tensor:
        """input_ids, image_mask [b, T]; each row's views run through the encoder, their embeddings at its image
        positions (one image per prompt, as the official scripts use it)."""
        embeds = self.language.embed_tokens(input_ids.to(self.device))
        for row, prompt in enumerate(prompts):
            views = prompt.views
            if views is None:
                continue
            glob = self.project_views(torch.from_numpy(views.global_pixels))
            local = None if views.local_pixels is None else self.project_views(torch.from_numpy(views.local_pixels))
            self.place_images(embeds, row, image_mask[row], self.views_sequence(glob, local, views))
        return embeds
