"""The `vl2` command line: parse arguments, call the library, print. Results to stdout, the rest to stderr.

One error boundary (`Vl2Group.invoke`) turns a known error into its one line and exit code, Ctrl-C into
130, and anything else into one line plus a pointer to -v.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from vl2cli.errors import UsageError, Vl2Error
from vl2cli.flags import plain_help_types, with_options

if TYPE_CHECKING:
    from vl2cli.options import PageOptions, ReadOptions
    from vl2cli.pages import Page, Source
    from vl2cli.pipeline import Job, PageItem, StopFlag, Summary
    from vl2cli.reader import Reader
    from vl2cli.results import PageResult
    from vl2cli.tasks import Task

DRAIN_SECONDS = float(os.environ.get("VL2_DRAIN_SECONDS", "60"))  # how long a signal lets pages in flight finish
log = logging.getLogger("vl2cli")


def _typer_error() -> type[Exception]:
    """The base of the usage errors typer prints itself: TyperException from typer 0.29, (vendored) click's
    ClickException before it (docling-core pins typer<0.27, so vl2 runs on both)."""
    bases = {cls.__name__: cls for cls in typer.BadParameter.__mro__}
    return bases.get("TyperException") or bases["ClickException"]


TyperError = _typer_error()


def err(message: str) -> None:
    typer.echo(message, err=True)


class Vl2Group(TyperGroup):
    """The one error boundary of the CLI."""

    verbose = False  # -v anywhere on the command line: tracebacks at the boundary

    def main(self, args: Any = None, *rest: Any, **kwargs: Any) -> Any:
        words = list(args) if args is not None else sys.argv[1:]
        self.verbose = any(w in ("-v", "--verbose") for w in words)
        plain_help_types(self)
        return super().main(args, *rest, **kwargs)

    def invoke(self, ctx: Any) -> Any:  # typer's vendored click Context
        verbose = self.verbose
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, TyperError):  # typer's own usage errors and exits print themselves
            raise
        except Vl2Error as exc:
            _traceback_if(verbose)
            err(f"vl2: error: {exc}")
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err("vl2: interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:
            _traceback_if(verbose)
            err(f"vl2: error: {type(exc).__name__}: {str(exc)[:300]}" + ("" if verbose else
                                                                         " (run with -v for the traceback)"))
            raise typer.Exit(1) from None


def _traceback_if(verbose: bool) -> None:
    if verbose:
        import traceback
        traceback.print_exc()


def _package_version() -> str:
    try:
        return version("vl2cli")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "unknown"


app = typer.Typer(cls=Vl2Group, add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Read documents locally with DeepSeek-VL2: OCR, questions, tables, charts, grounding.")
models_app = typer.Typer(help="List the DeepSeek-VL2 variants and download them.", invoke_without_command=True,
                         context_settings={"help_option_names": ["-h", "--help"]})
app.add_typer(models_app, name="models")


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"vl2 {_package_version()}")
        raise typer.Exit()


@app.callback()
def _root(version_flag: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                                     help="Print the version and exit.")] = False) -> None:
    """Read documents locally with DeepSeek-VL2: OCR, questions, tables, charts, grounding."""


@dataclass(frozen=True)
class ModelChoice:
    model: str
    quant: str
    device: str
    dtype: str
    revision: str | None
    offline: bool

    def resolve(self) -> Path:
        from vl2cli.engine.hub import resolve_model
        return resolve_model(self.model, revision=self.revision, offline=self.offline or None)

    def kind(self) -> str:
        """"ocr" for DeepSeek-OCR, "ocr2" for DeepSeek-OCR 2 (told by alias, hub id or a local folder's config),
        else "vl2"."""
        for kind, hub_id in (("ocr", "deepseek-ai/DeepSeek-OCR"), ("ocr2", "deepseek-ai/DeepSeek-OCR-2")):
            if self.model in (kind, hub_id, "hf:" + hub_id):
                return kind
        folder = Path(self.model).expanduser()
        if (folder / "config.json").is_file():
            from vl2cli.engine.config import OCR2Config, OCRConfig, load_any_config
            cfg = load_any_config(folder)
            return "ocr" if isinstance(cfg, OCRConfig) else "ocr2" if isinstance(cfg, OCR2Config) else "vl2"
        return "vl2"

    def family(self) -> str:
        """The prompt family: "ocr" for DeepSeek-OCR and DeepSeek-OCR 2 (the same prompt forms), else "vl2"."""
        return "vl2" if self.kind() == "vl2" else "ocr"

    def load(self, folder: Path, verbose: bool) -> Reader:
        from vl2cli.engine.loading import load_model
        from vl2cli.reader import Reader
        loaded = load_model(folder, device=self.device, dtype=self.dtype, quant=self.quant)
        if verbose:
            err(f"vl2: model {loaded.folder} on {loaded.device}, {str(loaded.dtype).removeprefix('torch.')}, "
                f"quantization {loaded.quant}, loaded in {loaded.seconds:.1f} s")
        return Reader(loaded)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is logged, not the stream it was when the command began: a
    command run in-process (a test's CliRunner) swaps stderr for its own and closes it afterwards, and a server
    still running in that process must not log to the closed stream."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr  # under the handler's lock (Handler.handle holds it)
        super().emit(record)


def _setup_logging(verbose: bool, quiet: bool) -> None:
    """The library logs; here we decide what reaches stderr."""
    logger = logging.getLogger("vl2cli")
    logger.handlers.clear()
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("vl2: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING)
    warnings.showwarning = lambda message, *_args, **_kwargs: log.warning("warning: %s", message)


# ---------------------------------------------------------------------- the reading commands


@dataclass(frozen=True)
class ReadRequest:
    task: Task
    inputs: list[str]
    text: str | None
    fmt: str
    out: Path | None
    choice: ModelChoice
    read: ReadOptions
    pages: PageOptions
    glob: str | None = None
    redo: str = "none"
    named_files: bool = True  # commands on named files: a missing file is a usage error
    verbose: bool = False
    quiet: bool = False
    summary_json: bool = False
    auto_batch: bool = False  # no --batch-size given: choose from the device's free memory
    per_document: bool = False  # extract: one merged record per document
    keep_furniture: bool = False  # ocr: page headers, footers and numbers stay in the text outputs
    ray: str | None = None  # batch --ray: local, auto or a cluster address
    workers: int = 2
    gpus_per_worker: float | None = None


def _validated(req: ReadRequest) -> tuple[str, list[Source], list[str]]:
    """Everything checked before the model loads: options, prompt, query, inputs, pages, output folder."""
    from vl2cli.pages import expand_inputs
    from vl2cli.pipeline import plan_inputs
    if req.fmt not in req.task.formats:
        raise UsageError(f"--format {req.fmt!r}: {req.task.name} writes {', '.join(req.task.formats)}")
    if req.fmt == "docling":
        from vl2cli.docling import check_docling
        check_docling()
    if req.redo not in ("none", "failed", "all"):
        raise UsageError(f"--redo {req.redo!r}: expected none, failed or all")
    template = req.task.template(req.read.prompt_file, req.choice.family(), req.read.plain)
    if req.read.ocr_mode != "gundam" and req.choice.kind() == "ocr2":
        from vl2cli.engine.ocr2 import ocr2_mode_refused
        raise UsageError(ocr2_mode_refused(req.read.ocr_mode))
    req.task.check_text(req.text)
    if req.task.needs_text:
        _not_a_file(req.task.needs_text, req.text)
    if req.out is not None:
        from vl2cli.sinks import check_output_folder
        check_output_folder(req.out)
    inputs = expand_inputs(req.inputs, req.glob, exclude=req.out)
    if not inputs.files:
        raise UsageError("no input files")
    sources, notes = plan_inputs(inputs, req.pages, strict=req.named_files)
    return template, sources, notes


def _not_a_file(kind: str, text: str | None) -> None:
    """The user's words come last on the command line; a file name there means the order went wrong."""
    if text and os.path.exists(text.strip()):
        raise UsageError(f"the {kind} {text!r} names an existing file: give the files first and the {kind} last, "
                         "in quotes")


def _read(req: ReadRequest) -> None:
    """The body of ocr, table, chart, ground, caption and batch: one pipeline, a stdout or a folder sink."""
    from vl2cli.pipeline import Job, Summary, plan_work, run_work
    _setup_logging(req.verbose, req.quiet)
    with StartingUp() as starting:
        template, sources, notes = _validated(req)
        starting.check()
        folder = req.choice.resolve()
    for note in notes:
        log.warning("%s", note)
    job = Job(req.task, req.read, req.pages, req.fmt, str(folder.resolve()), template, req.keep_furniture)
    sink: Any = (_folder_sink(req, job) if req.out is not None
                 else StdoutSink(job, req.quiet, sources, req.per_document))
    summary = Summary()
    try:
        work = plan_work(job, sources, sink, summary)
        if work and req.ray:
            _read_on_ray(req, job, work, sink, summary, folder)
        elif work:
            with StartingUp():
                reader = req.choice.load(folder, req.verbose)
            reader.check_mode(req.read.ocr_mode)  # refused before any page is read
            if req.auto_batch:
                job = replace(job, read=replace(job.read, batch_size=reader.auto_batch_size()))
                log.info("batch size %d", job.read.batch_size)
            with Interrupts(reader) as stop, ProgressReporter(req.quiet or req.out is None) as progress:
                run_work(reader, job, work, sink, summary, progress, stop)
    finally:
        written = sink.close(sources)
    _report(req, summary, written)


def _read_on_ray(req: ReadRequest, job: Job, work: list[PageItem], sink: Any, summary: Summary, folder: Path) -> None:
    from vl2cli.scale import ModelSpec, run_work_on_ray
    spec = ModelSpec(str(folder.resolve()), req.choice.device, req.choice.dtype, req.choice.quant)
    with RayInterrupts() as stop, ProgressReporter(req.quiet) as progress:
        run_work_on_ray(req.ray or "local", job, work, sink, summary, spec, req.workers, req.gpus_per_worker,
                        progress, stop, req.verbose)


def _folder_sink(req: ReadRequest, job: Job) -> Any:
    from vl2cli.sinks import FolderSink
    assert req.out is not None
    return Reported(FolderSink(req.out, job, redo=req.redo, per_document=req.per_document),  # type: ignore[arg-type]
                    req.quiet)


class Reported:
    """A folder sink whose failures and flags also reach stderr, one line each."""

    def __init__(self, inner: Any, quiet: bool):
        self.inner, self.quiet = inner, quiet

    def done(self, item: PageItem) -> bool:
        return bool(self.inner.done(item))

    def emit(self, item: PageItem, result: PageResult, page: Page | None) -> PageResult:
        kept: PageResult = self.inner.emit(item, result, page)
        _say(kept, self.quiet)
        return kept

    def close(self, sources: list[Source]) -> list[str]:
        return list(self.inner.close(sources))


def _say(result: PageResult, quiet: bool) -> None:
    if not result.ok:
        err(f"vl2: {result.error or result.label}")
    elif not quiet:
        for flag in result.flags:
            err(f"vl2: warning: {result.label}: {flag.replace('_', ' ')}")
        for warning in result.fields.get("warnings") or ():  # extract: where an answer stopped, which bound bit
            err(f"vl2: warning: {result.label}: {warning}")


def _report(req: ReadRequest, summary: Summary, written: list[str]) -> None:
    if summary.interrupted_by:
        resume = "; rerun the same command to resume" if req.out is not None else ""
        err(f"vl2: interrupted: {summary.pages_done} pages finished, {summary.pages_left} left{resume}")
    if req.out is not None:
        if req.summary_json:
            typer.echo(json.dumps(summary.to_json(str(req.out)), ensure_ascii=False, indent=1))
        elif not req.quiet:
            _print_summary(summary, req.out, written)
    raise typer.Exit(summary.exit_code)


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
        _say(result, self.quiet)
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
        typer.echo(self.job.task.render(result, self.job.fmt, self.job.keep_furniture))
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


class StartingUp:
    """Ctrl-C while a command starts: imports, resolving and loading the model. Python's own handler raises
    KeyboardInterrupt wherever the main thread is, and in the middle of a library's import or a C++ call that goes
    wrong: numpy's import swallows it (so a server went on serving), pydantic turns it into a SchemaError, torch's
    pybind11 aborts the process. Here the first Ctrl-C is only noted and acted on when the step in progress ends
    (KeyboardInterrupt, exit 130); a second one leaves at once (nothing is written yet)."""

    def __init__(self) -> None:
        self.received = False
        self.previous: Any = None

    def __enter__(self) -> StartingUp:
        if _in_main_thread():
            self.previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, _signum: int, _frame: object) -> None:
        if self.received:
            os.write(2, b"vl2: interrupted\n")  # os.write: safe whatever the main thread was writing
            os._exit(130)
        self.received = True
        os.write(2, b"vl2: interrupted: stopping once the start-up step in progress ends (again to stop now)\n")

    def check(self) -> None:
        """A step boundary: stop here if Ctrl-C came during the step."""
        if self.received:
            raise KeyboardInterrupt

    def __exit__(self, exc_type: object, *_rest: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        if exc_type is None:
            self.check()


class Interrupts:
    """SIGINT/SIGTERM: the first lets the pages in flight finish (at most DRAIN_SECONDS), the second stops now."""

    def __init__(self, reader: Reader):
        from vl2cli.pipeline import StopFlag
        self.reader = reader
        self.flag: StopFlag = StopFlag()
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if _in_main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._on_signal)
        return self.flag

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.flag.signal:
            self.reader.stop_within(0)
            err("vl2: second signal: stopping now")
            return
        self.flag.signal = signum
        self.reader.stop_within(DRAIN_SECONDS)
        err(f"vl2: {signal.Signals(signum).name} received: finishing the pages in flight (at most "
            f"{DRAIN_SECONDS:.0f} s; again to stop now), then stopping")

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class RayInterrupts(Interrupts):
    """--ray: the first signal stops taking results (pages in flight on the workers are dropped, not recorded: a rerun
    reads them); the second leaves at once."""

    def __init__(self) -> None:
        from vl2cli.pipeline import StopFlag
        self.flag, self.previous = StopFlag(), {}

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.flag.signal:
            raise KeyboardInterrupt
        self.flag.signal = signum
        err(f"vl2: {signal.Signals(signum).name} received: stopping after the page being written (again to stop now)")


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


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


