"""The Reader: pages in, results out.

Generation is wrapped once, for every task and for `ask`: pages join and leave a continuous batch (the engine's
scheduler, whose runner halves the batch on out-of-memory, then chunks the prefill, then fails only that page,
and fails only the page that raises any other error), the answer budget is what the context leaves, runaway
loops are re-read at rising temperatures, and dense pages are read in bands and merged.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from traceback import format_exception
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from tokenizers.decoders import DecodeStream

from vl2cli.bands import AUTO_BANDS, merge_band_texts, planned_bands, split_bands
from vl2cli.engine.generation import Engine, Generation, NoRepeatNgram, SamplingParams
from vl2cli.engine.grammar import Grammar, grammar_tokenizer
from vl2cli.engine.memory import batch_for_free
from vl2cli.engine.processor import EOS_TEXT, Message, Prepared, UserText
from vl2cli.engine.scheduler import EngineLoop, Failure, LocalBatch, LoopBatch, Request
from vl2cli.errors import OutOfMemory, PageFailed, UsageError
from vl2cli.extract import describe_json
from vl2cli.options import DEFAULT_BATCH_SIZE, LOOP_RETRY_TEMPERATURES, SAMPLING_TOP_P, ReadOptions
from vl2cli.orient import fields_as_given
from vl2cli.parsers import find_loop, trim_loop
from vl2cli.results import AskResult, PageResult, Split, failed_page
from vl2cli.tasks import image_marks

if TYPE_CHECKING:
    from PIL import Image

    from vl2cli.engine.loading import LoadedModel
    from vl2cli.engine.processor import PageViews
    from vl2cli.pages import Page
    from vl2cli.tasks import Task

NGRAM_SIZE, NGRAM_WINDOW = 30, 90  # DeepSeek-OCR's own scripts (vLLM example, run_dpsk_ocr_image.py)
# A loop's re-read penalises repeated tokens at least this much: enough, with the higher temperature, to leave the
# loop; mild enough that a page's own repeats (table rows, figures, headings) are still written.
LOOP_RETRY_REPETITION_PENALTY = 1.05
# An unexpected exception's text in a page's one-line error (the record's "error", a line on stderr); the whole
# traceback goes to the debug log, which -v shows.
ERROR_DETAIL_CHARS = 160
log = logging.getLogger("vl2cli")
K = TypeVar("K")


@dataclass
class _Answer:
    text: str
    finish_reason: str
    flags: tuple[str, ...]
    prompt_tokens: int
    generated_tokens: int
    retry_temperature: float | None = None
    grammar: Grammar | None = None
    seconds: float = 0.0


@dataclass(eq=False)
class _Part:
    """One request's worth of a page (the page, or one of its bands), through its loop retries."""

    grammar: Grammar | None
    retries: int = 0
    params: SamplingParams | None = None  # the first read's sampling, which each retry's is derived from
    began: float | None = None  # when its first request was admitted (time.monotonic)
    extended: bool = False  # re-read with the room the context leaves after the user's budget cut it
    seconds: float = 0.0
    answer: _Answer | PageFailed | None = None


@dataclass(eq=False)
class _PagePlan:
    """A page in flight: its parts, each its own request in the running batch; done when all have answered."""

    key: Any
    page: Page
    parts: list[_Part] = field(default_factory=list)
    split: Split | None = None  # read in bands
    started: float = 0.0


def replace_request(request: Request, params: SamplingParams, budget: int | None = None) -> Request:
    """The same prompt, grammar and rules as a fresh request under other sampling (a loop retry), or with another
    budget (a structured answer re-read with the room the context leaves)."""
    return Request(request.prompt, params, request.budget if budget is None else budget, request.grammar,
                   request.stop_rule, prefill_chunk=request.prefill_chunk)


