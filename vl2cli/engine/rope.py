"""Rotary position embeddings, plain and YaRN-scaled, as deepseek-ai/DeepSeek-VL2
`deepseek_vl2/models/modeling_deepseek.py` (commit 93bb502) computes them (`DeepseekV2RotaryEmbedding`,
`DeepseekV2YarnRotaryEmbedding`, `apply_rotary_pos_emb`)."""

from __future__ import annotations

import math
from typing import Any

import torch


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(dim: int, base: float, scaling: dict[str, Any] | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for `dim` rotated channels, and the cos/sin magnitude (1.0 unless YaRN says otherwise)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    extra = 1.0 / (base**exponents)
    if not scaling:
        return extra, 1.0
    factor = scaling["factor"]
    original = scaling.get("original_max_position_embeddings", 4096)
    beta_fast, beta_slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high: float = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # the reference's guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolate = 1.0 - ramp  # 1 where the original frequency is kept
    inter = 1.0 / (factor * base**exponents)
    inv_freq = inter * (1 - extrapolate) + extra * extrapolate
    magnitude = yarn_mscale(factor, scaling.get("mscale", 1)) / yarn_mscale(factor, scaling.get("mscale_all_dim", 0))
    return inv_freq, float(magnitude)


def rope_cos_sin(inv_freq: torch.Tensor, magnitude: float, positions: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, n] -> cos, sin [B, 1, n, dim] (halves repeated, rotate-half convention).

    `inv_freq` must already live on the positions' device: a per-step host-to-device copy would be a sync.
    """
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # [B, n, dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * magnitude).to(dtype)[:, None], (emb.sin() * magnitude).to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V2 stores rotary pairs interleaved: (x0, x1, x2, ...) -> (x0, x2, ..., x1, x3, ...)."""
    *lead, d = x.shape
    return x.view(*lead, d // 2, 2).transpose(-1, -2).reshape(*lead, d)
