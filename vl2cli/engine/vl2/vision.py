"""SigLIP ViT tower and the downsample-MLP projector that turns 27x27 patches into 14x14 tokens.

Follows deepseek-ai/DeepSeek-VL2 `deepseek_vl2/models/siglip_vit.py` (commit 9bccb34; timm's VisionTransformer
without class token, features of the last block) and `MlpProjector` ("downsample_mlp_gelu") of
`deepseek_vl2/models/modeling_deepseek_vl_v2.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vl2cli.engine.vl2.config import ProjectorConfig, VisionConfig


class VisionAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # [b, n, 3*d] -> [3, b, heads, n, head_dim]
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [b, heads, n, head_dim]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class VisionMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = VisionAttention(cfg.width, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = VisionMlp(cfg.width, cfg.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [b, width, 27, 27] -> [b, 729, width]


class VisionTower(nn.Module):
    """Returns the final-normed patch features [tiles, grid*grid, width]; the attention-pool head is unused."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid * cfg.grid, cfg.width))
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class Projector(nn.Module):
    """Pad the patch grid to even size, merge each 2x2 block (unfold layout), then Linear-GELU-...-Linear."""

    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.ratio = cfg.downsample_ratio
        width = cfg.n_embed * cfg.mlp_ratio
        mods: list[nn.Module] = [nn.Linear(cfg.input_dim * self.ratio**2, width)]
        for _ in range(1, cfg.depth - 1):
            mods += [nn.GELU(), nn.Linear(width, width)]
        mods += [nn.GELU(), nn.Linear(width, cfg.n_embed)]
        self.layers = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, hw, c = x.shape
        side = int(hw**0.5)
        pad = -side % self.ratio
        x = x.view(b, side, side, c)
        if pad:
            x = F.pad(x, (0, 0, 0, pad, 0, pad))  # zeros on the bottom rows and right columns
        x = x.permute(0, 3, 1, 2)  # [b, c, 28, 28]
        # [b, c*4, 196]: per channel the 2x2 block's top-left, top-right, bottom-left, bottom-right
        x = F.unfold(x, kernel_size=self.ratio, stride=self.ratio)
        return self.layers(x.transpose(1, 2))  # [b, 196, n_embed]
