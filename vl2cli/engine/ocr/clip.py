"""CLIP-L as DeepSeek-OCR's DeepEncoder uses it: its patch embeddings are SAM's features (the patch conv is loaded
but unused), a class token, position embeddings resized to the grid, pre-LayerNorm, 24 pre-LN blocks with a fused
qkv and quick-GELU, and no post-norm.

Follows deepseek-ai/DeepSeek-OCR `DeepSeek-OCR-master/DeepSeek-OCR-vllm/deepencoder/clip_sdpa.py` (commit e4ac34e).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vl2cli.engine.sam import resize_grid

CLIP_WIDTH, CLIP_DEPTH, CLIP_HEADS, CLIP_GRID = 1024, 24, 16, 16


class ClipEmbeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(CLIP_WIDTH))
        self.patch_embedding = nn.Conv2d(3, CLIP_WIDTH, 14, 14, bias=False)  # in the checkpoint; SAM replaces it
        self.position_embedding = nn.Embedding(CLIP_GRID * CLIP_GRID + 1, CLIP_WIDTH)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """SAM features [B, 1024, g, g] -> [B, 1 + g*g, 1024] (class token first, positions added)."""
        b, c, g, _ = patches.shape
        tokens = patches.flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(b, 1, -1).to(tokens.dtype), tokens], dim=1)
        table = self.position_embedding.weight
        grid = table[1:].view(1, CLIP_GRID, CLIP_GRID, c).permute(0, 3, 1, 2)
        pos = torch.cat([table[:1], resize_grid(grid, g).permute(0, 2, 3, 1).reshape(g * g, c)])
        return x + pos[None]


class ClipAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv_proj = nn.Linear(CLIP_WIDTH, 3 * CLIP_WIDTH)
        self.out_proj = nn.Linear(CLIP_WIDTH, CLIP_WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv_proj(x).view(b, n, 3, CLIP_HEADS, -1).permute(2, 0, 3, 1, 4).unbind(0)  # [b, H, n, d]
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))


class ClipMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(CLIP_WIDTH, 4 * CLIP_WIDTH)
        self.fc2 = nn.Linear(4 * CLIP_WIDTH, CLIP_WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick GELU


class ClipLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(CLIP_WIDTH, eps=1e-5)
        self.self_attn = ClipAttention()
        self.layer_norm2 = nn.LayerNorm(CLIP_WIDTH, eps=1e-5)
        self.mlp = ClipMlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ClipLayer() for _ in range(CLIP_DEPTH))


class ClipEncoder(nn.Module):
    """SAM features [B, 1024, g, g] -> [B, 1 + g*g, 1024]."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = ClipEmbeddings()
        self.pre_layrnorm = nn.LayerNorm(CLIP_WIDTH, eps=1e-5)  # sic: the checkpoint's spelling
        self.transformer = ClipTransformer()

    def forward(self, sam_features: torch.Tensor) -> torch.Tensor:
        x = self.pre_layrnorm(self.embeddings(sam_features))
        for layer in self.transformer.layers:
            x = layer(x)
        return x
