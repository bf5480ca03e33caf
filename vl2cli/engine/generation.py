"""The generation engine: batched prefill (optionally chunked), KV-cached decode, sampling and stop rules.

Ours, not the reference's (which goes through transformers' `generate`): greedy decoding matches it token for
token (the parity goldens); rows are left-padded and leave the batch as they finish.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vl2cli.engine.cache import KVCache
from vl2cli.engine.grammar import Grammar, RowMasks

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
        ids, image_mask, valid = self._batch(prompts)
        embeds = self.model.embed_prompts(ids, image_mask, prompts)  # [b, T, d]
        b, t, _ = embeds.shape
        cache = KVCache(self.model.cfg.language, b, t + extra_positions, self.model.device, self.model.dtype)
        valid = valid.to(self.model.device)
        step = self.prefill_chunk or t
        outputs = []
        for begin in range(0, t, step):
            hidden = self.model.language(embeds[:, begin:begin + step], cache, valid[:, begin:begin + step])
            outputs.append(self.model.language.logits(hidden if all_logits else hidden[:, -1:]))
        logits = torch.cat(outputs, dim=1) if all_logits else outputs[-1][:, -1]
        return logits, cache

    def _finish_reason(self, ids: list[int], stop_rule: StopRule | None, budget: int, constrained: bool) -> str | None:
        if ids[-1] == self.eos_id:
            return "stop"
        if stop_rule and (reason := stop_rule(ids, constrained)):
            return reason
        return "length" if len(ids) >= budget else None

    @torch.inference_mode()
    def generate(self, prompts: list[Prepared], params: SamplingParams,
                 on_token: Callable[[int, int], None] | None = None,
                 stop_rule: StopRule | None = None, budgets: list[int] | None = None,
                 on_finish: Callable[[int], None] | None = None,
                 grammars: list[Grammar | None] | None = None) -> list[Generation]:
        """Generate for a batch of prompts; each row stops on its own and leaves the batch.

        `budgets` caps each row's answer (default: params.max_new_tokens for every row); `on_finish(row)`
        is called as each row ends, `on_token(row, token)` for each token; `grammars` constrains rows
        (None for a free row): a constrained row may end only where its grammar is complete.
        """
        budgets = budgets or [params.max_new_tokens] * len(prompts)
        results = [Generation(prompt_tokens=len(p.input_ids)) for p in prompts]
        longest = max(budgets, default=0)
        if longest <= 0:
            return results
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.model.device).manual_seed(params.seed)
        masks = self._masks(grammars)
        logits, cache = self.prefill(prompts, longest)
        active = list(range(len(prompts)))  # result index of each cache row
        seen = [torch.tensor([i for i, m in zip(p.input_ids, p.image_mask) if not m], dtype=torch.long,
                             device=self.model.device) for p in prompts]
        for _ in range(longest):
            logits = self._shape(logits, params, active, results, seen, masks)
            tokens = choose_tokens(logits, params, generator)
            keep = []
            # Host sync, the one a step needs: stop rules and streaming read the sampled tokens on the host.
            for row, token in enumerate(tokens.tolist()):
                index = active[row]
                if params.repetition_penalty != 1.0:
                    seen[index] = torch.cat([seen[index], tokens[row:row + 1]])
                if self._take(results[index], index, token, budgets[index], masks, stop_rule, on_token):
                    keep.append(row)
                elif on_finish:
                    on_finish(index)
            if not keep:
                break
            if len(keep) < len(active):
                rows = torch.tensor(keep, device=tokens.device)
                cache.select(rows)
                tokens = tokens[rows]
                active = [active[r] for r in keep]
            logits = self.decode_step(tokens, cache)
        return results

    @staticmethod
    def _shape(logits: torch.Tensor, params: SamplingParams, active: list[int], results: list[Generation],
               seen: list[torch.Tensor], masks: RowMasks | None) -> torch.Tensor:
        """Everything that edits the logits before a token is chosen: penalty, grammars, the no-repeat rule."""
        logits = apply_repetition_penalty(logits, [seen[i] for i in active], params.repetition_penalty)
        if masks is not None:
            masks.apply(logits, active)
        if params.no_repeat is not None:
            for row, index in enumerate(active):
                banned = params.no_repeat.banned(results[index].ids)
                if banned:
                    logits[row, list(banned)] = float("-inf")
        return logits

    def _take(self, result: Generation, index: int, token: int, budget: int, masks: RowMasks | None,
              stop_rule: StopRule | None, on_token: Callable[[int, int], None] | None) -> bool:
        """Append a row's token; False (with the finish reason set) when the row ends here."""
        result.ids.append(token)
        if on_token:
            on_token(index, token)
        constrained = masks is not None and masks.constrained(index)
        if masks is not None and constrained and token != self.eos_id:
            masks.consume(index, token)
        reason = self._finish_reason(result.ids, stop_rule, budget, constrained)
        if reason is not None:
            result.finish_reason = reason
        return reason is None

    def _masks(self, grammars: list[Grammar | None] | None) -> RowMasks | None:
        if not grammars or all(g is None for g in grammars):
            return None
        if self.grammar_tokenizer is None:
            raise RuntimeError("a grammar was given but the engine has no grammar tokenizer")
        return RowMasks(self.grammar_tokenizer(), grammars, self.model.cfg.language.vocab_size)

    def decode_step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token per row [b] -> next-token logits [b, V]; no host sync of its own beyond the MoE layers'."""
        embeds = self.model.language.embed_tokens(tokens[:, None])  # [b, 1, d]
        valid = torch.ones(tokens.shape[0], 1, dtype=torch.bool, device=tokens.device)
        hidden = self.model.language(embeds, cache, valid)
        return self.model.language.logits(hidden[:, -1])
