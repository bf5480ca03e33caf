"""SAM ViT-B image encoder as DeepSeek-OCR's DeepEncoder uses it: windowed attention with decomposed relative
positions, global attention in four blocks, a conv neck, then two stride-2 convs to 1024 channels (16x compression);
DeepSeek-OCR 2 uses it as is but for the last conv, which ends in 896 channels (its Qwen2 encoder's width).

Follows deepseek-ai/DeepSeek-OCR `DeepSeek-OCR-master/DeepSeek-OCR-vllm/deepencoder/sam_vary_sdpa.py` (commit
e4ac34e), itself segment-anything's ImageEncoderViT, and deepseek-ai/DeepSeek-OCR-2 `DeepSeek-OCR2-master/
DeepSeek-OCR2-vllm/deepencoderv2/sam_vary_sdpa.py` (commit 2f3699e); the behaviour is written in
shared/parity-ocr/README.md and shared/parity-ocr2/README.md sec. 5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SAM_WIDTH, SAM_DEPTH, SAM_HEADS, SAM_WINDOW, SAM_PATCH = 768, 12, 12, 14, 16
SAM_GLOBAL_BLOCKS = (2, 5, 8, 11)
SAM_GRID = 64  # positions are stored for a 1024-pixel input


def resize_grid(grid: torch.Tensor, size: int) -> torch.Tensor:
    """[1, C, H, W] -> [1, C, size, size]: bicubic with antialias, in float32 (the reference's get_abs_pos)."""
    if grid.shape[-1] == size:
        return grid
    return F.interpolate(grid.float(), size=(size, size), mode="bicubic", antialias=True,
                         align_corners=False).to(grid.dtype)


def relative_positions(q_size: int, k_size: int, table: torch.Tensor) -> torch.Tensor:
    """The rel-pos table for q_size x k_size positions [q, k, C], linearly resized when its length differs."""
    distance = 2 * max(q_size, k_size) - 1
    if table.shape[0] != distance:  # a 40x40 grid (640-pixel input) in a block trained for 64x64
        resized = F.interpolate(table.float().T[None], size=distance, mode="linear")
        table = resized[0].T.to(table.dtype)
    q = torch.arange(q_size, device=table.device)[:, None] * max(k_size / q_size, 1.0)
    k = torch.arange(k_size, device=table.device)[None, :] * max(q_size / k_size, 1.0)
    return table[((q - k) + (k_size - 1) * max(q_size / k_size, 1.0)).long()]


class LayerNorm2d(nn.Module):
    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W], normalised over C
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class SamAttention(nn.Module):
    def __init__(self, dim: int, heads: int, rel_size: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_size - 1, dim // heads))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_size - 1, dim // heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # [3, b, H, hw, d]
        q, k, v = qkv.unbind(0)
        d = q.shape[-1]
        # Decomposed relative positions from the unscaled queries, added to the attention logits.
        r_q = q.reshape(b * self.heads, h, w, d)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, relative_positions(h, h, self.rel_pos_h))  # [bH, h, w, h]
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, relative_positions(w, w, self.rel_pos_w))  # [bH, h, w, w]
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, self.heads, h * w, h * w)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [b, H, hw, d]
        return self.proj(out.view(b, self.heads, h, w, d).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1))


class SamMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.gelu(self.lin1(x)))


class SamBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.window = window  # 0: global attention
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SamAttention(dim, heads, window if window else SAM_GRID)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SamMlp(dim, dim * 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C]
        shortcut = x
        x = self.norm1(x)
        if self.window:
            b, h, w, c = x.shape
            s = self.window
            pad_h, pad_w = (s - h % s) % s, (s - w % s) % s
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # zeros after the norm, as the reference pads
            hp, wp = h + pad_h, w + pad_w
            windows = x.view(b, hp // s, s, wp // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s, s, c)
            x = self.attn(windows).view(b, hp // s, wp // s, s, s, c).permute(0, 1, 3, 2, 4, 5)
            x = x.reshape(b, hp, wp, c)[:, :h, :w]
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, SAM_WIDTH, SAM_PATCH, SAM_PATCH)


class SamEncoder(nn.Module):
    """[B, 3, S, S] -> [B, C, S/64, S/64] (16x16 for 1024 pixels, 12x12 for 768, 10x10 for 640); C = 1024 for
    DeepSeek-OCR, 896 for DeepSeek-OCR 2."""

    def __init__(self, out_channels: int = 1024) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed()
        self.pos_embed = nn.Parameter(torch.zeros(1, SAM_GRID, SAM_GRID, SAM_WIDTH))
        self.blocks = nn.ModuleList(SamBlock(SAM_WIDTH, SAM_HEADS, 0 if i in SAM_GLOBAL_BLOCKS else SAM_WINDOW)
                                    for i in range(SAM_DEPTH))
        self.neck = nn.Sequential(nn.Conv2d(SAM_WIDTH, 256, 1, bias=False), LayerNorm2d(256),
                                  nn.Conv2d(256, 256, 3, padding=1, bias=False), LayerNorm2d(256))
        self.net_2 = nn.Conv2d(256, 512, 3, stride=2, padding=1, bias=False)
        self.net_3 = nn.Conv2d(512, out_channels, 3, stride=2, padding=1, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(pixels).permute(0, 2, 3, 1)  # [B, g, g, 768]
        pos = resize_grid(self.pos_embed.permute(0, 3, 1, 2), x.shape[1]).permute(0, 2, 3, 1)
        x = x + pos
        for block in self.blocks:
            x = block(x)
        return self.net_3(self.net_2(self.neck(x.permute(0, 3, 1, 2))))