class AnswerText:
    """An answer's text as its tokens arrive, each token at a cost independent of the answer's length (tokenizers'
    DecodeStream: never a decode from the start). The pieces join to what Reader.decode gives before its strip,
    less a trailing half character (which waits for its next token)."""

    def __init__(self, reader: Reader):
        tok = reader.loaded.processor.tokenizer
        self._tokenizer, self._skip = tok.tok, {tok.eos_id, tok.pad_id}
        self._start()

    def _start(self) -> None:
        self._stream = DecodeStream(skip_special_tokens=False)
        self.count = 0  # tokens taken
        self.pieces: list[str] = []
        self.length = 0  # characters so far

    def push(self, token: int) -> str:
        """Take one token; the characters it completes ('' while a multi-byte character is unfinished)."""
        self.count += 1
        if token in self._skip:
            return ""
        piece = self._stream.step(self._tokenizer, token) or ""
        if piece:
            self.pieces.append(piece)
            self.length += len(piece)
        return piece

    def feed(self, ids: list[int]) -> str:
        """Take the ids not taken yet; a list that started over (a request retried after a failed step) starts the
        text over."""
        if len(ids) < self.count:
            self._start()
        return "".join(self.push(t) for t in ids[self.count:])

    def tail(self, n: int) -> str:
        """The last n characters (reads only the pieces they lie in)."""
        out: list[str] = []
        size = 0
        for piece in reversed(self.pieces):
            if size >= n:
                break
            out.append(piece)
            size += len(piece)
        return "".join(reversed(out))[-n:] if n else ""

    @property
    def text(self) -> str:
        return "".join(self.pieces)


class TokenStream:
    """Feeds an answer to `write` while it is generated: each new piece once its bytes decode to whole characters,
    without the answer's leading whitespace, and trailing whitespace held until text follows it (Reader.decode
    strips both)."""

    def __init__(self, reader: Reader, write: Callable[[str], None]):
        self.text, self.write = AnswerText(reader), write
        self.started = False
        self.held = ""
        self.written: list[str] = []

    def __call__(self, _row: int, token: int) -> None:
        piece = self.held + self.text.push(token)
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        body = piece.rstrip()
        self.held = piece[len(body):]
        if body:
            self.written.append(body)
            self.write(body)

    @property
    def shown(self) -> str:
        """Everything written so far."""
        return "".join(self.written)