def _print_summary(summary: Summary, out: Path, written: list[str]) -> None:
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


def _request(task_name: str, inputs: list[str], words: dict[str, Any], text: str | None = None,
             **rest: Any) -> ReadRequest:
    """A reading command's words (the option table's, by name) as one request, resolved as the server and the
    library resolve them."""
    from vl2cli.extract import load_schema_file
    from vl2cli.resolve import resolve_options
    if words["per"] not in ("page", "document"):
        raise UsageError(f"--per {words['per']!r}: expected page or document")
    fmt = "json" if words["json_out"] and words["out"] is None else words["fmt"]
    schema = load_schema_file(words["schema"]) if words["schema"] is not None else None
    resolved = resolve_options(task_name, {**words, "question": text, "fmt": fmt, "schema": schema})
    choice = ModelChoice(**{name: words[name] for name in ModelChoice.__dataclass_fields__})
    return ReadRequest(resolved.task, inputs, text, resolved.fmt, words["out"], choice, resolved.read, resolved.pages,
                       auto_batch=words["batch_size"] is None, per_document=words["per"] == "document",
                       redo=words["redo"], verbose=words["verbose"], quiet=words["quiet"],
                       summary_json=words["json_out"], keep_furniture=words["keep_furniture"], **rest)


def _task_command(name: str, help_text: str, needs: str | None = None) -> None:
    inputs_help = "PDFs, images, folders, or - for stdin" + (f"; the {needs} comes last." if needs else ".")

    def command(inputs: list[str], **words: Any) -> None:
        text = None
        if needs:
            if len(inputs) < 2:
                raise UsageError(f"{name}: give the input file(s) and then the {needs}")
            *inputs, text = inputs
        _read(_request(name, inputs, words, text))

    command.__doc__ = help_text
    command.__annotations__["inputs"] = Annotated[list[str], typer.Argument(help=inputs_help)]
    app.command(name)(with_options(name)(command))


