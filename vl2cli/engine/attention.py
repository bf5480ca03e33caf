"""Plain multi-head attention and Multi-head Latent Attention.

Follows `DeepseekV2Attention` / `DeepseekV2FlashAttention2` of deepseek-ai/DeepSeek-VL2
`deepseek_vl2/models/modeling_deepseek.py` (commit 93bb502) for MLA, and its Llama-style branch (use_mla
false, the tiny variant) for plain attention. The maths is the reference's; the cache layout is ours.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from vl2cli.engine.norm import RMSNorm
from vl2cli.engine.rope import apply_rope, deinterleave

if TYPE_CHECKING:
    from vl2cli.engine.cache import KVCache
    from vl2cli.engine.config import LanguageConfig, MlaShape


class MultiHeadAttention(nn.Module):
    """Llama-style attention (use_mla false): rotary over the whole head, optional grouped KV heads."""

    def __init__(self, cfg: LanguageConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.scale = cfg.softmax_scale

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
                mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)  # [b, H, n, D]
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)  # [b, Hkv, n, D]
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = cache.update(self.layer, k, v)  # [b, Hkv, S, D]
        rep = self.heads // self.kv_heads
        if rep > 1:  # grouped KV heads: fold each group's query heads into rows instead of copying the cache
            s = k.shape[2]
            q = q.reshape(b, self.kv_heads, rep * n, self.head_dim)
            mask = mask.expand(b, 1, n, s).repeat(1, rep, 1, 1).reshape(b, 1, rep * n, s)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)  # [b, Hkv, rep*n, D]
        return self.o_proj(out.reshape(b, self.heads, n, self.head_dim).transpose(1, 2).reshape(b, n, -1))


class LatentAttention(nn.Module):
    """Multi-head Latent Attention. The cache holds the normed KV latent and the shared rotary key.

    Prefill expands the latent through kv_b_proj (as the reference does); short steps (decode)
    absorb kv_b_proj into the query and output instead, so their cost does not grow with
    heads x head_dim per cached position.
    """

    ABSORB_MAX_QUERIES = 8

    def __init__(self, cfg: LanguageConfig, shape: MlaShape, layer: int):
        super().__init__()
        self.layer = layer
        self.heads = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim, self.rank = shape.nope, shape.rope, shape.v, shape.kv_lora_rank
        self.q_lora = shape.q_lora_rank is not None
        q_out = self.heads * (self.nope + self.rope)
        if shape.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, shape.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(shape.q_lora_rank)
            self.q_b_proj = nn.Linear(shape.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, self.rank + self.rope, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.rank)
        self.kv_b_proj = nn.Linear(self.rank, self.heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.heads * self.v_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.scale = cfg.softmax_scale

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
                mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q = q.view(b, n, self.heads, self.nope + self.rope).transpose(1, 2)  # [b, H, n, nope+rope]
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)  # [b, n, r], [b, n, rope]
        latent = self.kv_a_layernorm(latent)
        q_pe = apply_rope(deinterleave(q_pe), cos, sin)
        k_pe = apply_rope(deinterleave(k_pe)[:, None], cos, sin)[:, 0]  # [b, n, rope]
        keys = cache.update_latent(self.layer, latent, k_pe)  # [b, S, r+rope]: latent, then rotary key
        if n > self.ABSORB_MAX_QUERIES:
            out = self._expanded(q_nope, q_pe, keys, mask)
        else:
            out = self._absorbed(q_nope, q_pe, keys, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.heads * self.v_dim))

    def _expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, keys: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
        """The reference's path: expand every cached latent to per-head keys and values. -> [b, H, n, v]"""
        b, s, _ = keys.shape
        latent, k_pe = keys[..., : self.rank], keys[..., self.rank :]  # views, no copy
        kv = self.kv_b_proj(latent).view(b, s, self.heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # [b, H, S, nope], [b, H, S, v]
        k = torch.cat([k_nope, k_pe[:, None].expand(b, self.heads, s, self.rope)], dim=-1)
        return F.scaled_dot_product_attention(torch.cat([q_nope, q_pe], -1), k, v, attn_mask=mask, scale=self.scale)

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, keys: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
        """Decode: fold kv_b_proj into the query and the output; attend over the latent directly. -> [b, H, n, v]"""
        b, s, _ = keys.shape
        n = q_nope.shape[2]
        latent = keys[..., : self.rank]
        # kv_b_proj stays 16-bit (see quant.py): absorption needs its matrix.
        w = self.kv_b_proj.weight.view(self.heads, self.nope + self.v_dim, self.rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]  # [H, nope, r], [H, v, r]
        q_lat = torch.einsum("bhnd,hdr->bhnr", q_nope, w_uk)  # [b, H, n, r]
        # Every head reads the same latent keys/values (multi-query form): fold heads into the query
        # rows so the cache is read once, never copied per head.
        qk = torch.cat([q_lat, q_pe], dim=-1).reshape(b, 1, self.heads * n, -1)  # [b, 1, H*n, r+rope]
        head_mask = mask.expand(b, self.heads, n, s).reshape(b, 1, self.heads * n, s)
        ctx = F.scaled_dot_product_attention(qk, keys[:, None], latent[:, None], attn_mask=head_mask, scale=self.scale)
        ctx = ctx.view(b, self.heads, n, self.rank)  # [b, H, n, r]
        return torch.einsum("bhnr,hvr->bhnv", ctx, w_uv)  # [b, H, n, v]
