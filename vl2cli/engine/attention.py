"""Rotary embeddings (plain and YaRN), plain multi-head attention and Multi-head Latent Attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vl2cli.engine.cache import KVCache
from vl2cli.engine.config import LanguageConfig, yarn_mscale


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


def rope_inv_freq(cfg: LanguageConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin magnitude (1.0 unless YaRN says otherwise)."""
    dim = cfg.qk_rope_head_dim if cfg.use_mla else cfg.head_dim
    base = cfg.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    extra = 1.0 / (base**exponents)
    rs = cfg.rope_scaling
    if not rs:
        return extra, 1.0
    factor = rs["factor"]
    original = rs.get("original_max_position_embeddings", 4096)
    beta_fast, beta_slow = rs.get("beta_fast", 32), rs.get("beta_slow", 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolate = 1.0 - ramp  # 1 where the original frequency is kept
    inter = 1.0 / (factor * base**exponents)
    inv_freq = inter * (1 - extrapolate) + extra * extrapolate
    magnitude = yarn_mscale(factor, rs.get("mscale", 1)) / yarn_mscale(factor, rs.get("mscale_all_dim", 0))
    return inv_freq, float(magnitude)


def rope_cos_sin(inv_freq: torch.Tensor, magnitude: float, positions: torch.Tensor, dtype: torch.dtype):
    """positions [B, n] -> cos, sin [B, 1, n, dim] (halves repeated, rotate-half convention)."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)  # [B, n, dim/2]
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

    def forward(self, x, cos, sin, cache: KVCache, start: int, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)  # [b, H, n, D]
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)  # [b, Hkv, n, D]
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = cache.update(self.layer, start, k, v)  # [b, Hkv, S, D]
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

    def __init__(self, cfg: LanguageConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        q_out = self.heads * cfg.q_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, self.rank + self.rope, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.rank)
        self.kv_b_proj = nn.Linear(self.rank, self.heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.heads * self.v_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.scale = cfg.softmax_scale

    def forward(self, x, cos, sin, cache: KVCache, start: int, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, n, self.heads, self.nope + self.rope).transpose(1, 2)  # [b, H, n, nope+rope]
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)  # [b, n, r], [b, n, rope]
        latent = self.kv_a_layernorm(latent)
        q_pe = apply_rope(deinterleave(q_pe), cos, sin)
        k_pe = apply_rope(deinterleave(k_pe)[:, None], cos, sin)[:, 0]  # [b, n, rope]
        keys = cache.update_latent(self.layer, start, latent, k_pe)  # [b, S, r+rope]: latent, then rotary key
        latent, k_pe = keys[..., : self.rank], keys[..., self.rank :]  # views, no copy
        s = keys.shape[1]
        if n > self.ABSORB_MAX_QUERIES:
            kv = self.kv_b_proj(latent).view(b, s, self.heads, self.nope + self.v_dim).transpose(1, 2)
            k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # [b, H, S, nope], [b, H, S, v]
            k = torch.cat([k_nope, k_pe[:, None].expand(b, self.heads, s, self.rope)], dim=-1)
            out = F.scaled_dot_product_attention(torch.cat([q_nope, q_pe], -1), k, v, attn_mask=mask, scale=self.scale)
        else:
            # kv_b_proj stays 16-bit (see quant.py): absorption needs its matrix.
            w = self.kv_b_proj.weight.view(self.heads, self.nope + self.v_dim, self.rank)
            w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]  # [H, nope, r], [H, v, r]
            q_lat = torch.einsum("bhnd,hdr->bhnr", q_nope, w_uk)  # [b, H, n, r]
            # Every head reads the same latent keys/values (multi-query form): fold heads into the query
            # rows so the cache is read once, never copied per head.
            qk = torch.cat([q_lat, q_pe], dim=-1).reshape(b, 1, self.heads * n, -1)  # [b, 1, H*n, r+rope]
            head_mask = mask.expand(b, self.heads, n, s).reshape(b, 1, self.heads * n, s)
            ctx = F.scaled_dot_product_attention(qk, keys[:, None], latent[:, None], attn_mask=head_mask,
                                                 scale=self.scale)
            ctx = ctx.view(b, self.heads, n, self.rank)  # [b, H, n, r]
            out = torch.einsum("bhnr,hvr->bhnv", ctx, w_uv)  # [b, H, n, v]
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.heads * self.v_dim))
