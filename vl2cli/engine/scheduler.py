"""Continuous batching: requests wait in a bounded queue, are prefilled (a chunk per step, so a long prompt does not
stall the rows already decoding) and join the running decode batch at step boundaries, and leave it the moment they
finish or are cancelled, freeing their cache rows.

Each request keeps its own sampling parameters (and random generator), grammar, stop rule and token budget, so its
tokens do not depend on which other requests share its steps: under greedy decoding they are the tokens it gets alone.

Three layers, each usable alone: `Scheduler` steps; `Runner` adds the failure ladder (out of memory halves the batch,
then chunks the prefill, then fails the one request; any other error fails only the request that raises it);
`EngineLoop` owns a Runner in one thread for a server, where many callers submit and wait.
"""

from __future__ import annotations

import functools
import gc
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from traceback import format_exc
from typing import TYPE_CHECKING, Any

import torch

from vl2cli.engine.cache import KVCache
from vl2cli.engine.generation import Generation, SamplingParams, apply_repetition_penalty, choose_tokens
from vl2cli.engine.grammar import RowMasks

if TYPE_CHECKING:
    from vl2cli.engine.generation import Engine, StopRule
    from vl2cli.engine.grammar import Grammar
    from vl2cli.engine.processor import Prepared

log = logging.getLogger("vl2cli")
OOM_PREFILL_CHUNK = 256  # tokens per prefill step once a batch of one no longer fits
FAILURE_MESSAGE_CHARS = 200  # an exception's text kept in a Failure's message: one line; its traceback keeps the rest
OOM_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE")


def is_oom(exc: BaseException) -> bool:
    """CUDA out-of-memory, including cuBLAS/cuDNN failing to allocate their workspaces."""
    return isinstance(exc, torch.OutOfMemoryError) or any(m in str(exc) for m in OOM_MESSAGES)


class QueueFull(RuntimeError):
    """The waiting queue is at its bound (a server answers 429)."""


class Closed(RuntimeError):
    """The engine loop is draining or stopped and takes no new requests (a server answers 503)."""


@dataclass(frozen=True)
class Failure:
    """Why a request failed: its kind, its message and where it was raised (the formatted traceback, for -v), never
    the exception itself (whose traceback frames would keep the failed step's KV cache and activations alive
    through the retry)."""

    oom: bool
    message: str
    traceback: str = ""  # empty where nothing was raised (a request refused before it ran)


@dataclass(eq=False)
class Request:
    prompt: Prepared
    params: SamplingParams
    budget: int
    grammar: Grammar | None = None
    stop_rule: StopRule | None = None
    on_token: Callable[[int], None] | None = None
    tag: Any = None  # the caller's own handle (a page key, a client)
    prefill_chunk: int | None = None  # tokens per prefill step (None: the engine's default)
    on_logits: Callable[[torch.Tensor], None] | None = None  # each step's raw logits [V] (a trace records them)
    id: int = 0
    result: Generation = field(default_factory=Generation)
    done: bool = False
    cancelled: bool = False
    failure: Failure | None = None
    admitted_at: float = 0.0
    ended_at: float = 0.0
    generator: torch.Generator | None = None
    masks: RowMasks | None = None
    seen: torch.Tensor | None = None  # the ids the repetition penalty looks at

    def __post_init__(self) -> None:
        self.result.prompt_tokens = len(self.prompt.input_ids)

    @property
    def seconds(self) -> float:
        return max(0.0, self.ended_at - self.admitted_at)

    def reset(self) -> None:
        """Back to the queue after a failed step: everything generated so far is dropped."""
        self.result = Generation(prompt_tokens=len(self.prompt.input_ids))
        self.done, self.failure, self.generator, self.masks, self.seen = False, None, None, None, None


