"""Preallocated KV cache. MLA layers keep the normed latent and the rotary key, never expanded K/V."""

from __future__ import annotations

import torch

from vl2cli.config import LanguageConfig


class KVCache:
    def __init__(self, cfg: LanguageConfig, batch: int, max_len: int, device, dtype: torch.dtype):
        self.max_len = max_len
        self.batch = batch
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        for _ in range(cfg.num_hidden_layers):
            if cfg.use_mla:
                a = torch.zeros(batch, max_len, cfg.kv_lora_rank, device=device, dtype=dtype)
                b = torch.zeros(batch, max_len, cfg.qk_rope_head_dim, device=device, dtype=dtype)
            else:
                shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
                a = torch.zeros(shape, device=device, dtype=dtype)
                b = torch.zeros(shape, device=device, dtype=dtype)
            self.layers.append((a, b))
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0  # positions filled (shared by every row: rows are left-padded)

    def update(self, layer: int, start: int, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's entries at [start, start+n) and return views over [0, start+n)."""
        ca, cb = self.layers[layer]
        n = a.shape[-2]
        end = start + n
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} > {self.max_len} positions")
        ca[..., start:end, :] = a
        cb[..., start:end, :] = b
        return ca[..., :end, :], cb[..., :end, :]

    def bytes_per_token(self) -> int:
        return sum(a[0, ..., 0, :].numel() * a.element_size() + b[0, ..., 0, :].numel() * b.element_size()
                   for a, b in self.layers)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (finished sequences leave the batch)."""
        self.layers = [(a[rows], b[rows]) for a, b in self.layers]
        self.key_valid = self.key_valid[rows]
        self.batch = int(rows.numel())
