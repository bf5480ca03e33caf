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
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from vl2cli.bands import merge_band_texts, planned_bands, split_bands
from vl2cli.engine.generation import Engine, Generation, NoRepeatNgram, SamplingParams
from vl2cli.engine.grammar import Grammar, grammar_tokenizer
from vl2cli.engine.memory import batch_for_free
from vl2cli.engine.ocr import OCRProcessor
from vl2cli.engine.ocr2 import OCR2_MODE, OCR2Processor, ocr2_mode_refused
from vl2cli.engine.processor import EOS_TEXT, Message, Prepared, UserText
from vl2cli.engine.scheduler import EngineLoop, Failure, LocalBatch, LoopBatch, Request
from vl2cli.errors import OutOfMemory, PageFailed, UsageError
from vl2cli.extract import describe_json
from vl2cli.options import DEFAULT_BATCH_SIZE, LOOP_RETRY_TEMPERATURES, ReadOptions
from vl2cli.orient import fields_as_given
from vl2cli.parsers import find_loop, trim_loop
from vl2cli.results import AskResult, PageResult, Split, failed_page
from vl2cli.tasks import image_marks

if TYPE_CHECKING:
    from PIL import Image

    from vl2cli.engine.loading import LoadedModel
    from vl2cli.engine.processor import Tiling
    from vl2cli.pages import Page
    from vl2cli.tasks import Task

NGRAM_SIZE, NGRAM_WINDOW = 30, 90  # DeepSeek-OCR's own scripts (vLLM example, run_dpsk_ocr_image.py)
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


class TokenStream:
    """Feeds an answer to `write` while it is generated: each new piece once its bytes decode to whole characters."""

    def __init__(self, reader: Reader, write: Callable[[str], None]):
        self.reader, self.write = reader, write
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, _row: int, token: int) -> None:
        self.ids.append(token)
        text = self.reader.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return  # half a multi-byte character, or a re-segmentation: wait for more tokens
        self.write(text[len(self.shown):])
        self.shown = text