class Scheduler:
    """Steps a running batch over a fixed cache of `max_batch` slots (allocated at the first admission): the running
    rows hold slots [0, len(running)), the joining rows the slots right after them."""

    def __init__(self, engine: Engine, max_batch: int = 8, max_queue: int = 256, context: int | None = None):
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.slots = max_batch  # the cache's rows; max_batch may drop below it for a while (the failure ladder)
        self.context = context or engine.context
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.joining: list[Request] = []  # being prefilled, a chunk per step
        self._prefill: Iterator[torch.Tensor | None] | None = None
        self._join_first = 0  # the joining rows' first slot
        self.cache: KVCache | None = None
        self.tokens: torch.Tensor | None = None  # the token each running row feeds next
        self.ids = itertools.count(1)
        self.peak_used = 0  # the most cache positions live at once

    def add(self, request: Request, first: bool = False) -> None:
        """Queue a request (`first`: at the head, bypassing the bound: one that a failed step put back)."""
        if len(self.waiting) >= self.max_queue and not first:
            raise QueueFull(f"{len(self.waiting)} requests are waiting (the bound is {self.max_queue})")
        request.id = request.id or next(self.ids)
        if first:
            self.waiting.appendleft(request)
        else:
            self.waiting.append(request)

    def cancel(self, request: Request) -> None:
        """Leave at the next step boundary (a client that disconnected); its cache slot is freed then."""
        request.cancelled = True

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running and not self.joining

    @property
    def in_flight(self) -> list[Request]:
        return self.running + self.joining

    @property
    def capacity(self) -> int:
        """Cache positions allocated (all slots), 0 before the first admission."""
        return 0 if self.cache is None else self.cache.capacity

    @property
    def used(self) -> int:
        """Cache positions holding live tokens now."""
        return 0 if self.cache is None else self.cache.used

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """Admit waiting requests (a prefill chunk), decode one token for every running row; the requests that ended.
        An exception leaves the scheduler mid-step: call `abandon` before stepping again."""
        ended = self._admit()
        self.peak_used = max(self.peak_used, self.used)
        if self.running:
            assert self.cache is not None and self.tokens is not None
            logits = self.engine.decode_step(self.tokens, self.cache)
            self.peak_used = max(self.peak_used, self.used)  # before the rows that end free their slots
            ended += self._advance(self.running, logits)
        return ended

    def abandon(self) -> list[Request]:
        """After a failed step: empty the cache's slots, drop the prefill, and hand back the requests in flight."""
        in_flight = self.in_flight
        self.running, self.joining, self._prefill, self.tokens = [], [], None, None
        if self.cache is not None:
            self.cache.clear()
        return in_flight

    def reserve(self) -> None:
        """Allocate the cache now rather than at the first admission."""
        if self.cache is None:
            self.cache = self.engine.new_cache(self.slots, self.context)

    def release_cache(self, slots: int) -> None:
        """Drop the cache (memory is short): the next admission allocates one of `slots` rows."""
        self.cache, self.slots = None, slots

    def _fits(self, request: Request) -> bool:
        return len(request.prompt.input_ids) + request.budget <= self.context

    def _admit(self) -> list[Request]:
        ended: list[Request] = []
        if self._prefill is None:
            for request in [r for r in self.waiting if r.cancelled or not self._fits(r)]:
                self.waiting.remove(request)
                request.done, request.ended_at = True, time.monotonic()
                if request.cancelled:
                    request.result.finish_reason = "cancelled"
                else:  # the caller bounds the budget by the context: this is a caller's bug, failed alone
                    request.result.finish_reason = "error"
                    request.failure = Failure(False, f"the prompt ({len(request.prompt.input_ids)} tokens) and its "
                                                     f"budget ({request.budget}) exceed the {self.context}-token "
                                                     "context")
                ended.append(request)
            while self.waiting and len(self.running) + len(self.joining) < min(self.max_batch, self.slots):
                request = self.waiting.popleft()
                request.admitted_at = time.monotonic()
                self.joining.append(request)
            if not self.joining:
                return ended
            self.reserve()
            assert self.cache is not None
            self._join_first = len(self.running)
            chunks = [r.prefill_chunk for r in self.joining if r.prefill_chunk]
            self._prefill = self.engine.prefill_steps([r.prompt for r in self.joining], self.cache, self._join_first,
                                                      chunk=min(chunks) if chunks else None)
        logits = next(self._prefill)
        if logits is None:
            return ended
        joining, self._prefill = self.joining, None
        for r in joining:
            if r.params.seed is not None:
                r.generator = torch.Generator(device=logits.device).manual_seed(r.params.seed)
            if r.grammar is not None:
                tokenizer = self.engine.grammar_tokenizer
                assert tokenizer is not None, "a grammar needs the engine's grammar tokenizer"
                r.masks = RowMasks(tokenizer(), [r.grammar], logits.shape[-1])
            if r.params.repetition_penalty != 1.0:
                r.seen = torch.tensor([i for i, m in zip(r.prompt.input_ids, r.prompt.image_mask) if not m],
                                      dtype=torch.long, device=logits.device)
        ended += self._advance(joining, logits, joining=True)
        self.joining = []  # only now: a step that fails before here hands them back through `abandon`
        return ended

    def _choose(self, rows: list[Request], logits: torch.Tensor) -> list[int]:
        """Each row's next token under its own rules; greedy rows share one argmax and one host sync."""
        for i, request in enumerate(rows):
            row = logits[i:i + 1]
            if request.on_logits is not None:
                request.on_logits(row[0])
            if request.seen is not None:
                apply_repetition_penalty(row, [request.seen], request.params.repetition_penalty)
            if request.masks is not None:
                request.masks.apply(row, [0])
            if request.params.no_repeat is not None:
                banned = request.params.no_repeat.banned(request.result.ids)
                if banned:
                    row[0, list(banned)] = float("-inf")
        if all(r.params.temperature <= 0 for r in rows):
            # Host sync, the one a step needs: stop rules and streaming read the sampled tokens on the host.
            return logits.argmax(dim=-1).tolist()
        return [int(choose_tokens(logits[i:i + 1], r.params, r.generator)[0]) for i, r in enumerate(rows)]

    def _advance(self, rows: list[Request], logits: torch.Tensor, joining: bool = False) -> list[Request]:
        """Record each row's next token, end the rows that are done, and keep the slots and tokens in step: the
        rows that go on close ranks in the lowest slots (a row that ended gives its slot to one after it)."""
        keep, ended, tokens = [], [], []
        for i, (request, token) in enumerate(zip(rows, self._choose(rows, logits))):
            if self._take(request, token):
                keep.append(i)
                tokens.append(token)
            else:
                ended.append(request)
        assert self.cache is not None
        first = self._join_first if joining else 0
        target = len(self.running) if joining else 0  # where the kept rows go
        order = _close_ranks(keep) if first == target else keep
        for rank, i in enumerate(order):
            if first + i != target + rank:
                self.cache.move(first + i, target + rank)
        self.cache.free(target + len(keep), first + len(rows) - target - len(keep))
        kept = [rows[i] for i in order]
        token_of = dict(zip(keep, tokens))
        tokens = [token_of[i] for i in order]
        if not kept:
            if not joining:
                self.running, self.tokens = [], None
            return ended
        new_tokens = torch.tensor(tokens, device=logits.device)
        if joining and self.running:
            assert self.tokens is not None
            self.running, self.tokens = self.running + kept, torch.cat([self.tokens, new_tokens])
        else:
            self.running, self.tokens = kept, new_tokens
        return ended

    def _take(self, request: Request, token: int) -> bool:
        """Record a token; False when the request ends with it (end token, stop rule, budget, cancel)."""
        result = request.result
        result.ids.append(token)
        if request.seen is not None:
            request.seen = torch.cat([request.seen, request.seen.new_tensor([token])])
        if request.on_token:
            request.on_token(token)
        constrained = request.masks is not None and request.grammar is not None and request.grammar.bounds_length
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
        result.finish_reason, request.done, request.ended_at = reason, True, time.monotonic()
        return False


