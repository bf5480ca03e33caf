"""A fixed KV cache of slots. MLA layers keep the normed latent and the rotary key, never expanded K/V.

The reference (`DynamicCache` through transformers) grows its cache per step; here it is allocated once:
`slots x context` positions per layer. A request holds one slot while it runs; each slot keeps its own length,
each row writes at its own positions and attends only to its own tokens, so a step's cost and the cache's size
depend on the rows live now, never on how many requests came before.

A step runs on a contiguous range of slots (`first`, `first + b`): the scheduler keeps its running rows in the
lowest slots (a row that leaves is replaced by the last one, one row's copy) and prefills joining rows right after
them, so every read is a view of the buffers, never a gather.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vl2cli.engine.config import LanguageConfig


class KVCache:
    """Per layer either K and V [slots, Hkv, context, D] (plain attention) or one [slots, context, rank + rope]
    tensor (MLA).

    MLA stores latent and rotary key side by side so that decode reads them as one key matrix
    (and the latent part as the values) without copying the cache.
    """

    def __init__(self, cfg: LanguageConfig, slots: int, context: int, device: torch.device | str,
                 dtype: torch.dtype):
        self.slots, self.context = slots, context
        self.time_axis = 1 if cfg.use_mla else 2  # where positions run in each layer's tensors
        self.layers: list[tuple[torch.Tensor, ...]] = []
        # zeros, not empty: a masked position still multiplies its value by 0, and garbage could be NaN
        for _ in range(cfg.num_hidden_layers):
            if cfg.use_mla:
                width = (cfg.kv_lora_rank or 0) + cfg.qk_rope_head_dim  # validated positive under MLA
                self.layers.append((torch.zeros(slots, context, width, device=device, dtype=dtype),))
            else:
                shape = (slots, cfg.num_key_value_heads, context, cfg.head_dim)
                self.layers.append((torch.zeros(shape, device=device, dtype=dtype),
                                    torch.zeros(shape, device=device, dtype=dtype)))
        self.lengths = [0] * slots  # positions each slot holds, on the host (no sync to read them)
        self._lengths = torch.zeros(slots, dtype=torch.long, device=device)  # the same on the device
        # on the device once: no per-step copy from the host
        self._arange = torch.arange(context, device=device)
        self._slot_index = torch.arange(slots, device=device)[:, None]
        self._rows = slice(0, 0)
        self._positions = self._arange[:0]
        self._start: int | None = 0  # where every row of the step writes, when they agree (a prefill)
        self._end = 0

    @property
    def capacity(self) -> int:
        """Positions allocated, all slots."""
        return self.slots * self.context

    @property
    def used(self) -> int:
        """Positions holding live tokens now."""
        return sum(self.lengths)

    def advance(self, first: int, rows: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Claim the next n positions of slots [first, first + rows) for a step.

        Returns the rotary positions [rows, n] (each row's own: its length so far onwards) and the attention mask
        [rows, 1, n, S], S the longest row's end: a query sees its own row's keys up to its own position.
        """
        held = self.lengths[first:first + rows]
        if len(held) != rows:
            raise RuntimeError(f"KV cache has {self.slots} slots: no slots {first}..{first + rows - 1}")
        end = max(held) + n
        if end > self.context:
            raise RuntimeError(f"KV cache overflow: {end} > {self.context} positions")
        self._rows = slice(first, first + rows)
        self._start = held[0] if min(held) == max(held) else None
        self._end = end
        positions = self._lengths[self._rows, None] + self._arange[None, :n]  # [rows, n]
        mask = self._arange[None, None, :end] <= positions[:, :, None]  # [rows, n, S]
        self._positions = positions
        self._lengths[self._rows] += n
        for slot in range(first, first + rows):
            self.lengths[slot] += n
        return positions, mask[:, None]

    def _write(self, t: torch.Tensor, new: torch.Tensor) -> None:
        """Write the step's entries `new` (time on `self.time_axis`, batch first) at each row's positions."""
        if self._start is not None:  # every row starts at the same position: one slice
            t[self._rows].narrow(self.time_axis, self._start, new.shape[self.time_axis]).copy_(new)
            return
        rows = self._slot_index[self._rows]
        if self.time_axis == 1:  # [slots, L, W] <- [b, n, W]
            t[rows, self._positions] = new
        else:  # [slots, H, L, D] <- [b, H, n, D]: the indexed dims come first
            t[rows, :, self._positions] = new.transpose(1, 2)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain attention: write this step's K, V [b, Hkv, n, D]; return views [b, Hkv, S, D] of the rows."""
        ck, cv = self.layers[layer]
        self._write(ck, k)
        self._write(cv, v)
        return ck[self._rows, :, : self._end], cv[self._rows, :, : self._end]

    def update_latent(self, layer: int, latent: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        """MLA: write this step's latent [b, n, r] and rotary key [b, n, rope]; return [b, S, r+rope] (latent first)."""
        (joint,) = self.layers[layer]
        self._write(joint, torch.cat([latent, k_pe], dim=-1))
        return joint[self._rows, : self._end]

    @torch.inference_mode()
    def set_lengths(self, first: int, lengths: list[int]) -> None:
        """Say how many positions slots [first, ...) hold: after a right-padded prefill each row keeps only its own
        tokens (what lies past its length is never read and is overwritten by its next step)."""
        self.lengths[first:first + len(lengths)] = lengths
        self._lengths[first:first + len(lengths)] = torch.tensor(lengths, dtype=torch.long).to(self._lengths.device)

    @torch.inference_mode()
    def move(self, source: int, target: int) -> None:
        """Copy one slot's live positions into another (the running rows stay in the lowest slots)."""
        n = self.lengths[source]
        for layer in self.layers:
            for t in layer:
                t[target].narrow(self.time_axis - 1, 0, n).copy_(t[source].narrow(self.time_axis - 1, 0, n))
        self.lengths[target] = n
        self._lengths[target] = self._lengths[source]

    @torch.inference_mode()
    def free(self, first: int, count: int) -> None:
        """Give slots back: they hold nothing from now on."""
        self.lengths[first:first + count] = [0] * count
        self._lengths[first:first + count] = 0

    def clear(self) -> None:
        self.free(0, self.slots)
