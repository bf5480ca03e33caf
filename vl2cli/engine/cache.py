"""Preallocated KV cache. MLA layers keep the normed latent and the rotary key, never expanded K/V."""

from __future__ import annotations

import torch

from vl2cli.engine.config import LanguageConfig


class KVCache:
    """Per layer either K and V [b, Hkv, L, D] (plain attention) or one [b, L, rank + rope] tensor (MLA).

    MLA stores latent and rotary key side by side so that decode reads them as one key matrix
    (and the latent part as the values) without copying the cache.
    """

    def __init__(self, cfg: LanguageConfig, batch: int, max_len: int, device, dtype: torch.dtype):
        self.max_len = max_len
        self.batch = batch
        self.layers: list[tuple[torch.Tensor, ...]] = []
        for _ in range(cfg.num_hidden_layers):
            if cfg.use_mla:
                width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
                self.layers.append((torch.zeros(batch, max_len, width, device=device, dtype=dtype),))
            else:
                shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
                self.layers.append((torch.zeros(shape, device=device, dtype=dtype),
                                    torch.zeros(shape, device=device, dtype=dtype)))
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0  # positions filled (shared by every row: rows are left-padded)

    def _end(self, start: int, n: int) -> int:
        if start + n > self.max_len:
            raise RuntimeError(f"KV cache overflow: {start + n} > {self.max_len} positions")
        return start + n

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain attention: write K, V [b, Hkv, n, D] at [start, start+n); return views over [0, start+n)."""
        ck, cv = self.layers[layer]
        end = self._end(start, k.shape[2])
        ck[:, :, start:end] = k
        cv[:, :, start:end] = v
        return ck[:, :, :end], cv[:, :, :end]

    def update_latent(self, layer: int, start: int, latent: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        """MLA: write latent [b, n, r] and rotary key [b, n, rope]; return [b, start+n, r+rope] (latent first)."""
        (joint,) = self.layers[layer]
        end = self._end(start, latent.shape[1])
        rank = latent.shape[-1]
        joint[:, start:end, :rank] = latent
        joint[:, start:end, rank:] = k_pe
        return joint[:, :end]

    def bytes_per_token(self) -> int:
        """Cache bytes one position of one sequence takes, over all layers (measured on the buffers)."""
        return sum(t[0].numel() * t.element_size() // self.max_len for layer in self.layers for t in layer)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (finished sequences leave the batch)."""
        self.layers = [tuple(t[rows] for t in layer) for layer in self.layers]
        self.key_valid = self.key_valid[rows]
        self.batch = int(rows.numel())