_task_command("ocr", "Page text as markdown or plain text.\n\nExample: vl2 ocr samples/report.pdf --pages 1-2")
_task_command("table", "Tables as JSON (or csv/markdown/html).\n\nExample: vl2 table samples/invoice.png -f csv")
_task_command("chart", "Chart description plus its data table.\n\nExample: vl2 chart samples/report.pdf --pages 3")
_task_command("ground", "Boxes of the described object, in pixels and 0-999.\n\n"
              'Example: vl2 ground samples/objects.png "the red circle" --out boxes/', needs="query")
_task_command("caption", "Grounded caption: every object mentioned, with boxes.\n\n"
              "Example: vl2 caption samples/objects.png --out caps/")
_task_command("extract", "Fields from a JSON Schema, always valid JSON (constrained decoding).\n\n"
              'Example: vl2 extract samples/invoice.png --fields "invoice_number, total:number, date:date"')


@app.command()
@with_options("batch")
def batch(
    inputs: Annotated[list[str], typer.Argument(help="Folders, files or globs.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (required; resumable).")],
    task: Annotated[str, typer.Option(help="ocr, table, chart, ask, ground, caption or extract.")] = "ocr",
    glob: Annotated[str | None, typer.Option(help="Only files matching this pattern in folders.")] = None,
    *,
    ray: Annotated[str | None, typer.Option("--ray", help="Read on Ray Data: local (a Ray instance on this machine), "
                                                          "auto (the cluster this machine is in) or an address.")] = None,
    workers: Annotated[int, typer.Option(help="--ray: model actors (each loads the model once).")] = 2,
    gpus_per_worker: Annotated[float | None, typer.Option(help="--ray: GPUs per actor (default 1 when the cluster "
                                                               "has GPUs, else CPU).")] = None,
    **words: Any,
) -> None:
    """Read every page of many documents into --out; rerun to resume.

    Example: vl2 batch samples/ --task table --out results/
    """
    from vl2cli.tasks import get_task
    needs = get_task(task).needs_text
    if needs and not (words["question"] or "").strip():
        raise UsageError(f"batch --task {task}: give the {needs} with --question \"...\"")
    _read(_request(task, inputs, {**words, "out": out}, words["question"], glob=glob, named_files=False, ray=ray,
                   workers=workers, gpus_per_worker=gpus_per_worker))