def _close_ranks(keep: list[int]) -> list[int]:
    """The kept rows in their new order: each row that ended below len(keep) is replaced by a kept row from
    above it (one move each), the rest stay where they are."""
    top = len(keep)
    movers = iter(i for i in keep if i >= top)
    kept = set(keep)
    return [i if i in kept else next(movers) for i in range(top)]


def generate(engine: Engine, prompts: list[Prepared], params: SamplingParams,
             on_token: Callable[[int, int], None] | None = None,
             stop_rule: StopRule | None = None, budgets: list[int] | None = None,
             on_finish: Callable[[int], None] | None = None,
             grammars: list[Grammar | None] | None = None,
             on_logits: Callable[[int, torch.Tensor], None] | None = None) -> list[Generation]:
    """Generate for a batch of prompts, all prefilled together; each row stops on its own and leaves the batch.

    `budgets` caps each row's answer (default: params.max_new_tokens for every row); `on_finish(row)`
    is called as each row ends, `on_token(row, token)` for each token, `on_logits(row, logits)` with each step's
    raw logits; `grammars` constrains rows (None for a free row): a constrained row may end only where its grammar
    is complete. The cache is sized for these prompts and budgets alone.
    """
    budgets = budgets or [params.max_new_tokens] * len(prompts)
    grammars = grammars or [None] * len(prompts)
    requests = [Request(p, params, budget, grammar, stop_rule, tag=row,
                        on_token=None if on_token is None else functools.partial(on_token, row),
                        on_logits=None if on_logits is None else functools.partial(on_logits, row))
                for row, (p, budget, grammar) in enumerate(zip(prompts, budgets, grammars))]
    context = max((len(p.input_ids) + b for p, b in zip(prompts, budgets)), default=1)
    scheduler = Scheduler(engine, max_batch=max(1, len(prompts)), max_queue=len(prompts), context=context)
    for request in requests:
        if request.budget > 0:
            scheduler.add(request)
    while not scheduler.idle:
        for request in scheduler.step():
            if on_finish:
                on_finish(request.tag)
    return [r.result for r in requests]