class Reader:
    def __init__(self, loaded: LoadedModel, prefill_chunk: int | None = None):
        self.loaded = loaded
        tok = loaded.processor.tokenizer
        self.engine = Engine(loaded.model, tok.eos_id, tok.pad_id, prefill_chunk, self._grammar_tokenizer)
        self._llg_tokenizer: Any = None
        self.deadline: float | None = None  # time.monotonic() after which generation stops ("interrupted")
        self.loop: EngineLoop | None = None  # a server's engine thread: all generation goes through it

    def auto_batch_size(self) -> int:
        """Pages per batch for this device: on a GPU, what its free memory holds now that the weights are in."""
        if self.loaded.device.type != "cuda":
            return DEFAULT_BATCH_SIZE
        free, _ = torch.cuda.mem_get_info(self.loaded.device)
        return batch_for_free(self.loaded.cfg, free)

    @property
    def family(self) -> str:
        """"ocr" for DeepSeek-OCR and DeepSeek-OCR 2 (their own prompts and no-repeat rule), "vl2" otherwise."""
        return "ocr" if isinstance(self.loaded.processor, OCRProcessor | OCR2Processor) else "vl2"

    def _sampling(self, opts: ReadOptions) -> SamplingParams:
        no_repeat = None
        if self.family == "ocr" and opts.no_repeat:
            tok = self.loaded.processor.tokenizer
            cells = frozenset(i for i in (tok.tok.token_to_id("<td>"), tok.tok.token_to_id("</td>")) if i is not None)
            no_repeat = NoRepeatNgram(NGRAM_SIZE, NGRAM_WINDOW, cells)
        return SamplingParams(opts.max_new_tokens, opts.temperature, opts.sampling_top_p, 1.0, opts.sampling_seed,
                              no_repeat)

    @property
    def context(self) -> int:
        return self.loaded.cfg.language.max_position_embeddings

    def check_mode(self, mode: str) -> None:
        """DeepSeek-OCR 2 has one setting (its official one, DeepSeek-OCR's gundam with 768-pixel tiles): any other
        mode is refused, never quietly read another way."""
        if isinstance(self.loaded.processor, OCR2Processor) and mode != OCR2_MODE:
            raise UsageError(ocr2_mode_refused(mode))

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
        return [r.result if r.failure is None else _page_failure(r.failure) for r in requests]

    def _budgets(self, prompts: list[Prepared], wanted: int) -> list[int]:
        """Each prompt's answer budget: what the user asked for, or what the context leaves (0: no room)."""
        return [max(0, min(wanted, self.context - len(p.input_ids))) for p in prompts]

    def _answers(self, task: Task, prompts: list[Prepared], opts: ReadOptions) -> list[_Answer | PageFailed]:
        params = self._sampling(opts)
        requests = [self._request(task, p, opts, params) for p in prompts]
        self._run([r for r in requests if isinstance(r, Request)])
        return [r if isinstance(r, PageFailed) else self._answer(r, params, opts) for r in requests]

    def _request(self, task: Task, prompt: Prepared, opts: ReadOptions, params: SamplingParams) -> Request | PageFailed:
        """A prompt's request, with its budget (what the context leaves) and grammar; or why it cannot run."""
        budget = self._budgets([prompt], opts.max_new_tokens)[0]
        if budget <= 0:
            return PageFailed(f"the prompt needs {len(prompt.input_ids)} tokens, more than the model's "
                              f"{self.context}-token context")
        try:
            grammar = task.grammar(opts, budget)
        except UsageError as exc:  # a schema that cannot fit this page's budget fails this page
            return PageFailed(str(exc))
        return Request(prompt, params, budget, grammar, self.stop_rule)

    def _answer(self, request: Request, params: SamplingParams, opts: ReadOptions) -> _Answer | PageFailed:
        """A finished request's answer: loops re-read, flags set; or the failure it ended with."""
        if request.failure is not None:
            return _page_failure(request.failure)
        gen = request.result
        if gen.finish_reason == "cancelled":  # the server is draining: like a signal, the page is read again
            gen.finish_reason = "interrupted"
        retries_started = time.perf_counter()
        answer = self._finish(gen, request.prompt, params, request.budget, opts)  # loop retries run in here
        if isinstance(answer, _Answer):
            # a page's seconds: the wall time of its own requests, from admission to its last token, retries included
            answer.grammar = request.grammar
            answer.seconds = request.seconds + (time.perf_counter() - retries_started)
        return answer

    def _finish(self, gen: Generation, prompt: Prepared, params: SamplingParams, budget: int,
                opts: ReadOptions) -> _Answer | PageFailed:
        temperature = None
        if gen.finish_reason == "loop" and opts.loop_retries:
            retried = self._retry_loop(prompt, params, budget)
            if isinstance(retried, PageFailed):
                return retried
            gen, temperature = retried
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

    def _retry_loop(self, prompt: Prepared, params: SamplingParams,
                    budget: int) -> tuple[Generation, float] | PageFailed:
        """Re-read a looping page at rising temperatures; the first clean answer (or the last)."""
        last: Generation | None = None
        for i, temperature in enumerate(LOOP_RETRY_TEMPERATURES):
            p = SamplingParams(params.max_new_tokens, temperature, 0.9, max(params.repetition_penalty, 1.05),
                               (params.seed or 0) + i + 1, params.no_repeat)
            outcome = self._generate([prompt], p, [budget])[0]
            if isinstance(outcome, PageFailed):
                return outcome
            last = outcome
            if last.finish_reason != "loop":
                return last, temperature
        assert last is not None
        return last, LOOP_RETRY_TEMPERATURES[-1]

    # ------------------------------------------------------------------ pages

    def _prompt(self, task: Task, template: str, image: Image.Image | Tiling, opts: ReadOptions,
                hint: str | None) -> Prepared:
        schema = describe_json(opts.schema_json) if opts.schema_json else None
        return self.loaded.processor.prepare_prompt(task.prompt(1, template, opts.text, hint, schema), [image],
                                                    mode=opts.ocr_mode)

    def read(self, task: Task, pages: Sequence[Page], opts: ReadOptions,
             on_generated: Callable[[int], None] | None = None) -> list[PageResult]:
        """One result per page, in order. A page that fails gets status 'failed' and its reason; the others go on.

        `on_generated(i)` is called as page i's answer is complete (progress that advances per page).
        """
        done = dict(self.read_stream(task, enumerate(pages), opts, on_generated or (lambda _i: None)))
        return [done[i] for i in range(len(pages))]

    def read_stream(self, task: Task, pages: Iterable[tuple[K, Page]], opts: ReadOptions,
                    on_generated: Callable[[K], None] = lambda _key: None,
                    cancelled: Callable[[], bool] = lambda: False) -> Iterator[tuple[K, PageResult]]:
        """(key, result) for each (key, page), as each page ends: pages join the running batch (at most
        `opts.batch_size` rows) as others leave it, so a short answer never waits for a long one. Pages are
        drawn from `pages` only when there is room, so a renderer feeding it stays just ahead of the model.
        Once `cancelled()` is true the pages in flight are dropped and nothing more is yielded."""
        template = task.template(opts.prompt_file, self.family, opts.plain)
        params = self._sampling(opts)
        banded: list[tuple[K, Page, int, str, float]] = []  # (key, page, bands, reason, seconds spent already)
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
                    outcome = self._page_request(task, template, page, opts, params)
                    if isinstance(outcome, Request):
                        outcome.tag = (key, page)
                        batch.add(outcome)
                    elif isinstance(outcome, PageResult):
                        yield key, outcome
                    else:
                        banded.append((key, page, *outcome, 0.0))
                if cancelled():
                    return
                if batch.idle and not more:
                    break
                for request in batch.wait():
                    done = self._page_done(task, request, opts, params, banded)
                    if done is not None:
                        on_generated(done[0])
                        yield done
        finally:
            batch.close()
        for key, page, bands, reason, spent in banded:
            yield key, self._read_bands(task, template, page, opts, bands, reason, spent)
            on_generated(key)

    def _page_done(self, task: Task, request: Request, opts: ReadOptions, params: SamplingParams,
                   banded: list[tuple[Any, Page, int, str, float]]) -> tuple[Any, PageResult] | None:
        """A finished page request's (key, result); None when the context cut it and it is to be read in bands."""
        key, page = request.tag
        answer = self._answer(request, params, opts)
        if isinstance(answer, _Answer) and answer.finish_reason == "context" and task.splittable \
                and opts.split == "auto":
            banded.append((key, page, 3, "budget", answer.seconds))  # the whole-page read counts too
            return None
        return key, self._result(task, page, opts, answer, answer.seconds if isinstance(answer, _Answer) else 0.0)

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
            return failed_page(page.source, page.number, task.name, _describe(exc), opts.text)
        if isinstance(request, PageFailed):
            return failed_page(page.source, page.number, task.name, str(request), opts.text)
        return request

    def _text_layer_result(self, task: Task, page: Page, opts: ReadOptions) -> PageResult:
        text = (page.text_layer or "").strip()
        answer = _Answer(text, "text_layer", (), 0, 0)
        return self._result(task, page, opts, answer, 0.0)

    def _read_bands(self, task: Task, template: str, page: Page, opts: ReadOptions, n: int,
                    reason: str, spent: float = 0.0) -> PageResult:
        start = time.perf_counter() - spent  # `spent`: a whole-page read the context cut, before these bands
        try:
            bands = split_bands(page.image, n)
            prompts = [self._prompt(task, template, band, opts, None) for band in bands]
        except Exception as exc:
            return failed_page(page.source, page.number, task.name, _describe(exc), opts.text)
        answers = self._answers(task, prompts, opts)
        failed = next((a for a in answers if isinstance(a, PageFailed)), None)
        if failed is not None:
            return self._result(task, page, opts, failed, 0.0)
        done = [a for a in answers if isinstance(a, _Answer)]
        interrupted = any(a.finish_reason == "interrupted" for a in done)
        merged = _Answer(merge_band_texts([a.text for a in done]), "interrupted" if interrupted else "split",
                         tuple(sorted({f for a in done for f in a.flags})), sum(a.prompt_tokens for a in done),
                         sum(a.generated_tokens for a in done))
        result = self._result(task, page, opts, merged, time.perf_counter() - start)
        return replace(result, split=Split(len(bands), reason))  # type: ignore[arg-type]

    def _result(self, task: Task, page: Page, opts: ReadOptions, answer: _Answer | PageFailed,
                seconds: float) -> PageResult:
        if isinstance(answer, PageFailed):
            return failed_page(page.source, page.number, task.name, str(answer), opts.text)
        fields, task_flags = task.parse(answer.text, page.image.size, opts.text)  # boxes on the page as read
        w, h = page.size_as_given
        fields = fields_as_given(fields, page.rotation, (w, h))  # ... and as given, where the file's own boxes are
        if task.structured and answer.finish_reason != "stop":  # cut by the budget: never passed off as valid
            fields, task_flags = {**fields, "data": None}, ("incomplete_json",)
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


def _page_failure(failure: Failure) -> PageFailed:
    if failure.oom:
        return OutOfMemory("out of memory even at batch 1 with chunked prefill")
    return PageFailed(f"internal error while generating ({failure.message}); run with -v for details")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, PageFailed | UsageError):
        return str(exc)
    return f"internal error ({type(exc).__name__}: {str(exc)[:160]}); run with -v for details"