# ---------------------------------------------------------------------- ask


@app.command()
@with_options("ask")
def ask(
    inputs: Annotated[list[str], typer.Argument(help="Image(s) or PDF page(s), then the question.")],
    chat: Annotated[bool, typer.Option("--chat", help="Keep asking follow-ups.")] = False,
    **words: Any,
) -> None:
    """Ask a question about one or more images or pages (all go into one prompt).

    Example: vl2 ask samples/invoice.png "What is the total?"
    """
    from vl2cli.pages import expand_inputs, render_pages
    from vl2cli.pipeline import plan_inputs
    from vl2cli.resolve import resolve_options
    from vl2cli.tasks import get_task
    verbose, quiet, json_out, out = words["verbose"], words["quiet"], words["json_out"], words["out"]
    _setup_logging(verbose, quiet)
    if len(inputs) < 2:
        raise UsageError("ask: give the input file(s) and then the question")
    *files, question = inputs
    get_task("ask").check_text(question)
    _not_a_file("question", question)
    resolved = resolve_options("ask", {**words, "question": question}, asking=True)
    opts, page_opts = resolved.read, resolved.pages
    if out is not None:
        from vl2cli.sinks import check_output_folder
        check_output_folder(out)
    sources, notes = plan_inputs(expand_inputs(files), page_opts, strict=True)
    bad = next((s for s in sources if s.error), None)
    if bad is not None:
        raise Vl2Error(bad.error or bad.label)
    for note in notes:
        log.warning("%s", note)
    images = [page.image for source in sources for page in render_pages(source, page_opts)]
    choice = ModelChoice(**{name: words[name] for name in ModelChoice.__dataclass_fields__})
    with StartingUp():
        reader = choice.load(choice.resolve(), verbose)
    reader.check_mode(opts.ocr_mode)
    labels = [s.label for s in sources]
    result = _answer(reader, images, question, opts, [], labels, json_out)
    if out is not None:
        _write_answer(out, sources, result.to_json(), quiet)
    history = [(question, result.answer)]
    while chat:
        follow = _follow_up()
        if follow in (None, "", "exit", "quit"):
            break
        result = _answer(reader, images, follow, opts, history, labels, json_out)
        history.append((follow, result.answer))


