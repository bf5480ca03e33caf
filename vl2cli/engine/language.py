"""The DeepSeek-V2 decoder: embeddings, pre-norm layers (dense or MoE), final norm and LM head.

Follows `DeepseekV2DecoderLayer` / `DeepseekV2Model` / `DeepseekV2ForCausalLM` of deepseek-ai/DeepSeek-VL2
`deepseek_vl2/models/modeling_deepseek.py` (commit 93bb502).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import nn

from vl2cli.engine.attention import LatentAttention, MultiHeadAttention
from vl2cli.engine.config import mla_shape, moe_shape
from vl2cli.engine.moe import DenseMlp, MoE
from vl2cli.engine.norm import RMSNorm, fp16_safe
from vl2cli.engine.rope import rope_cos_sin, rope_inv_freq

if TYPE_CHECKING:
    from vl2cli.engine.cache import KVCache
    from vl2cli.engine.config import LanguageConfig
    from vl2cli.engine.processor import Prepared


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LanguageConfig, index: int):
        super().__init__()
        self.self_attn: nn.Module = (LatentAttention(cfg, mla_shape(cfg), index) if cfg.use_mla
                                     else MultiHeadAttention(cfg, index))
        self.mlp: nn.Module = (MoE(cfg.hidden_size, cfg.moe_intermediate_size, moe_shape(cfg))
                               if cfg.is_moe_layer(index) else DenseMlp(cfg.hidden_size, cfg.intermediate_size))
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
                mask: torch.Tensor) -> torch.Tensor:
        """`x` is the residual stream: the model dtype, or float32 when the model runs in float16 (see
        LanguageModel.forward); the sublayers always compute in the model dtype (cos.dtype)."""
        x = x + fp16_safe(self.self_attn(self.input_layernorm(x).to(cos.dtype), cos, sin, cache, mask))
        return x + fp16_safe(self.mlp(self.post_attention_layernorm(x).to(cos.dtype)))


class LanguageModel(nn.Module):
    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._rope: tuple[torch.Tensor, float] | None = None

    def rope_table(self, device: torch.device) -> tuple[torch.Tensor, float]:
        """Inverse frequencies, moved to the device once (a per-step copy from the host would be a sync)."""
        if self._rope is None or self._rope[0].device != device:
            dim = self.cfg.qk_rope_head_dim if self.cfg.use_mla else self.cfg.head_dim
            inv_freq, magnitude = rope_inv_freq(dim, self.cfg.rope_theta, self.cfg.rope_scaling)
            self._rope = (inv_freq.to(device), magnitude)
        return self._rope

    def forward(self, embeds: torch.Tensor, cache: KVCache, first: int = 0) -> torch.Tensor:
        """Run n new positions [b, n, d] for cache slots [first, first + b), after what each slot holds; returns
        final hidden states."""
        positions, mask = cache.advance(first, embeds.shape[0], embeds.shape[1])
        cos, sin = rope_cos_sin(*self.rope_table(embeds.device), positions, embeds.dtype)
        # float16 (cards without native bf16, e.g. a T4): DeepSeek-V2's residual stream outgrows 65504, so it is
        # carried in float32 there; every other dtype runs exactly as the reference.
        x = embeds.float() if embeds.dtype == torch.float16 else embeds
        for layer in self.layers:
            x = layer(x, cos, sin, cache, mask)
        return self.norm(x).to(embeds.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


class WithDecoder(nn.Module, ABC):
    """What every family's model is around the decoder: its device and dtype, its prompts' embeddings (the family's
    image embeddings placed at each row's image positions), and the decoder itself (`language`), which the engine
    runs."""

    language: LanguageModel

    @abstractmethod
    def embed_prompts(self, input_ids: torch.Tensor, image_mask: torch.Tensor, prompts: list[Prepared]) -> torch.Tensor:
        """input_ids, image_mask [b, T] -> [b, T, hidden]: token embeddings, each prompt's images at its image
        positions."""

    @property
    def device(self) -> torch.device:
        return self.language.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language.embed_tokens.weight.dtype

    def place_images(self, embeds: torch.Tensor, row: int, image_mask: torch.Tensor, images: torch.Tensor) -> None:
        mask = image_mask.to(self.device)
        if int(mask.sum()) != images.shape[0]:
            raise ValueError(f"row {row}: {int(mask.sum())} image positions but {images.shape[0]} image embeddings")
        embeds[row, mask] = images
