"""RMSNorm as DeepSeek-V2 computes it (`DeepseekV2RMSNorm` in deepseek-ai/DeepSeek-VL2
`deepseek_vl2/models/modeling_deepseek.py`, commit 93bb502): statistics in float32, scale in the input dtype;
and the float16 guard (DeepSeek-V2's activations overflow float16's 65504: vLLM and others had to patch it)."""

from __future__ import annotations

import torch
from torch import nn

FP16_MAX = 65504.0


def fp16_safe(x: torch.Tensor) -> torch.Tensor:
    """Clamp a float16 tensor into float16's range (inf becomes +-65504); any other dtype passes untouched."""
    return x.clamp(-FP16_MAX, FP16_MAX) if x.dtype == torch.float16 else x


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
