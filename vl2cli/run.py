"""A reading command's run on a terminal: everything checked before the model loads, the one pipeline into
stdout or a folder, the model loaded only when pages are left to read, the progress, the signals and the summary.
The CLI's side (vl2cli/cli.py parses the words into a `ReadRequest`); the library's `vl2cli.read` runs the same
pipeline into a list.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from vl2cli.errors import UsageError
from vl2cli.signals import Interrupts, RayInterrupts, StartingUp
from vl2cli.terminal import ProgressReporter, Reported, StdoutSink, err, print_summary, say_loaded, setup_logging

if TYPE_CHECKING:
    from vl2cli.models import ModelChoice
    from vl2cli.options import PageOptions, ReadOptions
    from vl2cli.pages import Source
    from vl2cli.pipeline import Job, PageItem, Summary
    from vl2cli.reader import Reader
    from vl2cli.tasks import Task

log = logging.getLogger("vl2cli")


def load_reader(choice: ModelChoice, folder: Path, verbose: bool) -> Reader:
    with StartingUp():
        reader = choice.load(folder)
    if verbose:
        say_loaded(reader.loaded)
    return reader


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


def validated(req: ReadRequest) -> tuple[str, list[Source], list[str]]:
    """Everything checked before the model loads: options, prompt, query, inputs, pages, output folder."""
    from vl2cli.pages import expand_inputs
    from vl2cli.pipeline import plan_inputs
    if req.fmt == "docling":
        from vl2cli.docling import check_docling
        check_docling()
    if req.redo not in ("none", "failed", "all"):
        raise UsageError(f"--redo {req.redo!r}: expected none, failed or all")
    template = req.task.template(req.read.prompt_file, req.choice.family(), req.read.plain)
    req.choice.check_mode(req.read.ocr_mode)
    req.task.check_text(req.text)
    if req.task.needs_text:
        not_a_file(req.task.needs_text, req.text)
    if req.out is not None:
        from vl2cli.sinks import check_output_folder
        check_output_folder(req.out)
    inputs = expand_inputs(req.inputs, req.glob, exclude=req.out)
    if not inputs.files:
        raise UsageError("no input files")
    sources, notes = plan_inputs(inputs, req.pages, strict=req.named_files)
    return template, sources, notes


def not_a_file(kind: str, text: str | None) -> None:
    """The user's words come last on the command line; a file name there means the order went wrong."""
    if text and os.path.exists(text.strip()):
        raise UsageError(f"the {kind} {text!r} names an existing file: give the files first and the {kind} last, "
                         "in quotes")


def run_read(req: ReadRequest) -> None:
    """The body of ocr, table, chart, ground, caption and batch: one pipeline, a stdout or a folder sink."""
    from vl2cli.pipeline import Job, Summary, plan_work, run_work
    setup_logging(req.verbose, req.quiet)
    with StartingUp() as starting:
        template, sources, notes = validated(req)
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
            reader = load_reader(req.choice, folder, req.verbose)
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
    from vl2cli.scale import run_work_on_ray
    spec = replace(req.choice, model=str(folder.resolve()))  # every actor loads the folder the driver resolved
    with RayInterrupts() as stop, ProgressReporter(req.quiet) as progress:
        run_work_on_ray(req.ray or "local", job, work, sink, summary, spec, req.workers, req.gpus_per_worker,
                        progress, stop, req.verbose)


def _folder_sink(req: ReadRequest, job: Job) -> Any:
    from vl2cli.sinks import FolderSink
    assert req.out is not None
    return Reported(FolderSink(req.out, job, redo=req.redo, per_document=req.per_document),  # type: ignore[arg-type]
                    req.quiet)


def _report(req: ReadRequest, summary: Summary, written: list[str]) -> None:
    if summary.interrupted_by:
        resume = "; rerun the same command to resume" if req.out is not None else ""
        err(f"vl2: interrupted: {summary.pages_done} pages finished, {summary.pages_left} left{resume}")
    if req.out is not None:
        if req.summary_json:
            typer.echo(json.dumps(summary.to_json(str(req.out)), ensure_ascii=False, indent=1))
        elif not req.quiet:
            print_summary(summary, req.out, written)
    raise typer.Exit(summary.exit_code)
