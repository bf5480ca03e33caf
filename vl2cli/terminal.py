"""What a run shows on a terminal: results on stdout (`StdoutSink`), failures and flags on stderr (`Reported`,
`say`), the progress bar, the summary and variants tables, and where log lines go. The CLI's side: the library
never prints.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from vl2cli.pages import Page, Source
    from vl2cli.pipeline import Job, PageItem, Summary
    from vl2cli.results import PageResult

log = logging.getLogger("vl2cli")


def err(message: str) -> None:
    typer.echo(message, err=True)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is logged, not the stream it was when the command began: a
    command run in-process (a test's CliRunner) swaps stderr for its own and closes it afterwards, and a server
    still running in that process must not log to the closed stream."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr  # under the handler's lock (Handler.handle holds it)
        super().emit(record)


def setup_logging(verbose: bool, quiet: bool) -> None:
    """The library logs; here we decide what reaches stderr."""
    logger = logging.getLogger("vl2cli")
    logger.handlers.clear()
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("vl2: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING)
    warnings.showwarning = lambda message, *_args, **_kwargs: log.warning("warning: %s", message)


class Reported:
    """A folder sink whose failures and flags also reach stderr, one line each."""

    def __init__(self, inner: Any, quiet: bool):
        self.inner, self.quiet = inner, quiet

    def done(self, item: PageItem) -> bool:
        return bool(self.inner.done(item))

    def emit(self, item: PageItem, result: PageResult, page: Page | None) -> PageResult:
        kept: PageResult = self.inner.emit(item, result, page)
        say(kept, self.quiet)
        return kept

    def close(self, sources: list[Source]) -> list[str]:
        return list(self.inner.close(sources))


def say(result: PageResult, quiet: bool) -> None:
    if not result.ok:
        err(f"vl2: {result.error or result.label}")
    elif not quiet:
        for flag in result.flags:
            err(f"vl2: warning: {result.label}: {flag.replace('_', ' ')}")
        for warning in result.fields.get("warnings") or ():  # extract: where an answer stopped, which bound bit
            err(f"vl2: warning: {result.label}: {warning}")


class StdoutSink:
    """Results to stdout as they are final: text with page separators, JSON as one list, JSON Lines per line;
    extraction CSV as one table; with --per document, one merged record per document at the end."""

    def __init__(self, job: Job, quiet: bool, sources: list[Source], per_document: bool = False):
        self.job, self.quiet, self.per_document = job, quiet, per_document
        self.several = len(sources) > 1
        self.order = {s.label: i for i, s in enumerate(sources)}  # collected output follows the inputs' order
        self.collected: list[PageResult] = []
        self.collect = job.fmt == "json" or per_document or (job.fmt == "csv" and job.task.structured)
        self.printed = 0
        # ocr: a document's pages wait for each other (furniture is found across them), then print in page order
        self.pending: dict[int, tuple[Source, list[tuple[PageItem, PageResult]]]] = {}

    def done(self, _item: PageItem) -> bool:
        return False  # stdout holds nothing from earlier runs

    def emit(self, item: PageItem, result: PageResult, _page: Page | None) -> PageResult:
        say(result, self.quiet)
        if self.collect:
            self.collected.append(result)
        elif self.job.task.whole_document:
            source, held = self.pending.setdefault(id(item.source), (item.source, []))
            held.append((item, result))
            if len(held) >= len(source.numbers):
                self._print_document(self.pending.pop(id(item.source))[1])
        else:
            self._print(item, result)
        return result

    def _print(self, item: PageItem, result: PageResult) -> None:
        if self.job.fmt == "jsonl":
            typer.echo(self.job.task.render(result, "jsonl"))
        elif result.ok:
            self._print_text(item, result)

    def _print_document(self, held: list[tuple[PageItem, PageResult]]) -> None:
        from vl2cli.document import settle_furniture
        held.sort(key=lambda pair: pair[1].page)
        settled = settle_furniture([r for _, r in held])
        if self.job.fmt == "docling":
            from vl2cli.docling import docling_json
            typer.echo(docling_json(settled, indent=None))
            return
        for (item, _), result in zip(held, settled):
            self._print(item, result)

    def _print_text(self, item: PageItem, result: PageResult) -> None:
        several = self.several or len(item.source.numbers) > 1
        if several and self.job.fmt in ("markdown", "text", "html"):  # separators belong to the document
            if self.printed:
                typer.echo("")
            typer.echo(f"<!-- page {result.page}: {result.source} -->" if self.job.fmt != "text"
                       else f"--- page {result.page}: {result.source} ---")
        # a page ends with one newline, as in the server's documents body (a table's csv ends with its own)
        typer.echo(self.job.task.render(result, self.job.fmt, self.job.keep_furniture).rstrip("\n"))
        self.printed += 1

    def close(self, sources: list[Source]) -> list[str]:
        for _, held in list(self.pending.values()):  # documents cut short (interrupted): what was read
            self._print_document(held)
        self.pending.clear()
        if not self.collect:
            return []
        from vl2cli.extract import merged_result
        results = sorted(self.collected, key=lambda r: (self.order.get(r.source, len(self.order)), r.page))
        if self.job.task.whole_document:
            from vl2cli.document import settle_furniture
            results = [r for s in sources for r in settle_furniture([r for r in results if r.source == s.label])]
        if self.per_document:
            results = [merged_result([r for r in results if r.source == s.label]) for s in sources
                       if any(r.source == s.label for r in results)]
        if self.job.fmt == "json":
            typer.echo(json.dumps([r.to_json() for r in results], ensure_ascii=False, indent=1))
        elif self.job.fmt == "csv":
            typer.echo(self.job.task.csv_lines(results, self.job.read.schema_json), nl=False)  # type: ignore[attr-defined]
        else:
            for r in results:
                typer.echo(self.job.task.render(r, self.job.fmt))
        return []


class ProgressReporter:
    """A Rich progress bar on a terminal; plain stderr lines (every 10 s) when piped or logged."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.start = self.last = time.monotonic()
        self.shown = -1  # pages done at the last plain line
        self.bar: Any = None
        self.task: Any = None
        if not quiet and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            self.bar = Progress(TextColumn("pages"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=Console(stderr=True))
            self.task = self.bar.add_task("pages", total=None, rate="")

    def __enter__(self) -> ProgressReporter:
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar:
            self.bar.stop()

    def __call__(self, done: int, total: int, tokens: int) -> None:
        if self.quiet:
            return
        elapsed = max(time.monotonic() - self.start, 1e-9)
        # no rate from the first second (a page failed in milliseconds is not "65 pages/s"); small rates keep
        # their digits (0.08 tok/s, not 0.0)
        rate = (f"{done / elapsed:.3g} pages/s, {tokens / elapsed:.3g} tok/s" if elapsed >= 1
                else "-- pages/s, -- tok/s")
        if self.bar:
            self.bar.update(self.task, completed=done, total=total or None, rate=rate)
        elif done != self.shown and (time.monotonic() - self.last >= 10 or (total and done >= total)):
            self.last, self.shown = time.monotonic(), done
            eta = (total - done) * elapsed / done if done and total else 0
            err(f"vl2: {done}/{total} pages, {rate}, ETA {int(eta // 60)}:{int(eta % 60):02d}")


def print_summary(summary: Summary, out: Path, written: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table
    data = summary.to_json(str(out))
    table = Table(title="vl2 summary", show_header=False)
    for k in ("pages_done", "pages_skipped", "pages_failed", "files_failed", "pages_left", "loops_flagged",
              "generated_tokens", "seconds"):
        table.add_row(k.replace("_", " "), str(data[k]))
    for source, pages in sorted(summary.turned.items()):
        table.add_row(f"pages turned ({source.replace('_', ' ')})", str(pages))
    for worker, pages in sorted(summary.workers.items()):
        table.add_row(f"worker {worker}", f"{pages} pages")
    table.add_row("output", str(out))
    for rel in written:
        table.add_row("", rel)
    Console(stderr=True).print(table)


def print_variants(rows: list[dict]) -> None:
    """`vl2 models` as a table on stdout."""
    from rich.console import Console
    from rich.table import Table
    table = Table(title="DeepSeek-VL2 variants (parameters: every weight, vision encoder and embeddings included; "
                        "activated: those one token uses; VRAM: weights and one page at peak, estimated; cards: "
                        "largest NF4 batch, - = does not fit)")
    for col in ("name", "hub id", "total", "activated", "download", "nf4", "bf16", "12 GB", "16 GB", "24 GB", "local"):
        table.add_column(col)
    for r in rows:
        cards = [f"batch {b}" if b else "-" for b in r["nf4_batch_on"].values()]
        table.add_row(r["name"], r["hub_id"], f"{r['total_params_b']:.1f}B", f"{r['active_params_b']:.1f}B",
                      f"{r['download_gb']:.1f} GB", f"{r['vram_nf4_gib']:.1f} GiB", f"{r['vram_bf16_gib']:.1f} GiB",
                      *cards, "yes" if r["cached"] else "no")
    Console().print(table)


def follow_up() -> str | None:
    """The next question of `ask --chat` (None at the end of input). Stdout holds answers only: the `> ` prompt
    goes to stderr, and only when a person types at a terminal (not for piped questions)."""
    if sys.stdin.isatty():
        sys.stderr.write("> ")
        sys.stderr.flush()
    line = sys.stdin.readline()
    return line.strip() if line else None


def say_loaded(loaded: Any) -> None:
    """-v: which model, where, how, and how long it took to load."""
    err(f"vl2: model {loaded.folder} on {loaded.device}, {str(loaded.dtype).removeprefix('torch.')}, "
        f"quantization {loaded.quant}, loaded in {loaded.seconds:.1f} s")
