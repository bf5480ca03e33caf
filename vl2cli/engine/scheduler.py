"""Continuous batching: requests wait in a bounded queue, are prefilled and join the running decode batch at step
boundaries, and leave it the moment they finish or are cancelled, freeing their cache rows.

Each request keeps its own sampling parameters (and random generator), grammar, stop rule and token budget, so its
tokens do not depend on which other requests share its steps: under greedy decoding they are the tokens it gets alone.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vl2cli.engine.cache import KVCache
from vl2cli.engine.generation import Generation, SamplingParams, choose_tokens
from vl2cli.engine.grammar import RowMasks

if TYPE_CHECKING:
    from vl2cli.engine.generation import Engine, StopRule
    from vl2cli.engine.grammar import Grammar
    from vl2cli.engine.processor import Prepared


class QueueFull(RuntimeError):
    """The waiting queue is at its bound (a server answers 429)."""


@dataclass(eq=False)
class Request:
    prompt: Prepared
    params: SamplingParams
    budget: int
    grammar: Grammar | None = None
    stop_rule: StopRule | None = None
    on_token: Callable[[int], None] | None = None
    id: int = 0
    result: Generation = field(default_factory=Generation)
    done: bool = False
    cancelled: bool = False
    generator: torch.Generator | None = None
    masks: RowMasks | None = None


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int = 8, max_queue: int = 256):
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.cache: KVCache | None = None
        self.tokens: torch.Tensor | None = None  # the token each running row feeds next
        self.ids = itertools.count(1)

    def submit(self, prompt: Prepared, params: SamplingParams, budget: int | None = None,
               grammar: Grammar | None = None, stop_rule: StopRule | None = None,
               on_token: Callable[[int], None] | None = None) -> Request:
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are waiting (the bound is {self.max_queue})")
        request = Request(prompt, params, budget or params.max_new_tokens, grammar, stop_rule, on_token, next(self.ids))
        request.result.prompt_tokens = len(prompt.input_ids)
        self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Leave at the next step boundary (a client that disconnected); its cache row is freed then."""
        request.cancelled = True

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """Admit waiting requests (prefill, join), decode one token for every running row; the requests that ended."""
        ended = self._admit()
        if self.running:
            assert self.cache is not None and self.tokens is not None
            logits = self.engine.decode_step(self.tokens, self.cache)
            ended += self._advance(self.running, logits)
        return ended

    def run(self) -> None:
        while not self.idle:
            self.step()

    def _admit(self) -> list[Request]:
        self.waiting = deque(r for r in self.waiting if not self._drop_cancelled(r))
        joining: list[Request] = []
        while self.waiting and len(self.running) + len(joining) < self.max_batch:
            joining.append(self.waiting.popleft())
        if not joining:
            return []
        room = max(r.budget for r in joining)
        logits, cache = self.engine.prefill([r.prompt for r in joining], room)
        for r in joining:
            if r.params.seed is not None:
                r.generator = torch.Generator(device=logits.device).manual_seed(r.params.seed)
            if r.grammar is not None:
                tokenizer = self.engine.grammar_tokenizer
                assert tokenizer is not None, "a grammar needs the engine's grammar tokenizer"
                r.masks = RowMasks(tokenizer(), [r.grammar], logits.shape[-1])
        ended = self._advance(joining, logits, cache)
        return ended

    def _drop_cancelled(self, request: Request) -> bool:
        if request.cancelled:
            request.done, request.result.finish_reason = True, "cancelled"
        return request.cancelled

    def _sample(self, request: Request, logits: torch.Tensor) -> int:
        row = logits[None]
        if request.masks is not None:
            request.masks.apply(row, [0])
        if request.params.no_repeat is not None:
            banned = request.params.no_repeat.banned(request.result.ids)
            if banned:
                row[0, list(banned)] = float("-inf")
        return int(choose_tokens(row, request.params, request.generator)[0])

    def _advance(self, rows: list[Request], logits: torch.Tensor, new_cache: KVCache | None = None) -> list[Request]:
        """Sample each row's next token, end the rows that are done, and keep the batch's cache and tokens in step."""
        keep, ended, tokens = [], [], []
        for i, request in enumerate(rows):
            token = self._sample(request, logits[i])
            if self._take(request, token):
                keep.append(i)
                tokens.append(token)
            else:
                ended.append(request)
        kept = [rows[i] for i in keep]
        device = logits.device
        if new_cache is not None:  # joining rows: their own cache, merged into the running batch's
            if keep:
                new_cache.select(torch.tensor(keep, device=device))
                self._join(kept, new_cache, torch.tensor(tokens, device=device))
            return ended
        self.running = kept
        if not keep:  # every running row ended: the cache goes with them
            self.cache, self.tokens = None, None
            return ended
        if len(keep) < len(rows) and self.cache is not None:
            self.cache.select(torch.tensor(keep, device=device))
        self.tokens = torch.tensor(tokens, device=device)
        return ended

    def _join(self, rows: list[Request], cache: KVCache, tokens: torch.Tensor) -> None:
        everyone = self.running + rows
        room = max(r.budget - len(r.result.ids) for r in everyone) + 1
        caches = [cache] if self.cache is None else [self.cache, cache]
        self.cache = KVCache.merge(caches, room)
        self.tokens = tokens if self.tokens is None else torch.cat([self.tokens, tokens])
        self.running = everyone

    def _take(self, request: Request, token: int) -> bool:
        """Record a token; False when the request ends with it (end token, stop rule, budget, cancel)."""
        result = request.result
        result.ids.append(token)
        if request.on_token:
            request.on_token(token)
        constrained = request.masks is not None
        if request.masks is not None and token != self.engine.eos_id:
            request.masks.consume(0, token)
        reason: Any = None
        if request.cancelled:
            reason = "cancelled"
        elif token == self.engine.eos_id:
            reason = "stop"
        elif request.stop_rule is not None:
            reason = request.stop_rule(result.ids, constrained)
        if reason is None and len(result.ids) >= request.budget:
            reason = "length"
        if reason is None:
            return True
        result.finish_reason, request.done = reason, True
        return False
