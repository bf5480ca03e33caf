"""The DeepSeek-V2 decoder: embeddings, pre-norm layers (dense or MoE), final norm and LM head."""

from __future__ import annotations

import torch
from torch import nn

from vl2cli.engine.attention import LatentAttention, MultiHeadAttention, RMSNorm, rope_cos_sin, rope_inv_freq
from vl2cli.engine.cache import KVCache
from vl2cli.engine.config import LanguageConfig
from vl2cli.engine.moe import DenseMlp, MoE


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LanguageConfig, index: int):
        super().__init__()
        self.self_attn = LatentAttention(cfg, index) if cfg.use_mla else MultiHeadAttention(cfg, index)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(index) else DenseMlp(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache, start, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LanguageModel(nn.Module):
    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._rope = None

    def forward(self, embeds: torch.Tensor, cache: KVCache, valid: torch.Tensor) -> torch.Tensor:
        """Run n new positions [b, n, d] after the cache's `length` positions; returns final hidden states.

        `valid` [b, n] marks real tokens (False = left padding). Positions count real tokens only,
        so a padded row computes exactly what it would alone.
        """
        b, n, _ = embeds.shape
        start = cache.length
        end = start + n
        cache.key_valid[:, start:end] = valid
        keys_valid = cache.key_valid[:, :end]
        positions = (keys_valid.long().cumsum(-1)[:, start:] - 1).clamp(min=0)  # [b, n]
        if self._rope is None:
            self._rope = rope_inv_freq(self.cfg)
        cos, sin = rope_cos_sin(*self._rope, positions, embeds.dtype)
        query_pos = torch.arange(start, end, device=embeds.device)
        key_pos = torch.arange(end, device=embeds.device)
        causal = key_pos[None, :] <= query_pos[:, None]  # [n, S]
        # A padding query may see only itself, so no row is fully masked (no NaN); real tokens never see padding.
        mask = (causal[None] & keys_valid[:, None, :]) | (key_pos[None, None, :] == query_pos[None, :, None])
        mask = mask[:, None]  # [b, 1, n, S]
        x = embeds
        for layer in self.layers:
            x = layer(x, cos, sin, cache, start, mask)
        cache.length = end
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
