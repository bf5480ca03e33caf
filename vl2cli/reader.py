"""The Reader: pages in, results out.

Generation is wrapped once, for every task and for `ask`: the answer budget is what the context leaves,
out-of-memory halves the batch, then chunks the prefill, then fails only that page (the failed attempt's
memory is released before the retry allocates), any other error fails only the page that raises it,
runaway loops are re-read at rising temperatures, and dense pages are read in bands and merged.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from vl2cli.bands import merge_band_texts, planned_bands, split_bands
from vl2cli.engine.generation import Engine, Generation, NoRepeatNgram, SamplingParams
from vl2cli.engine.grammar import Grammar, grammar_tokenizer
from vl2cli.engine.memory import batch_for_free
from vl2cli.engine.ocr import OCRProcessor
from vl2cli.engine.processor import EOS_TEXT, Message, Prepared, UserText
from vl2cli.errors import OutOfMemory, PageFailed, UsageError
from vl2cli.extract import describe_json
from vl2cli.options import DEFAULT_BATCH_SIZE, LOOP_RETRY_TEMPERATURES, ReadOptions
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
OOM_PREFILL_CHUNK = 256  # tokens per prefill step once a batch of one no longer fits
log = logging.getLogger("vl2cli")
OOM_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE")


def is_oom(exc: BaseException) -> bool:
    """CUDA out-of-memory, including cuBLAS/cuDNN failing to allocate their workspaces."""
    return isinstance(exc, torch.OutOfMemoryError) or any(m in str(exc) for m in OOM_MESSAGES)


@dataclass(frozen=True)
class _Failure:
    """What a failed attempt leaves behind: its kind and message, never the exception (whose traceback
    frames would keep the attempt's KV cache and activations alive through the retry)."""

    oom: bool
    message: str


@dataclass
class _Answer:
    text: str
    finish_reason: str
    flags: tuple[str, ...]
    prompt_tokens: int
    generated_tokens: int
    retry_temperature: float | None = None
    grammar: Grammar | None = None


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

    @classmethod
    def load(cls, model: str = "tiny", *, device: str | None = None, dtype: str | None = None, quant: str = "auto",
             revision: str | None = None, offline: bool | None = None) -> Reader:
        from vl2cli.engine.loading import load_model
        return cls(load_model(model, device=device, dtype=dtype, quant=quant, revision=revision, offline=offline))

    def auto_batch_size(self) -> int:
        """Pages per batch for this device: on a GPU, what its free memory holds now that the weights are in."""
        if self.loaded.device.type != "cuda":
            return DEFAULT_BATCH_SIZE
        free, _ = torch.cuda.mem_get_info(self.loaded.device)
        return batch_for_free(self.loaded.cfg, free)

    @property
    def family(self) -> str:
        """"ocr" for DeepSeek-OCR (its own prompts, modes and no-repeat rule), "vl2" otherwise."""
        return "ocr" if isinstance(self.loaded.processor, OCRProcessor) else "vl2"

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

    def use_mode(self, mode: str) -> None:
        """DeepSeek-OCR: the resolution mode pages are cut in (set before pages are tiled ahead)."""
        if isinstance(self.loaded.processor, OCRProcessor):
            self.loaded.processor.mode = mode

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

    def _stop_rule(self, ids: list[int], constrained: bool) -> str | None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "interrupted"
        # A grammar bounds its answer's length: repetition inside it (identical table rows) is not a runaway.
        return "loop" if not constrained and find_loop(ids) else None

    def _attempt(self, prompts: list[Prepared], params: SamplingParams, budgets: list[int],
                 on_token: Callable[[int, int], None] | None, on_finish: Callable[[int], None] | None,
                 grammars: list[Grammar | None]) -> list[Generation] | _Failure:
        try:
            return self.engine.generate(prompts, params, on_token=on_token, stop_rule=self._stop_rule,
                                        budgets=budgets, on_finish=on_finish, grammars=grammars)
        except Exception as exc:  # KeyboardInterrupt is not caught: it ends the run
            return _Failure(is_oom(exc), f"{type(exc).__name__}: {str(exc)[:200]}")

    def _generate(self, prompts: list[Prepared], params: SamplingParams, budgets: list[int],
                  on_token: Callable[[int, int], None] | None = None,
                  on_finish: Callable[[int], None] | None = None,
                  grammars: list[Grammar | None] | None = None) -> list[Generation | PageFailed]:
        """One outcome per prompt: a Generation, or the PageFailed that this prompt alone ran into."""
        grammars = grammars or [None] * len(prompts)
        outcome = self._attempt(prompts, params, budgets, on_token, on_finish, grammars)
        if not isinstance(outcome, _Failure):
            return list(outcome)
        # The handler has been left and the exception dropped: collect its cycles before retrying.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(prompts) > 1:
            half = len(prompts) // 2

            def shifted(offset: int) -> Callable[[int], None] | None:
                return None if on_finish is None else (lambda row: on_finish(row + offset))
            return (self._generate(prompts[:half], params, budgets[:half], on_token, shifted(0), grammars[:half])
                    + self._generate(prompts[half:], params, budgets[half:], on_token, shifted(half),
                                     grammars[half:]))
        if not outcome.oom:
            return [PageFailed(f"internal error while generating ({outcome.message}); run with -v for details")]
        if self.engine.prefill_chunk is None or self.engine.prefill_chunk > OOM_PREFILL_CHUNK:
            saved = self.engine.prefill_chunk
            self.engine.prefill_chunk = OOM_PREFILL_CHUNK
            try:
                return self._generate(prompts, params, budgets, on_token, on_finish, grammars)
            finally:
                self.engine.prefill_chunk = saved
        return [OutOfMemory("out of memory even at batch 1 with chunked prefill")]

    def _budgets(self, prompts: list[Prepared], wanted: int) -> list[int]:
        """Each prompt's answer budget: what the user asked for, or what the context leaves (0: no room)."""
        return [max(0, min(wanted, self.context - len(p.input_ids))) for p in prompts]

    def _answers(self, task: Task, prompts: list[Prepared], opts: ReadOptions,
                 on_finish: Callable[[int], None] | None = None) -> list[_Answer | PageFailed]:
        params = self._sampling(opts)
        budgets = self._budgets(prompts, opts.max_new_tokens)
        outcomes: list[_Answer | PageFailed] = [
            PageFailed(f"the prompt needs {len(p.input_ids)} tokens, more than the model's {self.context}-token "
                       "context") for p in prompts]
        grammars: list[Grammar | None] = [None] * len(prompts)
        room = []
        for i, budget in enumerate(budgets):
            if budget <= 0:
                continue
            try:
                grammars[i] = task.grammar(opts, budget)
            except UsageError as exc:  # a schema that cannot fit this page's budget fails this page
                outcomes[i] = PageFailed(str(exc))
                continue
            room.append(i)
        gens = self._generate([prompts[i] for i in room], params, [budgets[i] for i in room],
                              on_finish=None if on_finish is None else (lambda row: on_finish(room[row])),
                              grammars=[grammars[i] for i in room])
        for i, gen in zip(room, gens):
            if isinstance(gen, PageFailed):
                outcomes[i] = gen
            else:
                answer = self._finish(gen, prompts[i], params, budgets[i], opts)
                if isinstance(answer, _Answer):
                    answer.grammar = grammars[i]
                outcomes[i] = answer
        return outcomes

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
        return self.loaded.processor.prepare_prompt(task.prompt(1, template, opts.text, hint, schema), [image])

    def read(self, task: Task, pages: Sequence[Page], opts: ReadOptions,
             on_generated: Callable[[int], None] | None = None) -> list[PageResult]:
        """One result per page, in order. A page that fails gets status 'failed' and its reason; the others go on.

        `on_generated(i)` is called as page i's answer is complete (progress that advances per page).
        """
        template = task.template(opts.prompt_file, self.family, opts.plain)
        self.use_mode(opts.ocr_mode)
        results: list[PageResult | None] = [None] * len(pages)
        whole: list[tuple[int, Prepared]] = []
        banded: list[tuple[int, int, str]] = []  # page index, bands, reason
        for i, page in enumerate(pages):
            try:
                if opts.text_layer == "only" and (page.text_layer or "").strip():
                    results[i] = self._text_layer_result(task, page, opts)
                    continue
                bands, reason = (planned_bands(opts.split, page.image, page.text_layer) if task.splittable
                                 else (1, None))
                if bands > 1 and reason:
                    banded.append((i, bands, reason))
                    continue
                hint = page.text_layer if opts.text_layer == "hint" else None
                whole.append((i, self._prompt(task, template, page.tiling or page.image, opts, hint)))
            except Exception as exc:  # a page that cannot even be prompted fails alone
                results[i] = failed_page(page.source, page.number, task.name, _describe(exc), opts.text)
        for begin in range(0, len(whole), opts.batch_size):
            chunk = whole[begin:begin + opts.batch_size]
            start = time.perf_counter()
            done: Callable[[int], None] | None = None
            if on_generated is not None:
                def done(row: int, c: list[tuple[int, Prepared]] = chunk) -> None:
                    on_generated(c[row][0])
            answers = self._answers(task, [p for _, p in chunk], opts, done)
            seconds = (time.perf_counter() - start) / len(chunk)
            for (i, _), answer in zip(chunk, answers):
                page = pages[i]
                auto_split = (isinstance(answer, _Answer) and answer.finish_reason == "context" and task.splittable
                              and opts.split == "auto")
                if auto_split:
                    banded.append((i, 3, "budget"))
                else:
                    results[i] = self._result(task, page, opts, answer, seconds)
        for i, bands, reason in banded:
            results[i] = self._read_bands(task, template, pages[i], opts, bands, reason)
            if on_generated is not None:
                on_generated(i)
        return [r for r in results if r is not None]

    def _text_layer_result(self, task: Task, page: Page, opts: ReadOptions) -> PageResult:
        text = (page.text_layer or "").strip()
        answer = _Answer(text, "text_layer", (), 0, 0)
        return self._result(task, page, opts, answer, 0.0)

    def _read_bands(self, task: Task, template: str, page: Page, opts: ReadOptions, n: int,
                    reason: str) -> PageResult:
        start = time.perf_counter()
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
        w, h = page.image.size
        fields, task_flags = task.parse(answer.text, (w, h), opts.text)
        if task.structured and answer.finish_reason != "stop":  # cut by the budget: never passed off as valid
            fields, task_flags = {**fields, "data": None}, ("incomplete_json",)
        flags = list(answer.flags) + list(task_flags)
        if opts.text_layer == "only" and answer.finish_reason != "text_layer":
            flags.append("no_text_layer")  # asked for the text layer, but this page has none
        reason = "length" if answer.finish_reason == "context" else answer.finish_reason
        return PageResult(page.source, page.number, task.name, "interrupted" if reason == "interrupted" else "ok",
                          question=opts.text, width=w, height=h, answer=answer.text, finish_reason=reason,
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
        prepared = self.loaded.processor.prepare(messages)
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


def _describe(exc: BaseException) -> str:
    if isinstance(exc, PageFailed | UsageError):
        return str(exc)
    return f"internal error ({type(exc).__name__}: {str(exc)[:160]}); run with -v for details"