class Reader:
    def __init__(self, loaded: LoadedModel, prefill_chunk: int | None = None):
        self.loaded = loaded
        tok = loaded.processor.tokenizer
        self.engine = Engine(loaded.model, tok.eos_id, tok.pad_id, prefill_chunk, self._grammar_tokenizer)
        self._llg_tokenizer: Any = None
        self.deadline: float | None = None  # time.monotonic() after which generation stops ("interrupted")
        self.loop: EngineLoop | None = None  # a server's engine thread: all generation goes through it
        self.kv_cache_peak_used = 0  # the most KV cache positions live at once in this reader's batches

    def auto_batch_size(self) -> int:
        """Pages per batch for this device: on a GPU, what its free memory holds now that the weights are in."""
        if self.loaded.device.type != "cuda":
            return DEFAULT_BATCH_SIZE
        free, _ = torch.cuda.mem_get_info(self.loaded.device)
        return batch_for_free(self.loaded.cfg, free)

    @property
    def family(self) -> str:
        """The prompt family the tasks' templates are written for: "ocr" for DeepSeek-OCR and DeepSeek-OCR 2, "vl2"
        for DeepSeek-VL2."""
        return self.loaded.family.prompts

    def _sampling(self, opts: ReadOptions) -> SamplingParams:
        no_repeat = None
        if self.loaded.family.ngram_rule and opts.no_repeat:
            tok = self.loaded.processor.tokenizer
            cells = frozenset(i for i in (tok.tok.token_to_id("<td>"), tok.tok.token_to_id("</td>")) if i is not None)
            no_repeat = NoRepeatNgram(NGRAM_SIZE, NGRAM_WINDOW, cells)
        return SamplingParams(opts.max_new_tokens, opts.temperature, opts.sampling_top_p, 1.0, opts.sampling_seed,
                              no_repeat)

    @property
    def context(self) -> int:
        return self.loaded.cfg.language.max_position_embeddings

    def check_mode(self, mode: str) -> None:
        """UsageError where the model's family cannot read in this --ocr-mode (DeepSeek-OCR 2 has one setting, its
        official one: any other mode is refused, never quietly read another way)."""
        self.loaded.family.check_mode(mode)

    def stop_within(self, seconds: float) -> None:
        """Let generation in flight run at most `seconds` more (a signal's bounded drain)."""
        deadline = time.monotonic() + seconds
        self.deadline = deadline if self.deadline is None else min(self.deadline, deadline)

    def decode(self, ids: list[int]) -> str:
        tok = self.loaded.processor.tokenizer
        ids = [i for i in ids if i not in (tok.eos_id, tok.pad_id)]
        return tok.decode(ids).replace(EOS_TEXT, "").strip()

    # ------------------------------------------------------------------ generation, wrapped once

    def _grammar_tokenizer(self) -> Any:
        if self._llg_tokenizer is None:
            tok = self.loaded.processor.tokenizer
            self._llg_tokenizer = grammar_tokenizer(tok.tok.to_str(), self.loaded.cfg.language.vocab_size, tok.eos_id)
        return self._llg_tokenizer

    def stop_rule(self, ids: list[int], constrained: bool) -> str | None:
        """The drain deadline, and runaway loops outside a grammar."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "interrupted"
        # A grammar bounds its answer's length: repetition inside it (identical table rows) is not a runaway.
        return "loop" if not constrained and find_loop(ids) else None

    def _batch(self, max_batch: int) -> LocalBatch | LoopBatch:
        """Where requests run: the server's engine loop (shared with every client), or this thread."""
        return self.loop.batch() if self.loop is not None else LocalBatch(self.engine, max_batch)

    def _run(self, requests: list[Request]) -> None:
        """Run requests, all in one batch, until each has ended (done or failed)."""
        batch = self._batch(max(1, len(requests)))
        try:
            for request in requests:
                batch.add(request)
            while not batch.idle:
                batch.wait()
        finally:
            batch.close()

    def _generate(self, prompts: list[Prepared], params: SamplingParams, budgets: list[int],
                  on_token: Callable[[int, int], None] | None = None) -> list[Generation | PageFailed]:
        """One outcome per prompt: a Generation, or the PageFailed that this prompt alone ran into."""
        requests = [Request(p, params, budget, None, self.stop_rule,
                            on_token=None if on_token is None else functools.partial(on_token, row))
                    for row, (p, budget) in enumerate(zip(prompts, budgets))]
        self._run(requests)
        return [r.result if r.failure is None else _page_failure(r.failure, "the question") for r in requests]

    def _budgets(self, prompts: list[Prepared], wanted: int) -> list[int]:
        """Each prompt's answer budget: what the user asked for, or what the context leaves (0: no room)."""
        return [max(0, min(wanted, self.context - len(p.input_ids))) for p in prompts]

    def _request(self, task: Task, prompt: Prepared, opts: ReadOptions, params: SamplingParams) -> Request | PageFailed:
        """A prompt's request, with its budget (what the context leaves) and grammar; or why it cannot run."""
        budget = self._budgets([prompt], opts.max_new_tokens)[0]
        if budget <= 0:
            return PageFailed(f"the prompt needs {len(prompt.input_ids)} tokens, more than the model's "
                              f"{self.context}-token context")
        try:
            grammar = task.grammar(opts, budget, self._room(prompt))  # a structured answer's: sized to the room
        except UsageError as exc:  # a schema that cannot fit this page's budget fails this page
            return PageFailed(str(exc))
        return Request(prompt, params, budget, grammar, self.stop_rule)

    def _room(self, prompt: Prepared) -> int:
        """What the context leaves for the answer after the prompt."""
        return max(0, self.context - len(prompt.input_ids))

    def _part_ended(self, request: Request, opts: ReadOptions) -> Request | _Answer | PageFailed:
        """A finished request of one part of a page: its answer (flags set), the failure it ended with, or the
        next loop retry to run (a looping answer is re-read at rising temperatures, as one more request in the
        running batch; the first clean answer wins, else the last)."""
        part: _Part = request.tag[1]
        # a part's seconds: the wall time of its own requests, from the first's admission to the last's end (the
        # loop retries included)
        if part.began is None:
            part.began = request.admitted_at or request.ended_at
        part.seconds = max(0.0, request.ended_at - part.began)
        if request.failure is not None:
            page = request.tag[0].page
            return _page_failure(request.failure, f"{page.source} page {page.number}")
        gen = request.result
        if gen.finish_reason == "cancelled":  # the server is draining: like a signal, the page is read again
            gen.finish_reason = "interrupted"
        if gen.finish_reason == "loop" and opts.loop_retries and part.retries < len(LOOP_RETRY_TEMPERATURES):
            if part.params is None:
                part.params = request.params
            params, i = part.params, part.retries
            retry = SamplingParams(params.max_new_tokens, LOOP_RETRY_TEMPERATURES[i], SAMPLING_TOP_P,
                                   max(params.repetition_penalty, LOOP_RETRY_REPETITION_PENALTY),
                                   (params.seed or 0) + i + 1, params.no_repeat)
            part.retries += 1
            return replace_request(request, retry)
        temperature = LOOP_RETRY_TEMPERATURES[part.retries - 1] if part.retries else None
        answer = self._finish(gen, request.budget, opts, temperature)
        answer.grammar, answer.seconds = part.grammar, part.seconds
        return answer

    def _finish(self, gen: Generation, budget: int, opts: ReadOptions, temperature: float | None) -> _Answer:
        ids = gen.ids
        flags: list[str] = []
        reason = gen.finish_reason
        if reason == "loop":
            flags.append("repetition_loop")
            ids = trim_loop(ids, find_loop(ids) or 1)
        if reason == "length":
            flags.append("token_budget_reached")
            if budget < opts.max_new_tokens:
                reason = "context"  # the context cut the answer, not the user's own cap
        return _Answer(self.decode(ids), reason, tuple(flags), gen.prompt_tokens, len(gen.ids), temperature)

    # ------------------------------------------------------------------ pages

    def _prompt(self, task: Task, template: str, image: Image.Image | PageViews, opts: ReadOptions,
                hint: str | None) -> Prepared:
        schema = describe_json(opts.schema_json) if opts.schema_json else None
        return self.loaded.processor.prepare_prompt(task.prompt(1, template, opts.text, hint, schema), [image],
                                                    mode=opts.ocr_mode)

    def read_stream(self, task: Task, pages: Iterable[tuple[K, Page]], opts: ReadOptions,
                    on_generated: Callable[[K], None] = lambda _key: None,
                    cancelled: Callable[[], bool] = lambda: False) -> Iterator[tuple[K, PageResult]]:
        """(key, result) for each (key, page), as each page ends: pages join the running batch (at most
        `opts.batch_size` rows) as others leave it, so a short answer never waits for a long one. Pages are
        drawn from `pages` only when there is room, so a renderer feeding it stays just ahead of the model.
        Once `cancelled()` is true the pages in flight are dropped and nothing more is yielded."""
        template = task.template(opts.prompt_file, self.family, opts.plain)
        params = self._sampling(opts)
        source, more = iter(pages), True
        batch = self._batch(opts.batch_size)
        try:
            while True:
                while more and batch.room > 0:
                    entry = next(source, None)
                    if entry is None:
                        more = False
                        break
                    key, page = entry
                    plan = _PagePlan(key, page)
                    outcome = self._page_request(task, template, page, opts, params)
                    if isinstance(outcome, Request):
                        self._start(batch, plan, [outcome])
                    elif isinstance(outcome, PageResult):
                        yield key, outcome
                    else:
                        unreadable = self._start_bands(batch, task, template, plan, opts, params, *outcome)
                        if unreadable is not None:
                            on_generated(key)
                            yield key, unreadable
                if cancelled():
                    return
                if batch.idle and not more:
                    break
                for request in batch.wait():
                    finished = self._part_done(batch, task, template, request, opts, params)
                    if finished is not None:
                        on_generated(finished[0])
                        yield finished
        finally:
            batch.close()
            self.kv_cache_peak_used = max(self.kv_cache_peak_used, batch.peak_used)

    def _start(self, batch: LocalBatch | LoopBatch, plan: _PagePlan, requests: list[Request]) -> None:
        """A page's parts (the page, or its bands) join the running batch, side by side."""
        plan.parts = [_Part(r.grammar) for r in requests]
        for request, part in zip(requests, plan.parts):
            request.tag = (plan, part)
            batch.add(request)

    def _start_bands(self, batch: LocalBatch | LoopBatch, task: Task, template: str, plan: _PagePlan,
                     opts: ReadOptions, params: SamplingParams, n: int, reason: str) -> PageResult | None:
        """Read a dense page in n bands, each one more request in the running batch; or the page's failure."""
        page = plan.page
        plan.split, plan.started = Split(n, reason), time.perf_counter()  # type: ignore[arg-type]
        try:
            bands = split_bands(page.image, n)
            requests = [self._request(task, self._prompt(task, template, band, opts, None), opts, params)
                        for band in bands]
        except Exception as exc:
            return failed_page(page.source, page.number, task.name, _describe(exc, page), opts.text)
        failed = next((r for r in requests if isinstance(r, PageFailed)), None)
        if failed is not None:
            return failed_page(page.source, page.number, task.name, str(failed), opts.text)
        plan.split = Split(len(bands), reason)  # type: ignore[arg-type]
        self._start(batch, plan, [r for r in requests if isinstance(r, Request)])
        return None

    def _part_done(self, batch: LocalBatch | LoopBatch, task: Task, template: str, request: Request,
                   opts: ReadOptions, params: SamplingParams) -> tuple[Any, PageResult] | None:
        """One part of a page ended: a loop retry or the page's bands go back into the batch, or the page is
        complete and its (key, result) comes back."""
        plan, part = request.tag
        outcome = self._part_ended(request, opts)
        if isinstance(outcome, _Answer) and task.structured and outcome.finish_reason == "length" \
                and plan.split is None and not part.extended and self._room(request.prompt) > request.budget:
            # cut by the user's budget before the object was complete: read again with the room the context leaves
            # (the grammar's bounds were sized to that room)
            outcome, part.extended, part.retries = replace_request(request, part.params or request.params,
                                                                   self._room(request.prompt)), True, 0
        if isinstance(outcome, Request):
            outcome.tag = request.tag
            batch.add(outcome)
            return None
        if part.extended and isinstance(outcome, _Answer):
            outcome.flags = (*outcome.flags, "budget_extended")
        part.answer = outcome
        if plan.split is None and isinstance(outcome, _Answer) and outcome.finish_reason == "context" \
                and task.splittable and opts.split == "auto":  # the context cut it: read it in bands
            unreadable = self._start_bands(batch, task, template, plan, opts, params, AUTO_BANDS, "budget")
            plan.started -= outcome.seconds  # the whole-page read the context cut counts in the page's seconds
            return None if unreadable is None else (plan.key, unreadable)
        if any(p.answer is None for p in plan.parts):
            return None
        answers = [p.answer for p in plan.parts if p.answer is not None]
        page = plan.page
        if plan.split is None:
            answer = answers[0]
            return plan.key, self._result(task, page, opts, answer, answer.seconds if isinstance(answer, _Answer)
                                          else 0.0)
        failed = next((a for a in answers if isinstance(a, PageFailed)), None)
        if failed is not None:
            return plan.key, self._result(task, page, opts, failed, 0.0)
        bands = [a for a in answers if isinstance(a, _Answer)]
        interrupted = any(a.finish_reason == "interrupted" for a in bands)
        merged = _Answer(merge_band_texts([a.text for a in bands]), "interrupted" if interrupted else "split",
                         tuple(sorted({f for a in bands for f in a.flags})), sum(a.prompt_tokens for a in bands),
                         sum(a.generated_tokens for a in bands))
        result = self._result(task, page, opts, merged, time.perf_counter() - plan.started)
        return plan.key, replace(result, split=plan.split)

    def _page_request(self, task: Task, template: str, page: Page, opts: ReadOptions,
                      params: SamplingParams) -> Request | PageResult | tuple[int, str]:
        """A page's request; or its result without the model (its text layer, or why it cannot be prompted);
        or (bands, reason) when it is to be read in bands."""
        try:
            if opts.text_layer == "only" and (page.text_layer or "").strip():
                return self._text_layer_result(task, page, opts)
            bands, reason = (planned_bands(opts.split, page.image, page.text_layer) if task.splittable
                             else (1, None))
            if bands > 1 and reason:
                return bands, reason
            hint = page.text_layer if opts.text_layer == "hint" else None
            request = self._request(task, self._prompt(task, template, page.tiling or page.image, opts, hint), opts,
                                    params)
        except Exception as exc:  # a page that cannot even be prompted fails alone
            return failed_page(page.source, page.number, task.name, _describe(exc, page), opts.text)
        if isinstance(request, PageFailed):
            return failed_page(page.source, page.number, task.name, str(request), opts.text)
        return request

    def _text_layer_result(self, task: Task, page: Page, opts: ReadOptions) -> PageResult:
        text = (page.text_layer or "").strip()
        answer = _Answer(text, "text_layer", (), 0, 0)
        return self._result(task, page, opts, answer, 0.0)

    def _result(self, task: Task, page: Page, opts: ReadOptions, answer: _Answer | PageFailed,
                seconds: float) -> PageResult:
        if isinstance(answer, PageFailed):
            return failed_page(page.source, page.number, task.name, str(answer), opts.text)
        fields, task_flags = task.parse(answer.text, page.image.size, opts.text)  # boxes on the page as read
        w, h = page.size_as_given
        fields = fields_as_given(fields, page.rotation, (w, h))  # ... and as given, where the file's own boxes are
        if task.structured:  # cut, or not valid under the user's schema: never passed off as valid
            fields, task_flags = task.settle(answer.text, answer.finish_reason == "stop", answer.grammar, opts)
        flags = list(answer.flags) + list(task_flags)
        if opts.text_layer == "only" and answer.finish_reason != "text_layer":
            flags.append("no_text_layer")  # asked for the text layer, but this page has none
        reason = "length" if answer.finish_reason == "context" else answer.finish_reason
        return PageResult(page.source, page.number, task.name, "interrupted" if reason == "interrupted" else "ok",
                          question=opts.text, width=w, height=h, rotation=page.rotation,
                          rotation_source=page.rotation_source, answer=answer.text, finish_reason=reason,
                          flags=tuple(dict.fromkeys(flags)), prompt_tokens=answer.prompt_tokens,
                          generated_tokens=answer.generated_tokens, retry_temperature=answer.retry_temperature,
                          seconds=seconds, fields=fields,
                          grammar=None if answer.grammar is None else answer.grammar.to_json())

    # ------------------------------------------------------------------ questions

    def ask(self, images: Sequence[Image.Image], question: str, opts: ReadOptions,
            history: Sequence[tuple[str, str]] = (), inputs: Sequence[str] = (),
            on_token: Callable[[int, int], None] | None = None) -> AskResult:
        """A question about images (all in one prompt); `history` holds earlier (question, answer) turns."""
        start = time.perf_counter()
        if self.family == "ocr":
            log.warning("DeepSeek-OCR was trained to read documents, not to answer free questions: expect little")
        turns = [*history, (question, None)]
        messages: list[Message] = []
        for n, (q, a) in enumerate(turns):
            if n == 0:  # the images stay in the first user turn
                messages.append(Message("user", [image_marks(len(images)), UserText(q)], list(images)))
            else:
                messages.append(Message("user", [UserText(q)]))
            if a is not None:
                messages.append(Message("assistant", [UserText(a)]))
        prepared = self.loaded.processor.prepare(messages, mode=opts.ocr_mode)
        if len(prepared.input_ids) >= self.context:
            raise UsageError(f"the prompt needs {len(prepared.input_ids)} tokens, more than the model's "
                             f"{self.context}-token context: ask about fewer pages (--pages) or use "
                             "`vl2 batch --task ask`")
        params = self._sampling(opts)
        budget = self._budgets([prepared], opts.max_new_tokens)[0]
        gen = self._generate([prepared], params, [budget], on_token)[0]
        if isinstance(gen, PageFailed):
            raise gen
        ids = gen.ids
        flags = []
        if gen.finish_reason == "loop":
            flags.append("repetition_loop")
            ids = trim_loop(ids, find_loop(ids) or 1)
        elif gen.finish_reason == "length":
            flags.append("token_budget_reached")
        return AskResult(tuple(inputs), len(images), question, self.decode(ids), gen.finish_reason, tuple(flags),
                         len(prepared.input_ids), len(gen.ids), time.perf_counter() - start)


def _page_failure(failure: Failure, what: str) -> PageFailed:
    """The failure a request ended with, as its page's (or question's) error; where it was raised goes to the
    debug log (what -v shows), not into the record."""
    if failure.traceback:
        log.debug("%s failed while generating:\n%s", what, failure.traceback.rstrip())
    if failure.oom:
        return OutOfMemory("out of memory even at batch 1 with chunked prefill")
    return PageFailed(f"internal error while generating ({failure.message}); run with -v for details")


def _describe(exc: BaseException, page: Page) -> str:
    """A page's error from an exception raised before its request ran; an unexpected one's traceback goes to the
    debug log (what -v shows), not into the record."""
    if isinstance(exc, PageFailed | UsageError):
        return str(exc)
    log.debug("%s page %d failed before generating:\n%s", page.source, page.number,
              "".join(format_exception(exc)).rstrip())
    return f"internal error ({type(exc).__name__}: {str(exc)[:ERROR_DETAIL_CHARS]}); run with -v for details"
