"""The one reading pipeline: sources -> pages (one rendering thread) -> tiles -> batches -> Reader -> sink.

Every reading command runs through `read_documents`; only the sink differs (stdout, a list, or a folder).
A page's key digests everything that determines its result (the file's bytes, the page, the task, the
format, the model, the prompt and every setting that changes the answer), so a sink can tell a page it
already holds from one asked for differently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import TYPE_CHECKING, Any, Protocol

from vl2cli.errors import InputError, UsageError
from vl2cli.options import PageOptions, ReadOptions
from vl2cli.orient import osd_available
from vl2cli.pages import Inputs, Page, Source, plan_source, render_pages
from vl2cli.results import PageResult, failed_page

if TYPE_CHECKING:
    from vl2cli.reader import Reader
    from vl2cli.tasks import Task

KEY_VERSION = 1  # bump when what a key digests changes
log = logging.getLogger("vl2cli")


@dataclass(frozen=True)
class Job:
    """What determines every page's result."""

    task: Task
    read: ReadOptions
    pages: PageOptions
    fmt: str
    model_id: str  # the checkpoint folder's real path (a hub snapshot's path names its revision)
    template: str  # the prompt template text
    keep_furniture: bool = False  # ocr text keeps page headers, footers and numbers (rendering only: not in the key)

    def settings(self) -> dict:
        return {"v": KEY_VERSION, "task": self.task.name, "format": self.fmt, "model": self.model_id,
                "prompt_sha256": hashlib.sha256(self.template.encode()).hexdigest(), **self.read.settings(),
                "dpi": self.pages.dpi, "rotate": self.pages.rotate,
                # auto without Tesseract reads scanned pages as given: installing it makes them new results
                **({"osd": osd_available()} if self.pages.rotate == "auto" else {})}

    def settings_digest(self) -> str:
        return self._digest

    @cached_property
    def _digest(self) -> str:  # once per job, not once per page key
        return hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()

    def page_key(self, source: Source, number: int) -> str:
        """The file's bytes, its output name (two copies of one file each get their outputs) and the page;
        page 0 stands for a file that could not be opened at all."""
        what = json.dumps([self.settings_digest(), source.digest or f"unreadable:{source.path}", source.name, number])
        return hashlib.sha256(what.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class PageItem:
    source: Source
    number: int
    key: str


class Sink(Protocol):
    def done(self, item: PageItem) -> bool: ...

    def emit(self, item: PageItem, result: PageResult, page: Page | None) -> PageResult:
        """Take one result; returns it as kept (a folder sink that cannot write it returns it failed)."""
        ...


@dataclass
class Summary:
    files: int = 0
    pages_planned: int = 0
    pages_done: int = 0
    pages_skipped: int = 0
    pages_failed: int = 0
    files_failed: int = 0
    loops_flagged: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    interrupted_by: int | None = None
    workers: dict[str, int] = field(default_factory=dict)  # pages read per Ray worker (--ray)
    turned: dict[str, int] = field(default_factory=dict)  # pages read turned, by what decided the turn
    kv_cache_peak_used: int = 0  # the most KV cache positions that held live tokens at once

    @property
    def pages_left(self) -> int:
        return max(0, self.pages_planned - self.pages_done - self.pages_failed)

    @property
    def exit_code(self) -> int:
        if self.interrupted_by:
            return 128 + self.interrupted_by
        return 1 if (self.pages_failed or self.files_failed) else 0

    def to_json(self, out: str | None = None) -> dict:
        return {"pages_done": self.pages_done, "pages_skipped": self.pages_skipped, "pages_failed": self.pages_failed,
                "files_failed": self.files_failed, "pages_left": self.pages_left, "loops_flagged": self.loops_flagged,
                "generated_tokens": self.generated_tokens, "seconds": round(self.seconds, 2), "out": out,
                "pages_turned": sum(self.turned.values()), "turned_by": dict(sorted(self.turned.items())),
                "kv_cache_peak_used_tokens": self.kv_cache_peak_used,
                "failures": [{"input": a, "error": b} for a, b in self.failures],
                **({"workers": self.workers} if self.workers else {})}


class StopFlag:
    """Set from a signal handler: no new batch starts; the batch in flight drains within a bounded wait."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.cancelled = False  # no drain: the pages in flight are dropped too (a server's client went away)

    @property
    def stopping(self) -> bool:
        return self.signal is not None or self.cancelled


Progress = Callable[[int, int, int], None]  # (pages finished this run, pages to do this run, tokens generated)


def plan_inputs(inputs: Inputs, opts: PageOptions, strict: bool) -> tuple[list[Source], list[str]]:
    """Look at every input once, before any model loads. `strict` (commands on named files): a missing file
    or pages past a document's end are usage errors. Otherwise such files are skipped with a note."""
    sources, notes = [], []
    for path in inputs.files:
        try:
            source = plan_source(path, opts)
        except UsageError as exc:
            if strict:
                raise
            notes.append(f"{exc}; skipped")
            continue
        if source.missing and strict:
            raise UsageError(source.error or f"{source.label}: no such file")
        source.name = inputs.names.get(path, source.name)
        if source.name == "stdin":
            source.name = f"stdin-{source.digest[:8]}"  # a second, different piped file is another input
        if source.note:
            notes.append(source.note)
        sources.append(source)
    if inputs.hidden_skipped:
        notes.append(f"{inputs.hidden_skipped} file(s) with names starting with '.' left out of folder searches")
    if inputs.other_skipped:
        notes.append(f"{inputs.other_skipped} file(s) that are not PDFs or images (by extension) left out of folder "
                     "searches (--glob picks files by name instead)")
    return sources, notes


def _render(work: list[PageItem], opts: PageOptions, tile: Callable[[Any], Any], q: queue.Queue,
            stop: threading.Event) -> None:
    """The one rendering thread (PDFium is never called from two threads): pages, tiled ahead of the model."""
    try:
        by_source: dict[int, list[PageItem]] = {}
        for item in work:
            by_source.setdefault(id(item.source), []).append(item)
        for items in by_source.values():
            for item, outcome in _render_source(items, opts):
                if stop.is_set():
                    return
                if isinstance(outcome, Page):
                    try:
                        outcome.tiling = tile(outcome.image)  # overlaps the model's compute
                    except Exception as exc:
                        outcome = f"{item.source.label} page {item.number}: cannot tile ({type(exc).__name__}: {exc})"
                q.put((item, outcome))
    finally:
        q.put(None)


def _render_source(items: list[PageItem], opts: PageOptions) -> Iterator[tuple[PageItem, Page | str]]:
    """Each item's page, or the message saying why it cannot be read; a damaged page fails alone."""
    pending = list(items)
    while pending:
        numbers = [i.number for i in pending]
        try:
            for page in render_pages(pending[0].source, opts, numbers):
                yield pending.pop(0), page
        except InputError as exc:
            yield pending.pop(0), str(exc)
        except MemoryError:
            yield pending.pop(0), f"{items[0].source.label}: out of memory while decoding"
        except Exception as exc:  # a library bug on a hostile file must not end the run
            yield pending.pop(0), f"{items[0].source.label}: unreadable ({type(exc).__name__}: {str(exc)[:120]})"


def plan_work(job: Job, sources: list[Source], sink: Sink, summary: Summary) -> list[PageItem]:
    """The pages still to read (the sink holds the others); files that cannot be opened become failed records
    here, before any model is loaded."""
    summary.files += len(sources)
    work: list[PageItem] = []
    for source in sources:
        if source.error:
            item = PageItem(source, 0, job.page_key(source, 0))
            if sink.done(item):
                summary.pages_skipped += 1
                continue
            summary.files_failed += 1
            summary.failures.append((source.label, source.error))
            sink.emit(item, failed_page(source.label, 0, job.task.name, source.error, job.read.text), None)
            continue
        for number in source.numbers:
            item = PageItem(source, number, job.page_key(source, number))
            if sink.done(item):
                summary.pages_skipped += 1
            else:
                work.append(item)
    summary.pages_planned += len(work)
    return work


def read_documents(reader: Reader, job: Job, sources: list[Source], sink: Sink, progress: Progress | None = None,
                   stop: StopFlag | None = None) -> Summary:
    """Read every page of the sources that the sink does not hold yet."""
    summary = Summary()
    run_work(reader, job, plan_work(job, sources, sink, summary), sink, summary, progress, stop)
    return summary


def run_work(reader: Reader, job: Job, work: list[PageItem], sink: Sink, summary: Summary,
             progress: Progress | None = None, stop: StopFlag | None = None) -> None:
    """Render in one thread, read on this one (pages join the running batch as others leave), hand each
    result to the sink as it is final."""
    stop = stop or StopFlag()
    started = time.perf_counter()
    if work:
        _run(reader, job, work, sink, summary, progress, stop)
    summary.seconds += time.perf_counter() - started
    summary.interrupted_by = stop.signal
    summary.kv_cache_peak_used = max(summary.kv_cache_peak_used, reader.kv_cache_peak_used)


def _run(reader: Reader, job: Job, work: list[PageItem], sink: Sink, summary: Summary, progress: Progress | None,
         stop: StopFlag) -> None:
    q: queue.Queue = queue.Queue(maxsize=max(2, 2 * job.read.batch_size))
    quit_renderer = threading.Event()
    tile = partial(reader.loaded.processor.tile, mode=job.read.ocr_mode)  # the job's mode, not a shared setting
    thread = threading.Thread(target=_render, args=(work, job.pages, tile, q, quit_renderer), daemon=True, name="vl2-render")
    thread.start()
    generated = 0

    def tick(_: object = None) -> None:
        nonlocal generated
        generated += 1
        if progress:
            progress(min(generated, len(work)), len(work), summary.generated_tokens)

    try:
        rendered = _rendered(q, job, sink, summary, tick, stop)
        pairs = ((pair, pair[1]) for pair in rendered)
        for (item, page), result in reader.read_stream(job.task, pairs, job.read, on_generated=tick,
                                                       cancelled=lambda: stop.cancelled):
            record_result(sink, summary, item, result, page)
            if progress:
                progress(min(generated, len(work)), len(work), summary.generated_tokens)
    finally:
        quit_renderer.set()
        while thread.is_alive():  # let a renderer blocked on a full queue see that nobody is reading
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass


def _rendered(q: queue.Queue, job: Job, sink: Sink, summary: Summary, tick: Callable[..., None],
              stop: StopFlag) -> Iterator[tuple[PageItem, Page]]:
    """Rendered pages as the reader asks for them, until a signal; pages that could not be rendered become failed
    records on the way."""
    while not stop.stopping:
        entry = q.get()
        if entry is None:
            return
        item, outcome = entry
        if isinstance(outcome, Page):
            log.debug("reading %s", outcome.label)
            yield item, outcome
        else:
            record_result(sink, summary, item, failed_page(item.source.label, item.number, job.task.name, outcome,
                                                   job.read.text), None)
            tick()


def record_result(sink: Sink, summary: Summary, item: PageItem, result: PageResult, page: Page | None) -> None:
    """A final result into the sink and the summary (an interrupted page is neither: a rerun reads it)."""
    if result.status == "interrupted":
        return  # neither written nor recorded: a rerun reads it again
    result = sink.emit(item, result, page)
    if result.ok:
        summary.pages_done += 1
        summary.generated_tokens += result.generated_tokens
        summary.loops_flagged += "repetition_loop" in result.flags
        if result.rotation and result.rotation_source:
            summary.turned[result.rotation_source] = summary.turned.get(result.rotation_source, 0) + 1
    else:
        summary.pages_failed += 1
        summary.failures.append((result.label, result.error or ""))


class ListSink:
    """Collects results in memory (the library's `read`)."""

    def __init__(self) -> None:
        self.results: list[PageResult] = []

    def done(self, _item: PageItem) -> bool:
        return False

    def emit(self, _item: PageItem, result: PageResult, _page: Page | None) -> PageResult:
        self.results.append(result)
        return result
