"""The generation engine: batched prefill (optionally chunked), KV-cached decode, sampling and stop rules.

Ours, not the reference's (which goes through transformers' `generate`): greedy decoding matches it token for
token (the parity goldens); rows are left-padded. Batching, stop rules and sampling per row live in the scheduler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vl2cli.engine.cache import KVCache

if TYPE_CHECKING:
    from vl2cli.engine.model import DeepseekVL2
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
    def __init__(self, model: DeepseekVL2, eos_id: int, pad_id: int, prefill_chunk: int | None = None,
                 grammar_tokenizer: Callable[[], Any] | None = None):
        self.model = model
        self.eos_id = eos_id
        self.pad_id = pad_id if pad_id is not None else eos_id
        self.prefill_chunk = prefill_chunk
        self.grammar_tokenizer = grammar_tokenizer  # llguidance's tokenizer, built on first use

    def _batch(self, prompts: list[Prepared]):
        """Left-pad the prompts into one batch: ids, image mask and validity [b, T] (each model reads its own
        image inputs from the prompts)."""
        length = max(len(p.input_ids) for p in prompts)
        b = len(prompts)
        ids = torch.full((b, length), self.pad_id, dtype=torch.long)
        image_mask = torch.zeros(b, length, dtype=torch.bool)
        valid = torch.zeros(b, length, dtype=torch.bool)
        for row, p in enumerate(prompts):
            n = len(p.input_ids)
            ids[row, length - n:] = torch.tensor(p.input_ids)
            image_mask[row, length - n:] = torch.tensor(p.image_mask)
            valid[row, length - n:] = True
        return ids, image_mask, valid

    @torch.inference_mode()
    def prefill(self, prompts: list[Prepared], extra_positions: int, all_logits: bool = False):
        """Run the prompts; returns (logits [b, V] at the last position or [b, T, V] at all, cache)."""
        *_, finished = self.prefill_steps(prompts, extra_positions, all_logits)
        assert finished is not None
        return finished

    def prefill_steps(self, prompts: list[Prepared], extra_positions: int,
                      all_logits: bool = False) -> Iterator[tuple[torch.Tensor, KVCache] | None]:
        """The prefill a chunk at a time (`prefill_chunk` tokens): None after each chunk but the last, then
        (logits, cache). A scheduler decodes its running rows between chunks."""
        with torch.inference_mode():
            ids, image_mask, valid = self._batch(prompts)
            embeds = self.model.embed_prompts(ids, image_mask, prompts)  # [b, T, d]
            b, t, _ = embeds.shape
            cache = KVCache(self.model.cfg.language, b, t + extra_positions, self.model.device, self.model.dtype)
            valid = valid.to(self.model.device)
        step = self.prefill_chunk or t
        outputs = []
        for begin in range(0, t, step):
            with torch.inference_mode():
                hidden = self.model.language(embeds[:, begin:begin + step], cache, valid[:, begin:begin + step])
                outputs.append(self.model.language.logits(hidden if all_logits else hidden[:, -1:]))
            if begin + step < t:
                yield None
        logits = torch.cat(outputs, dim=1) if all_logits else outputs[-1][:, -1]
        yield logits, cache

    def decode_step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token per row [b] -> next-token logits [b, V]; no host sync of its own beyond the MoE layers'."""
        embeds = self.model.language.embed_tokens(tokens[:, None])  # [b, 1, d]
        valid = torch.ones(tokens.shape[0], 1, dtype=torch.bool, device=tokens.device)
        hidden = self.model.language(embeds, cache, valid)
        return self.model.language.logits(hidden[:, -1])
