"""The generation engine: batched prefill (optionally chunked), KV-cached decode, sampling and stop rules.

Ours, not the reference's (which goes through transformers' `generate`): greedy decoding matches it token for
token (the parity goldens); each row keeps its own cache slot. Batching, stop rules and sampling per row live in the scheduler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vl2cli.engine.cache import KVCache

if TYPE_CHECKING:
    from vl2cli.engine.language import WithDecoder
    from vl2cli.engine.processor import Prepared


@dataclass(frozen=True)
class NoRepeatNgram:
    """DeepSeek-OCR's rule (its process/ngram_norepeat.py): a token that would repeat an n-gram already generated
    within the last `window` tokens is banned, unless whitelisted (table cells legitimately repeat <td>)."""

    size: int
    window: int
    whitelist: frozenset[int] = frozenset()

    def banned(self, ids: list[int]) -> set[int]:
        if len(ids) < self.size:
            return set()
        prefix = ids[len(ids) - self.size + 1:]
        start = max(0, len(ids) - self.window)
        found = {ids[i + self.size - 1] for i in range(start, len(ids) - self.size + 1)
                 if ids[i:i + self.size - 1] == prefix}
        return found - self.whitelist


@dataclass
class SamplingParams:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    no_repeat: NoRepeatNgram | None = None


@dataclass
class Generation:
    ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (end token), "length" (budget), or what a stop rule returned
    prompt_tokens: int = 0


# A stop rule sees one row's generated ids (and whether a grammar constrains the row) and returns a reason to
# stop it, or None.
StopRule = Callable[[list[int], bool], "str | None"]


def apply_repetition_penalty(logits: torch.Tensor, seen: list[torch.Tensor], penalty: float) -> torch.Tensor:
    if penalty == 1.0:
        return logits
    for row, ids in enumerate(seen):
        if ids.numel():
            picked = logits[row, ids]
            logits[row, ids] = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits


def choose_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits [b, V] float32 -> token ids [b]."""
    if params.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > params.top_p  # keep the smallest head reaching top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class Engine:
    def __init__(self, model: WithDecoder, eos_id: int, pad_id: int, prefill_chunk: int | None = None,
                 grammar_tokenizer: Callable[[], Any] | None = None):
        self.model = model
        self.eos_id = eos_id
        self.pad_id = pad_id if pad_id is not None else eos_id
        self.prefill_chunk = prefill_chunk
        self.grammar_tokenizer = grammar_tokenizer  # llguidance's tokenizer, built on first use

    @property
    def context(self) -> int:
        """Positions one sequence may hold (prompt and answer): each cache slot's length."""
        return self.model.language.cfg.max_position_embeddings

    def new_cache(self, slots: int, context: int | None = None) -> KVCache:
        return KVCache(self.model.language.cfg, slots, context or self.context, self.model.device, self.model.dtype)

    def _batch(self, prompts: list[Prepared]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad the prompts into one batch: ids and image mask [b, T] (each model reads its own image inputs
        from the prompts). Each row's tokens start at position 0; what follows a row's end is never attended to."""
        length = max(len(p.input_ids) for p in prompts)
        b = len(prompts)
        ids = torch.full((b, length), self.pad_id, dtype=torch.long)
        image_mask = torch.zeros(b, length, dtype=torch.bool)
        for row, p in enumerate(prompts):
            n = len(p.input_ids)
            ids[row, :n] = torch.tensor(p.input_ids)
            image_mask[row, :n] = torch.tensor(p.image_mask)
        return ids, image_mask

    @torch.inference_mode()
    def prefill(self, prompts: list[Prepared], extra_positions: int,
                all_logits: bool = False) -> tuple[torch.Tensor, KVCache]:
        """Run the prompts in a cache of their own; returns (logits [b, V] at each row's last position or [b, T, V]
        at all (right-padded), cache)."""
        cache = self.new_cache(len(prompts), max(len(p.input_ids) for p in prompts) + extra_positions)
        *_, logits = self.prefill_steps(prompts, cache, 0, all_logits)
        assert logits is not None
        return logits, cache

    def prefill_steps(self, prompts: list[Prepared], cache: KVCache, first: int, all_logits: bool = False,
                      chunk: int | None = None) -> Iterator[torch.Tensor | None]:
        """The prefill of slots [first, first + len(prompts)), a chunk at a time (`chunk` tokens, by default the
        engine's `prefill_chunk`): None after each chunk but the last, then the logits. A scheduler decodes its
        running rows between chunks."""
        lengths = [len(p.input_ids) for p in prompts]
        with torch.inference_mode():
            ids, image_mask = self._batch(prompts)
            embeds = self.model.embed_prompts(ids, image_mask, prompts)  # [b, T, d]
            b, t, _ = embeds.shape
            cache.set_lengths(first, [0] * b)
            last_at = torch.tensor(lengths).to(embeds.device) - 1  # each row's last real position
        step = chunk or self.prefill_chunk or t
        outputs: list[torch.Tensor] = []
        last: torch.Tensor | None = None
        for begin in range(0, t, step):
            with torch.inference_mode():
                hidden = self.model.language(embeds[:, begin:begin + step], cache, first)
                if all_logits:
                    outputs.append(self.model.language.logits(hidden))
                else:  # keep each row's hidden state at its last real token, in whichever chunk it falls
                    n = hidden.shape[1]
                    picked = hidden[torch.arange(b, device=hidden.device), (last_at - begin).clamp(0, n - 1)]
                    inside = ((last_at >= begin) & (last_at < begin + n))[:, None]
                    last = picked if last is None else torch.where(inside, picked, last)
            if begin + step < t:
                yield None
        cache.set_lengths(first, lengths)
        with torch.inference_mode():
            if all_logits:
                yield torch.cat(outputs, dim=1)
            else:
                assert last is not None
                yield self.model.language.logits(last)

    def decode_step(self, tokens: torch.Tensor, cache: KVCache, first: int = 0) -> torch.Tensor:
        """One token per row [b] for slots [first, first + b) -> next-token logits [b, V]; no host sync of its own
        beyond the MoE layers'."""
        embeds = self.model.language.embed_tokens(tokens[:, None])  # [b, 1, d]
        hidden = self.model.language(embeds, cache, first)
        return self.model.language.logits(hidden[:, -1])