class Runner:
    """A Scheduler with the failure ladder: a failed step puts its in-flight requests back at the head of the queue
    with half the batch; at a batch of one, an error other than out-of-memory fails that request alone, and
    out-of-memory first chunks the prefill, then fails it. The failed step's memory is released (outside the
    handler) before anything is retried."""

    def __init__(self, engine: Engine, max_batch: int, max_queue: int = 1 << 30):
        self.scheduler = Scheduler(engine, max_batch, max_queue)
        self.engine, self.max_batch = engine, max_batch
        self.retrying: set[int] = set()  # requests put back after an error that was not out-of-memory

    @property
    def idle(self) -> bool:
        return self.scheduler.idle

    def add(self, request: Request) -> None:
        self.scheduler.add(request)

    def step(self) -> list[Request]:
        failure = None
        try:
            ended = self.scheduler.step()
        except Exception as exc:  # KeyboardInterrupt is not caught: it ends the run
            failure = Failure(is_oom(exc), f"{type(exc).__name__}: {str(exc)[:FAILURE_MESSAGE_CHARS]}", format_exc())
        if failure is not None:
            return self._after(failure)
        if self.retrying:
            self.retrying -= {r.id for r in ended}
            if not self.retrying:  # one page's bug is behind us: back to the full batch
                self.scheduler.max_batch = self.max_batch
        return ended

    def _after(self, failure: Failure) -> list[Request]:
        in_flight = self.scheduler.abandon()
        if failure.oom:  # memory is short for the rest of the run too: the next cache has fewer slots
            self.max_batch = max(1, len(in_flight) // 2) if len(in_flight) > 1 else self.max_batch
            self.scheduler.release_cache(min(self.scheduler.slots, self.max_batch))
        # The handler has been left and the exception dropped: collect its cycles before retrying.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.debug("a step failed with %d request(s) in flight: %s", len(in_flight), failure.message)
        if not in_flight:
            return []
        if len(in_flight) > 1 or (failure.oom and _chunk_prefill(in_flight[0])):
            self.scheduler.max_batch = max(1, len(in_flight) // 2)
            if not failure.oom:
                self.retrying |= {r.id for r in in_flight}
            for request in reversed(in_flight):
                request.reset()
                self.scheduler.add(request, first=True)
            return []
        for request in in_flight:
            request.done, request.failure, request.ended_at = True, failure, time.monotonic()
            request.result.finish_reason = "error"
            self.retrying.discard(request.id)
        if not self.retrying:
            self.scheduler.max_batch = self.max_batch
        return in_flight

    def close(self) -> None:
        """Nothing to restore: what the ladder changes (batch, prefill chunk) belongs to this runner and its
        requests."""


def _chunk_prefill(request: Request) -> bool:
    """Out of memory at a batch of one: chunk this request's prefill (once); False when it already was."""
    if request.prefill_chunk is not None and request.prefill_chunk <= OOM_PREFILL_CHUNK:
        return False
    request.prefill_chunk = OOM_PREFILL_CHUNK
    return True


class LocalBatch:
    """Requests run on the caller's thread: `wait` steps until some of them end."""

    def __init__(self, engine: Engine, max_batch: int):
        self.runner = Runner(engine, max_batch)

    def add(self, request: Request) -> None:
        self.runner.add(request)

    @property
    def room(self) -> int:
        """How many more requests would start at once (waiting requests count against it)."""
        s = self.runner.scheduler
        return s.max_batch - len(s.in_flight) - len(s.waiting)

    @property
    def idle(self) -> bool:
        return self.runner.idle

    def wait(self) -> list[Request]:
        while not self.runner.idle:
            ended = self.runner.step()
            if ended:
                return ended
        return []

    @property
    def peak_used(self) -> int:
        """The most cache positions live at once."""
        return self.runner.scheduler.peak_used

    def close(self) -> None:
        for request in self.runner.scheduler.in_flight + list(self.runner.scheduler.waiting):
            request.cancelled = True
        self.runner.close()


@dataclass
class LoopStats:
    """Counters since the loop started (what /metrics shows, with the queue depth and batch size read live)."""

    requests: int = 0
    failed: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    step_seconds: float = 0.0  # time in steps that decoded: a running row gets one token per step
    steps: int = 0


class EngineLoop:
    """One thread owns the model: callers submit requests from any thread and are told as each ends.

    The thread cannot die silently: a failing step goes through the runner's ladder, and anything else that goes
    wrong fails the requests it holds (each caller is told) and the loop goes on. `health` says whether the thread
    is alive and stepping: work in hand but no step for `stall_seconds` is a stall."""

    def __init__(self, engine: Engine, max_batch: int, max_queue: int, stall_seconds: float = 60.0):
        self.runner = Runner(engine, max_batch)  # unbounded inside: the bound is checked at submit only
        self.max_queue, self.stall_seconds = max_queue, stall_seconds
        self.stats = LoopStats()
        self._inbox: deque[tuple[Request, Callable[[Request], None]]] = deque()
        self._watchers: dict[int, Callable[[Request], None]] = {}
        self._wake = threading.Condition()
        self._closed = self._abort = False
        self.last_step = time.monotonic()  # when the thread last finished a step (or went idle)
        self.stopped: str | None = None  # why the thread ended, when it did
        self._allocate()
        self._thread = threading.Thread(target=self._run, daemon=True, name="vl2-engine")
        self._thread.start()

    def submit(self, request: Request, on_end: Callable[[Request], None]) -> None:
        """Queue a request; `on_end(request)` runs on the engine thread when it ends (done, failed or cancelled)."""
        with self._wake:
            if self._closed:
                raise Closed("the server is shutting down")
            if not self._thread.is_alive():
                raise Closed(f"the engine thread has stopped ({self.stopped or 'unknown reason'})")
            waiting = len(self._inbox) + len(self.runner.scheduler.waiting)
            if waiting >= self.max_queue:
                raise QueueFull(f"{waiting} requests are waiting (the bound is {self.max_queue})")
            self._inbox.append((request, on_end))
            self._wake.notify()

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        with self._wake:
            self._wake.notify()

    def batch(self) -> LoopBatch:
        return LoopBatch(self)

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a place in the batch (read without the lock: a gauge)."""
        return len(self._inbox) + len(self.runner.scheduler.waiting)

    @property
    def running(self) -> int:
        return len(self.runner.scheduler.in_flight)

    @property
    def cache_capacity(self) -> int:
        """KV cache positions allocated, all slots."""
        return self.runner.scheduler.capacity

    @property
    def cache_used(self) -> int:
        """KV cache positions holding live tokens now."""
        return self.runner.scheduler.used

    def health(self) -> str | None:
        """None when the engine is up; else why not (the thread is gone, or it has work but makes no step)."""
        if not self._thread.is_alive():
            return "the engine thread has stopped" + (f": {self.stopped}" if self.stopped else "")
        busy = self.queue_depth or self.running
        quiet = time.monotonic() - self.last_step
        if busy and quiet > self.stall_seconds:
            return f"the engine has made no step for {quiet:.0f} s with {busy} request(s) in hand"
        return None

    def drain(self, seconds: float) -> int:
        """Stop taking requests; the queued ones end at once ('cancelled'), those running may finish within
        `seconds`, then they are cancelled too. Returns how many were queued. The engine thread does the cancelling:
        only it touches the scheduler's queue and batch."""
        with self._wake:
            queued = self.queue_depth
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=seconds)
        with self._wake:
            self._abort = True
            self._wake.notify()
        self._thread.join(timeout=max(1.0, seconds))
        return queued

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # not an Exception (those are handled per step): tell every caller, then end
            self.stopped = f"{type(exc).__name__}: {str(exc)[:FAILURE_MESSAGE_CHARS]}"
            log.error("the engine thread stops: %s", self.stopped)
            self._tell(self._fail_everything(Failure(False, f"the engine thread stopped ({self.stopped})",
                                                     format_exc())))

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._inbox and self.runner.idle and not self._closed:
                    self.last_step = time.monotonic()
                    self._wake.wait()
                if self._closed and not self._inbox and self.runner.idle:
                    return
                while self._inbox:
                    request, on_end = self._inbox.popleft()
                    self.runner.add(request)
                    self._watchers[request.id] = on_end
                    self.stats.requests += 1
                    self.stats.prompt_tokens += len(request.prompt.input_ids)
                scheduler = self.runner.scheduler
                for request in (scheduler.waiting if self._closed else ()):
                    request.cancelled = True  # draining: the queue gets no place in the batch
                for request in (scheduler.in_flight if self._abort else ()):
                    request.cancelled = True  # the drain's time is up
            started, decoding = time.perf_counter(), bool(self.runner.scheduler.running)
            try:
                ended = self.runner.step()
            except Exception as exc:  # the ladder itself failed: fail what it holds, never the thread
                log.exception("an engine step failed outside the failure ladder")
                message = f"{type(exc).__name__}: {str(exc)[:FAILURE_MESSAGE_CHARS]}"
                ended = self._fail_everything(Failure(is_oom(exc), message, format_exc()))
            self.last_step = time.monotonic()
            if decoding:
                self.stats.step_seconds += time.perf_counter() - started
                self.stats.steps += 1
            self._tell(ended)

    def _allocate(self) -> None:
        """The cache up front: its size is known from the start (a gauge) and a card too small for it says so at once."""
        try:
            with torch.inference_mode():
                self.runner.scheduler.reserve()
        except Exception as exc:
            log.warning("the KV cache could not be allocated up front (%s): it will be at the first request", exc)
            self.runner.scheduler.release_cache(self.runner.scheduler.slots)

    def _fail_everything(self, failure: Failure) -> list[Request]:
        """Every request the runner holds ends with `failure`; the runner starts over empty."""
        scheduler = self.runner.scheduler
        failed = scheduler.abandon() + list(scheduler.waiting)
        scheduler.waiting.clear()
        with self._wake:
            for request, on_end in self._inbox:
                request.id = request.id or next(scheduler.ids)
                self._watchers[request.id] = on_end
                failed.append(request)
            self._inbox.clear()
        for request in failed:
            request.done, request.failure, request.ended_at = True, failure, time.monotonic()
            request.result.finish_reason = "error"
        return failed

    def _tell(self, ended: list[Request]) -> None:
        for request in ended:
            self.stats.generated_tokens += len(request.result.ids)
            self.stats.failed += request.failure is not None
            self.stats.cancelled += request.result.finish_reason == "cancelled"
            watcher = self._watchers.pop(request.id, None)
            if watcher is None:
                continue
            try:
                watcher(request)
            except Exception:  # a caller's bug must not stop the thread every other caller waits on
                log.exception("an engine loop watcher failed")


class LoopBatch:
    """One caller's requests on a shared EngineLoop: `wait` blocks until some of them end."""

    def __init__(self, loop: EngineLoop):
        self.loop = loop
        self.pending: set[int] = set()
        self.ended: deque[Request] = deque()
        self.requests: list[Request] = []
        self.changed = threading.Condition()

    def add(self, request: Request) -> None:
        """Queue one of this caller's requests. A full queue refuses the caller's first (QueueFull, as any new
        client request is refused: a server answers 429); a later one waits for the queue to move (a document's
        pages are not refused half-way through). A closed loop refuses any (Closed)."""
        while True:
            try:
                self.loop.submit(request, self._on_end)
                break
            except QueueFull:
                if not self.requests:
                    raise
                with self.changed:
                    self.changed.wait(0.05)
        self.pending.add(id(request))
        self.requests.append(request)

    @property
    def room(self) -> int:
        """How many more of this caller's requests may wait: at most a full batch of them at a time, so one long
        document never fills the shared queue."""
        return self.loop.runner.scheduler.max_batch - len(self.pending)

    @property
    def idle(self) -> bool:
        return not self.pending and not self.ended

    @property
    def peak_used(self) -> int:
        """The most cache positions live at once in the shared loop (every caller's rows)."""
        return self.loop.runner.scheduler.peak_used

    def _on_end(self, request: Request) -> None:
        with self.changed:
            self.ended.append(request)
            self.changed.notify()

    def wait(self, timeout: float = 0.5) -> list[Request]:
        """The requests that ended since the last call; [] after `timeout` seconds without one (so the caller can
        look at its own cancel flag)."""
        with self.changed:
            if not self.ended and self.pending:
                self.changed.wait(timeout)
            ended = list(self.ended)
            self.ended.clear()
        for request in ended:
            self.pending.discard(id(request))
        return ended

    def close(self) -> None:
        for request in self.requests:
            if not request.done:
                self.loop.cancel(request)