def _follow_up() -> str | None:
    """The next question of `ask --chat` (None at the end of input). Stdout holds answers only: the `> ` prompt
    goes to stderr, and only when a person types at a terminal (not for piped questions)."""
    if sys.stdin.isatty():
        sys.stderr.write("> ")
        sys.stderr.flush()
    line = sys.stdin.readline()
    return line.strip() if line else None


def _answer(reader: Reader, images: list, question: str, opts: ReadOptions, history: list[tuple[str, str]],
            labels: list[str], json_out: bool) -> Any:
    """Ask, streaming the answer to stdout as it is generated (unless the output is JSON)."""
    from vl2cli.reader import TokenStream
    stream = None if json_out else TokenStream(reader, lambda piece: typer.echo(piece, nl=False))
    result = reader.ask(images, question, opts, history=history, inputs=labels, on_token=stream)
    if stream is not None:
        typer.echo(result.answer[len(stream.shown):])  # whatever was held back, then the newline
    else:
        typer.echo(json.dumps(result.to_json(), ensure_ascii=False))
    for flag in result.flags:
        err(f"vl2: warning: {flag.replace('_', ' ')}")
    return result


def _write_answer(out: Path, sources: list[Source], record: dict, quiet: bool) -> None:
    """`<first input>.ask-<digest of inputs and question>.json`: another question never overwrites this one."""
    import hashlib

    from vl2cli.sinks import safe_name
    from vl2cli.writers import atomic_write_text
    what = json.dumps([[s.digest for s in sources], record["question"]])
    name = f"{safe_name(sources[0].name or 'input')}.ask-{hashlib.sha256(what.encode()).hexdigest()[:8]}.json"
    atomic_write_text(out / name, json.dumps(record, ensure_ascii=False, indent=1) + "\n")
    if not quiet:
        err(f"vl2: wrote {out / name}")


