"""Preallocated KV cache. MLA layers keep the normed latent and the rotary key, never expanded K/V.

The reference (`DynamicCache` through transformers) grows its cache per step; here it is allocated once
for prompt + answer, and the cache owns the positions: `advance` claims the next positions for a step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vl2cli.engine.config import LanguageConfig


class KVCache:
    """Per layer either K and V [b, Hkv, L, D] (plain attention) or one [b, L, rank + rope] tensor (MLA).

    MLA stores latent and rotary key side by side so that decode reads them as one key matrix
    (and the latent part as the values) without copying the cache.
    """

    def __init__(self, cfg: LanguageConfig, batch: int, max_len: int, device, dtype: torch.dtype):
        self.max_len = max_len
        self.time_axis = 1 if cfg.use_mla else 2  # where positions run in each layer's tensors
        self.layers: list[tuple[torch.Tensor, ...]] = []
        for _ in range(cfg.num_hidden_layers):
            if cfg.use_mla:
                width = (cfg.kv_lora_rank or 0) + cfg.qk_rope_head_dim  # validated positive under MLA
                self.layers.append((torch.zeros(batch, max_len, width, device=device, dtype=dtype),))
            else:
                shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
                self.layers.append((torch.zeros(shape, device=device, dtype=dtype),
                                    torch.zeros(shape, device=device, dtype=dtype)))
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0  # positions filled (shared by every row: rows are left-padded)
        self.start = 0  # where the step in progress writes

    def advance(self, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Claim the next n positions for a step of `valid` [b, n] tokens (False = left padding).

        Returns the rotary positions [b, n], which count real tokens only (a padded row computes exactly
        what it would alone), and the attention mask [b, 1, n, S] over every position up to the step's end.
        """
        n = valid.shape[1]
        start, end = self.length, self.length + n
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} > {self.max_len} positions")
        self.key_valid[:, start:end] = valid
        keys_valid = self.key_valid[:, :end]
        positions = (keys_valid.long().cumsum(-1)[:, start:] - 1).clamp(min=0)  # [b, n]
        query_pos = torch.arange(start, end, device=valid.device)
        key_pos = torch.arange(end, device=valid.device)
        causal = key_pos[None, :] <= query_pos[:, None]  # [n, S]
        # A padding query may see only itself, so no row is fully masked (no NaN); real tokens never see padding.
        mask = (causal[None] & keys_valid[:, None, :]) | (key_pos[None, None, :] == query_pos[None, :, None])
        self.start, self.length = start, end
        return positions, mask[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain attention: write this step's K, V [b, Hkv, n, D]; return views over every position so far."""
        ck, cv = self.layers[layer]
        ck[:, :, self.start : self.length] = k
        cv[:, :, self.start : self.length] = v
        return ck[:, :, : self.length], cv[:, :, : self.length]

    def update_latent(self, layer: int, latent: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        """MLA: write this step's latent [b, n, r] and rotary key [b, n, rope]; return [b, S, r+rope] (latent first)."""
        (joint,) = self.layers[layer]
        rank = latent.shape[-1]
        joint[:, self.start : self.length, :rank] = latent
        joint[:, self.start : self.length, rank:] = k_pe
        return joint[:, : self.length]

    def bytes_per_token(self) -> int:
        """Cache bytes one position of one sequence takes, over all layers (measured on the buffers)."""
        return sum(t[0].numel() * t.element_size() // self.max_len for layer in self.layers for t in layer)

    @classmethod
    def merge(cls, caches: list[KVCache], room: int) -> KVCache:
        """The rows of several caches in one, each right-aligned at the longest one's length, with `room` free
        positions after it. Keys are stored rotated and positions count valid keys only, so shifting a row to the
        right (its new left padding invalid) changes nothing it computes: this is how a request joins a batch."""
        length = max(c.length for c in caches)
        merged = object.__new__(cls)
        merged.max_len, merged.time_axis, merged.length, merged.start = length + room, caches[0].time_axis, length, length

        def aligned(t: torch.Tensor, c: KVCache, axis: int) -> torch.Tensor:
            shape = list(t.shape)
            shape[axis] = merged.max_len
            out = t.new_zeros(shape)
            out.narrow(axis, length - c.length, c.length).copy_(t.narrow(axis, 0, c.length))
            return out

        merged.layers = [tuple(torch.cat([aligned(c.layers[i][j], c, c.time_axis) for c in caches])
                               for j in range(len(caches[0].layers[i]))) for i in range(len(caches[0].layers))]
        merged.key_valid = torch.cat([aligned(c.key_valid, c, 1) for c in caches])
        return merged

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (finished sequences leave the batch)."""
        self.layers = [tuple(t[rows] for t in layer) for layer in self.layers]
        self.key_valid = self.key_valid[rows]
