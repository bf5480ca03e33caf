"""DeepSeek-OCR 2's "DeepEncoder V2": a Qwen2-0.5B-shaped decoder used as an encoder. Each view's SAM tokens are
followed by as many learnable queries; image tokens attend to each other, each query to every image token and to the
queries up to itself ("causal flow"), and only the queries' outputs go on.

Follows deepseek-ai/DeepSeek-OCR-2 `DeepSeek-OCR2-master/DeepSeek-OCR2-vllm/deepencoderv2/qwen2_d2e.py` (commit
2f3699e) on transformers 4.46.3's Qwen2 (`Qwen2DecoderLayer`, `Qwen2SdpaAttention`, `Qwen2RMSNorm`,
`Qwen2RotaryEmbedding`); the behaviour is written in shared/parity-ocr2/README.md sec. 5. The reference builds its
mask by overriding a transformers internal (`_update_causal_mask`) that newer versions no longer call; here the mask
is written out (`flow_mask`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vl2cli.engine.norm import RMSNorm
from vl2cli.engine.rope import apply_rope, rope_cos_sin, rope_inv_freq

# Qwen2-0.5B's shape, fixed by the official code (the checkpoint's config.json names it only: "qwen2-0-5b").
ENCODER_WIDTH, ENCODER_DEPTH, ENCODER_HEADS, ENCODER_KV_HEADS = 896, 24, 14, 2
ENCODER_MLP, ENCODER_EPS, ENCODER_ROPE_THETA = 4864, 1e-6, 1_000_000.0
QUERY_COUNTS = (144, 256)  # a 768-pixel tile's 12x12 SAM grid, the 1024-pixel global view's 16x16


def flow_mask(n: int, device: torch.device | None = None) -> torch.Tensor:
    """[2n, 2n] bool, True where attention is allowed: the n image tokens see each other (and not the queries);
    query i sees every image token and queries 0..i."""
    mask = torch.zeros(2 * n, 2 * n, dtype=torch.bool, device=device)
    mask[:, :n] = True
    mask[n:, n:] = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return mask


class EncoderAttention(nn.Module):
    """Grouped-query attention: 14 query heads of 64 share 2 KV heads (query head h reads KV head h // 7)."""

    def __init__(self) -> None:
        super().__init__()
        self.head_dim = ENCODER_WIDTH // ENCODER_HEADS
        self.q_proj = nn.Linear(ENCODER_WIDTH, ENCODER_HEADS * self.head_dim)
        self.k_proj = nn.Linear(ENCODER_WIDTH, ENCODER_KV_HEADS * self.head_dim)
        self.v_proj = nn.Linear(ENCODER_WIDTH, ENCODER_KV_HEADS * self.head_dim)
        self.o_proj = nn.Linear(ENCODER_HEADS * self.head_dim, ENCODER_WIDTH, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, ENCODER_HEADS, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, ENCODER_KV_HEADS, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, ENCODER_KV_HEADS, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        group = ENCODER_HEADS // ENCODER_KV_HEADS
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # the reference's repeat_kv
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale 1/sqrt(64)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class EncoderMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(ENCODER_WIDTH, ENCODER_MLP, bias=False)
        self.up_proj = nn.Linear(ENCODER_WIDTH, ENCODER_MLP, bias=False)
        self.down_proj = nn.Linear(ENCODER_MLP, ENCODER_WIDTH, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class EncoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(ENCODER_WIDTH, ENCODER_EPS)  # Qwen2RMSNorm: the same float32 statistics
        self.self_attn = EncoderAttention()
        self.post_attention_layernorm = RMSNorm(ENCODER_WIDTH, ENCODER_EPS)
        self.mlp = EncoderMlp()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class QueryEncoder(nn.Module):
    """[v, n, 896] SAM tokens of v views (n = 144 or 256) -> ([v, n, 896] query outputs after the final norm,
    [v, 2n, 896] the first layer's output at every position, which the parity trace records)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer() for _ in range(ENCODER_DEPTH))
        self.norm = RMSNorm(ENCODER_WIDTH, ENCODER_EPS)
        # The checkpoint keeps one query table per view size (`query_768`, `query_1024`), chosen by the token count.
        self.query_768 = nn.Embedding(QUERY_COUNTS[0], ENCODER_WIDTH)
        self.query_1024 = nn.Embedding(QUERY_COUNTS[1], ENCODER_WIDTH)
        self._inv_freq: torch.Tensor | None = None

    def queries(self, n: int) -> torch.Tensor:
        if n == QUERY_COUNTS[0]:
            return self.query_768.weight
        if n == QUERY_COUNTS[1]:
            return self.query_1024.weight
        raise ValueError(f"DeepSeek-OCR 2's encoder has queries for {QUERY_COUNTS} tokens per view, not {n}")

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v, n, _ = tokens.shape
        x = torch.cat([tokens, self.queries(n).to(tokens.dtype).expand(v, n, -1)], dim=1)  # [v, 2n, 896]
        if self._inv_freq is None or self._inv_freq.device != x.device:
            self._inv_freq = rope_inv_freq(ENCODER_WIDTH // ENCODER_HEADS, ENCODER_ROPE_THETA, None)[0].to(x.device)
        positions = torch.arange(2 * n, device=x.device)[None]  # image tokens 0..n-1, queries n..2n-1
        cos, sin = rope_cos_sin(self._inv_freq, 1.0, positions, x.dtype)
        mask = flow_mask(n, x.device)
        first = x
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask)
            if i == 0:
                first = x
        return self.norm(x)[:, n:], first