# ---------------------------------------------------------------------- server

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@app.command()
@with_options("serve")
def serve(
    *,
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback needs --api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free port).")] = 8000,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="VL2_API_KEY", show_envvar=True,
                                                help="Bearer token every endpoint but /health requires.")] = None,
    allow_remote_images: Annotated[bool, typer.Option(help="Fetch http(s) image URLs (off: data URLs only).")] = False,
    max_batch: Annotated[int, typer.Option(help="Requests decoded together (continuous batching).")] = 8,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait; beyond it, 429.")] = 64,
    max_upload_mb: Annotated[int, typer.Option(help="Largest request body or upload, in MB; beyond it, 413.")] = 50,
    max_images: Annotated[int, typer.Option(help="Images per chat request; beyond it, 400.")] = 8,
    max_pages: Annotated[int, typer.Option(help="Pages per document request; beyond it, 413.")] = 200,
    drain_seconds: Annotated[float, typer.Option(help="On Ctrl-C, how long running requests may finish.")] = 30.0,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info (a line per request: method, path, "
                                                               "status, tokens, seconds), warning or error.")] = "info",
    allowed_origins: Annotated[list[str] | None, typer.Option(
        "--allowed-origins", help="Web origins (https://app.example.com) whose pages may use the server from a "
                                  "browser; repeat or separate with commas. Other sites' pages are refused.")] = None,
    max_tokens_policy: Annotated[str, typer.Option(
        help="A max_tokens beyond what the context leaves: clamp (lowered to it; finish_reason 'length' if the "
             "answer reaches it) or refuse (OpenAI's 400 context_length_exceeded).")] = "clamp",
    **words: Any,
) -> None:
    """An OpenAI-compatible server (chat completions with images, streaming, JSON schemas), document endpoints,
    metrics and a page to drop files on.

    Example: vl2 serve --model tiny --port 8000, then open http://127.0.0.1:8000/
    """
    verbose, max_pixels = words["verbose"], words["max_pixels"]
    _setup_logging(verbose, False)
    levels = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
    if log_level not in levels:
        raise UsageError(f"--log-level {log_level!r}: expected {', '.join(levels)}")
    if not verbose:
        logging.getLogger("vl2cli").setLevel(levels[log_level])
    if host not in LOOPBACK and not api_key:
        raise UsageError(f"--host {host}: binding beyond this machine needs --api-key (or VL2_API_KEY)")
    for name, value in (("--max-batch", max_batch), ("--max-queue", max_queue), ("--max-upload-mb", max_upload_mb),
                        ("--max-images", max_images), ("--max-pages", max_pages)):
        if value < 1:
            raise UsageError(f"{name} {value}: expected a positive number")
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port}: expected 0..65535")
    if max_tokens_policy not in ("clamp", "refuse"):
        raise UsageError(f"--max-tokens-policy {max_tokens_policy}: expected clamp or refuse")
    with StartingUp() as starting:  # then uvicorn handles the signals: the first drains, the second stops now
        try:
            from vl2cli.serve.app import ServeSettings, model_names
            from vl2cli.serve.app import serve as run_server
            from vl2cli.serve.chat import Limits
            from vl2cli.serve.guard import check_origin
        except ImportError as exc:
            raise UsageError(f"vl2 serve needs the server extra ({exc.name} is missing): pip install "
                             "'vl2cli[serve]'") from None
        try:
            origins = tuple(check_origin(o.strip()) for given in allowed_origins or () for o in given.split(",")
                            if o.strip())
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        starting.check()
        choice = ModelChoice(**{name: words[name] for name in ModelChoice.__dataclass_fields__})
        folder = choice.resolve()
        starting.check()
        reader = choice.load(folder, verbose)
    model_id, aliases = model_names(choice.model, folder)
    limits = Limits(max_body_bytes=max_upload_mb * 1024 * 1024, max_image_pixels=max_pixels, max_images=max_images,
                    max_pages=max_pages, max_queue=max_queue, allow_remote_images=allow_remote_images)
    settings = ServeSettings(model_id, aliases, api_key, limits, max_batch, drain_seconds, origins,
                             max_tokens_policy=max_tokens_policy)
    run_server(reader, settings, host, port, ready=lambda url: err(f"vl2: serving {model_id} at {url}/ "
                                                                   "(Ctrl-C drains and stops)"))


# ---------------------------------------------------------------------- tools


@app.command()
@with_options("trace")
def trace(
    model: Annotated[str, typer.Option("--model", "-m", help="Checkpoint folder (DeepSeek-VL2, DeepSeek-OCR or "
                                                             "DeepSeek-OCR 2).")],
    prompt: Annotated[str, typer.Option(help="User message; <image> marks each image; \\n is a newline.")],
    out: Annotated[str, typer.Option(help="Output prefix: PREFIX.json + PREFIX.npz.")],
    image: Annotated[list[Path] | None, typer.Option("--image", help="Image files, in <image> order.")] = None,
    *,
    all_positions: Annotated[bool, typer.Option(help="Store logits at every prompt position.")] = False,
    ocr_mode: Annotated[str | None, typer.Option("--ocr-mode", help="DeepSeek-OCR checkpoints: tiny, small, base, "
                                                                    "large or gundam.")] = None,
    **words: Any,
) -> None:
    """Write the parity trace of one prompt (tokens, tiles, logits, greedy ids); also a debugging view.

    Example: vl2 trace --model ckpt/ --image page.png --prompt "<image>\\nConvert the document to markdown." --out t
    """
    from vl2cli.engine.config import OCR2Config, OCRConfig, load_any_config
    from vl2cli.engine.hub import resolve_model
    max_new_tokens, dtype, device = words["max_new_tokens"], words["dtype"], words["device"]
    _setup_logging(words["verbose"], False)
    text = prompt.replace("\\n", "\n")
    cfg = load_any_config(resolve_model(model))
    if isinstance(cfg, OCRConfig | OCR2Config):
        _trace_ocr(model, text, out, image or [], max_new_tokens, dtype, device, ocr_mode,
                   isinstance(cfg, OCR2Config))
        return
    from vl2cli.engine.loading import load_model
    from vl2cli.engine.trace import load_reference_image, run_trace
    loaded = load_model(model, device=device, dtype=dtype, quant="none")
    images = [load_reference_image(p) for p in image or []]
    prepared = loaded.processor.prepare_prompt(text, images)
    meta = run_trace(loaded, prepared, max_new_tokens, out, all_positions)
    err(f"prompt tokens {len(meta['input_ids'])}, image spans {meta['image_spans']}, "
        f"tiles {meta['images_spatial_crop']}, generated {len(meta['generated_ids'])}")
    typer.echo(f"{out}.json")


def _trace_ocr(model: str, prompt: str, out: str, images: list[Path], max_new_tokens: int, dtype: str, device: str,
               mode: str | None, second: bool) -> None:
    """DeepSeek-OCR's trace (`ocr-vision-oracle-trace/1`), or DeepSeek-OCR 2's (`ocr2-vision-oracle-trace/1`)."""
    from vl2cli.engine.loading import load_model
    from vl2cli.engine.ocr2 import OCR2_MODE, ocr2_mode_refused
    from vl2cli.engine.ocr2_trace import run_ocr2_trace
    from vl2cli.engine.ocr_trace import run_ocr_trace
    if len(images) != 1:
        raise UsageError(f"a DeepSeek-OCR{' 2' if second else ''} trace takes exactly one --image")
    if second and mode not in (None, OCR2_MODE):
        raise UsageError(ocr2_mode_refused(mode))
    loaded = load_model(model, device=device, dtype=dtype, quant="none")
    meta = (run_ocr2_trace(loaded, str(images[0]), prompt, max_new_tokens, out) if second
            else run_ocr_trace(loaded, str(images[0]), prompt, mode or "gundam", max_new_tokens, out))
    err(f"prompt tokens {meta['num_tokens']}, image tokens {meta['num_image_positions']}, "
        f"tiles {meta['images_spatial_crop']}, generated {len(meta['generated_ids'])}")
    typer.echo(f"{out}.json")


@models_app.callback()
def models(ctx: typer.Context,
           json_out: Annotated[bool, typer.Option("--json", help="The table as JSON on stdout.")] = False) -> None:
    """The three variants: parameters, download size, estimated VRAM, and whether each is downloaded."""
    if ctx.invoked_subcommand:
        return
    from vl2cli.engine.hub import cached_model_path
    from vl2cli.engine.memory import variant_table
    rows = variant_table()
    for row in rows:
        path = cached_model_path(row["name"])
        row["cached"] = str(path) if path else None
    if json_out:
        typer.echo(json.dumps(rows, indent=1))
        return
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


@models_app.command("download")
@with_options("models download")
def models_download(name: Annotated[str, typer.Argument(help="tiny, small, base, ocr (DeepSeek-OCR) or a hub id "
                                                                                "(ORG/NAME).")],
                    **words: Any) -> None:
    """Download a variant into the Hugging Face cache (safetensors and configs only).

    Example: vl2 models download small
    """
    from vl2cli.engine.hub import resolve_model
    typer.echo(str(resolve_model(name, revision=words["revision"], offline=False, explicit=True)))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # before a command started (imports): the boundary is not in place yet
        err("vl2: interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
