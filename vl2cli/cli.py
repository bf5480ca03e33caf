"""The `vl2` command line: parse arguments, call the library, print. Results to stdout, the rest to stderr."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from vl2cli.errors import UsageError, Vl2Error

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Read documents locally with DeepSeek-VL2: OCR, questions, tables, charts, grounding.")
models_app = typer.Typer(help="List the DeepSeek-VL2 variants and download them.", invoke_without_command=True)
app.add_typer(models_app, name="models")

Model = Annotated[str, typer.Option("--model", "-m", help="Checkpoint folder, hub id, or tiny/small/base.")]
Quant = Annotated[str, typer.Option(help="auto (nf4 on CUDA, none on CPU), nf4, int8 or none.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")]
Dtype = Annotated[str, typer.Option(help="auto, float32, bfloat16, float16.")]
MaxNew = Annotated[int, typer.Option("--max-new-tokens", help="Answer budget per page.")]
Temp = Annotated[float, typer.Option(help="0 = greedy; the model card advises <= 0.7.")]
PromptFile = Annotated[str | None, typer.Option("--prompt-file", help="Use this prompt instead of prompts/TASK.txt.")]
Out = Annotated[Path | None, typer.Option("--out", "-o", help="Write outputs into this folder.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Tracebacks and details on stderr.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only results and errors.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
Pages = Annotated[str | None, typer.Option(help="Pages to read, e.g. 1-3,7.")]
Dpi = Annotated[int, typer.Option(help="PDF render resolution (default 144, see README).")]
Password = Annotated[str | None, typer.Option(help="Password of encrypted PDFs.")]
Revision = Annotated[str | None, typer.Option(help="Pin a hub revision (commit or tag).")]
Offline = Annotated[bool, typer.Option("--offline", help="Never touch the network (also HF_HUB_OFFLINE=1).")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Pages read together.")]
Split = Annotated[str, typer.Option(help="auto, never, or N bands for dense pages.")]
TextLayer = Annotated[str, typer.Option("--text-layer", help="Born-digital PDFs: off, hint or only.")]
MaxPixels = Annotated[int, typer.Option("--max-pixels", help="Refuse pages above this many pixels.")]

_state = {"verbose": False}


def err(message: str) -> None:
    typer.echo(message, err=True)


def _fail(exc: BaseException) -> typer.Exit:
    if _state["verbose"]:
        import traceback
        traceback.print_exception(exc)
    code = getattr(exc, "exit_code", 1)
    message = str(exc) if isinstance(exc, Vl2Error) else f"{type(exc).__name__}: {exc}"
    err(f"vl2: error: {message}")
    return typer.Exit(code)


def _reader(model, device, dtype, quant, revision=None, offline=False):
    from vl2cli.api import Reader
    return Reader(model, device=device, dtype=dtype, quant=quant, revision=revision, offline=offline or None)


def _params(max_new_tokens: int, temperature: float):
    from vl2cli.engine.generation import SamplingParams
    if temperature < 0:
        raise UsageError("--temperature must be >= 0")
    if max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be >= 1")
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=0.9 if temperature else 1.0,
                          seed=0 if temperature else None)


def _run_task(task_name: str, inputs: list[str], text: str | None, *, model, quant, device, dtype, max_new_tokens,
              temperature, prompt_file, out, fmt, verbose, quiet, json_out, pages, dpi, password, revision, offline,
              batch_size, split, text_layer, max_pixels) -> None:
    """Shared body of ocr/table/chart/ground: read every page, print results, optionally write files."""
    _state["verbose"] = verbose
    try:
        from vl2cli.api import ReadOptions
        from vl2cli.batch import BatchOptions, run_batch
        from vl2cli.pages import expand_inputs
        from vl2cli.tasks import get_task

        task = get_task(task_name)
        if fmt not in task.formats:
            raise UsageError(f"--format {fmt!r}: {task_name} writes {', '.join(task.formats)}")
        _check_choice("--split", split, ("auto", "never"), allow_int=True)
        _check_choice("--text-layer", text_layer, ("off", "hint", "only"))
        task.prompt(1, text, prompt_file)  # a missing question or unreadable prompt file fails before loading
        sources = expand_inputs(inputs, exclude=out)
        if not sources:
            raise UsageError("no input files")
        reader = _reader(model, device, dtype, quant, revision, offline)
        read_opts = ReadOptions(_params(max_new_tokens, temperature), text=text, prompt_file=prompt_file,
                                split=split, text_layer=text_layer, batch_size=batch_size)
        if out is not None:
            with ProgressReporter(quiet) as progress:
                summary = run_batch(reader, task, sources, read_opts,
                                    BatchOptions(out=out, fmt=fmt, pages=pages, dpi=dpi, password=password,
                                                 max_pixels=max_pixels), log=progress.log, progress=progress)
            _print_summary(summary, quiet, json_out, out)
            raise typer.Exit(summary.exit_code)
        failed = _print_pages(reader, task, sources, read_opts, fmt, json_out, pages, dpi, password, max_pixels,
                              text_layer, quiet)
        raise typer.Exit(1 if failed else 0)
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        err("vl2: interrupted")
        raise typer.Exit(130) from None
    except Exception as exc:
        raise _fail(exc) from None


class ProgressReporter:
    """A Rich progress bar on a terminal; plain stderr lines (every 10 s) when piped or logged."""

    def __init__(self, quiet: bool):
        import time
        self.quiet, self.clock = quiet, time.monotonic
        self.start = self.last = self.clock()
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            self.bar = Progress(TextColumn("pages"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=Console(stderr=True))
            self.task = self.bar.add_task("pages", total=None, rate="")

    def __enter__(self):
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()

    def log(self, message: str) -> None:
        if self.bar:
            self.bar.console.print(message, markup=False, highlight=False)
        else:
            err(message)

    def __call__(self, done: int, total: int, tokens: int) -> None:
        if self.quiet:
            return
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = f"{tokens / elapsed:.1f} tok/s"
        if self.bar:
            self.bar.update(self.task, completed=done, total=total or None, rate=rate)
        elif self.clock() - self.last >= 10 or (total and done >= total):
            self.last = self.clock()
            eta = (total - done) * elapsed / done if done and total else 0
            err(f"vl2: {done}/{total} pages, {rate}, ETA {int(eta // 60)}:{int(eta % 60):02d}")


def _check_choice(flag: str, value: str, choices: tuple[str, ...], allow_int: bool = False) -> None:
    if value in choices or (allow_int and value.isdigit() and 1 <= int(value) <= 16):
        return
    raise UsageError(f"{flag} {value!r}: expected {', '.join(choices)}" + (" or a number 1-16" if allow_int else ""))


def _print_pages(reader, task, sources, read_opts, fmt, json_out, pages, dpi, password, max_pixels, text_layer,
                 quiet) -> int:
    """Read pages as they are rendered, a batch at a time, printing each result as soon as it is ready."""
    from vl2cli.errors import InputError
    from vl2cli.pages import count_pages, iter_pages

    failed = 0
    records = []

    def flush(batch) -> None:
        nonlocal failed
        for record in reader.read(task, batch, read_opts):
            where = f"{record['source']} p{record['page']}"
            if record["status"] != "ok":
                err(f"vl2: {where}: {record.get('error', record['status'])}")
                failed += 1
                continue
            for flag in record.get("flags", []):
                err(f"vl2: warning: {where}: {flag.replace('_', ' ')}")
            if json_out:
                records.append(record)
                continue
            if headers and not quiet:
                err(f"== {record['source']} page {record['page']} ==")
            typer.echo(task.render(record, fmt))

    headers = len(sources) > 1 or any(count_pages(s, pages, password) > 1 for s in sources if s != "-")
    for source in sources:
        batch = []
        try:
            for page in iter_pages(source, pages=pages, dpi=dpi, password=password, max_pixels=max_pixels,
                                   text_layer=text_layer != "off"):
                batch.append(page)
                if len(batch) >= read_opts.batch_size:
                    flush(batch)
                    batch = []
        except InputError as exc:
            err(f"vl2: {exc}")
            failed += 1
        if batch:
            flush(batch)
    if json_out:
        typer.echo(json.dumps(records, ensure_ascii=False, indent=1))
    return failed


def _print_summary(summary, quiet: bool, json_out: bool, out: Path) -> None:
    data = {"pages_done": summary.pages_done, "pages_skipped": summary.pages_skipped,
            "pages_failed": summary.pages_failed, "files_failed": summary.files_failed,
            "loops_flagged": summary.loops_flagged, "generated_tokens": summary.generated_tokens,
            "seconds": round(summary.seconds, 2), "out": str(out),
            "failures": [{"input": a, "error": b} for a, b in summary.failures]}
    if json_out:
        typer.echo(json.dumps(data, ensure_ascii=False, indent=1))
        return
    if quiet:
        return
    from rich.console import Console
    from rich.table import Table
    table = Table(title="vl2 batch summary", show_header=False)
    for k in ("pages_done", "pages_skipped", "pages_failed", "files_failed", "loops_flagged", "generated_tokens",
              "seconds"):
        table.add_row(k.replace("_", " "), str(data[k]))
    table.add_row("output", str(out))
    Console(stderr=True).print(table)


def _task_command(name: str, help_text: str, needs: str | None = None, default_fmt: str = "markdown"):
    def command(
        inputs: Annotated[list[str], typer.Argument(help="PDFs, images, folders, or - for stdin.")],
        model: Model = "tiny", quant: Quant = "auto", device: Device = "auto", dtype: Dtype = "auto",
        max_new_tokens: MaxNew = 2048, temperature: Temp = 0.0, prompt_file: PromptFile = None, out: Out = None,
        fmt: Annotated[str, typer.Option("--format", "-f", help="Output format.")] = default_fmt,
        verbose: Verbose = False, quiet: Quiet = False, json_out: JsonOut = False, pages: Pages = None,
        dpi: Dpi = 144, password: Password = None, revision: Revision = None, offline: Offline = False,
        batch_size: BatchSize = 4, split: Split = "auto", text_layer: TextLayer = "off",
        max_pixels: MaxPixels = 64_000_000,
    ) -> None:
        text = None
        if needs:
            if len(inputs) < 2:
                raise _fail(UsageError(f"{name}: give the input file(s) and then the {needs}"))
            *inputs, text = inputs
        _run_task(name, inputs, text, model=model, quant=quant, device=device, dtype=dtype,
                  max_new_tokens=max_new_tokens, temperature=temperature, prompt_file=prompt_file, out=out, fmt=fmt,
                  verbose=verbose, quiet=quiet, json_out=json_out, pages=pages, dpi=dpi, password=password,
                  revision=revision, offline=offline, batch_size=batch_size, split=split, text_layer=text_layer,
                  max_pixels=max_pixels)

    command.__doc__ = help_text
    if needs:  # the query is the last positional word: say so in --help
        help_words = f"PDFs, images, folders, or - for stdin; the {needs} comes last."
        command.__annotations__["inputs"] = Annotated[list[str], typer.Argument(help=help_words)]
    app.command(name)(command)


_task_command("ocr", "Page text as markdown or plain text.\n\nExample: vl2 ocr samples/report.pdf --pages 1-2")
_task_command("table", "Tables as JSON (or csv/markdown/html).\n\nExample: vl2 table samples/invoice.png -f csv",
              default_fmt="json")
_task_command("chart", "Chart description plus its data table.\n\nExample: vl2 chart samples/report.pdf --pages 2")
_task_command("ground", "Boxes of the described object, in pixels and 0-999.\n\n"
              'Example: vl2 ground samples/objects.png "the red circle" --out boxes/', needs="query")
_task_command("caption", "Grounded caption: every object mentioned, with boxes.\n\n"
              "Example: vl2 caption samples/objects.png --out caps/")


@app.command()
def ask(
    inputs: Annotated[list[str], typer.Argument(help="Image(s) or PDF page(s), then the question.")],
    model: Model = "tiny", quant: Quant = "auto", device: Device = "auto", dtype: Dtype = "auto",
    max_new_tokens: MaxNew = 512, temperature: Temp = 0.0, pages: Pages = None, dpi: Dpi = 144,
    password: Password = None, chat: Annotated[bool, typer.Option("--chat", help="Keep asking follow-ups.")] = False,
    verbose: Verbose = False, quiet: Quiet = False, json_out: JsonOut = False, out: Out = None,
    revision: Revision = None, offline: Offline = False,
) -> None:
    """Ask a question about one or more images or pages (all go into one prompt).

    Example: vl2 ask samples/invoice.png "What is the total?"
    """
    _state["verbose"] = verbose
    try:
        from vl2cli.pages import display_path, expand_inputs, iter_pages
        from vl2cli.engine.processor import Message
        from vl2cli.tasks import image_marks
        if len(inputs) < 2:
            raise UsageError("ask: give the input file(s) and then the question")
        *files, question = inputs
        images = [p.image for f in expand_inputs(files) for p in iter_pages(f, pages=pages, dpi=dpi,
                                                                              password=password)]
        if not images:
            raise UsageError("ask: no pages to look at")
        reader = _reader(model, device, dtype, quant, revision, offline)
        params = _params(max_new_tokens, temperature)

        answer = _answer(reader, images, question, params, json_out)
        record = {"inputs": [display_path(f) for f in files], "pages": len(images), "question": question,
                  "answer": answer}
        if json_out:
            typer.echo(json.dumps(record, ensure_ascii=False))
        if out is not None:
            from vl2cli.batch import output_key, safe_component
            from vl2cli.writers import atomic_write_text
            name = safe_component(output_key(files[0], None)) + ".ask.json"
            atomic_write_text(out / name, json.dumps(record, ensure_ascii=False, indent=1) + "\n")
            if not quiet:
                err(f"vl2: wrote {out / name}")
        history = [Message("user", image_marks(len(images)) + question, images), Message("assistant", answer)]
        while chat:
            try:
                follow = input("> ").strip()
            except EOFError:
                break
            if follow in ("", "exit", "quit"):
                break
            answer = _answer(reader, images, follow, params, json_out, history)
            if json_out:
                typer.echo(json.dumps({"question": follow, "answer": answer}, ensure_ascii=False))
            history += [Message("user", follow), Message("assistant", answer)]
    except typer.Exit:
        raise
    except Exception as exc:
        raise _fail(exc) from None


def _answer(reader, images, question, params, json_out: bool, history=None) -> str:
    """Ask, streaming the answer to stdout as it is generated (unless the output is JSON)."""
    from vl2cli.api import TokenStream
    stream = None if json_out else TokenStream(reader, lambda piece: typer.echo(piece, nl=False))
    answer = reader.ask_images(images, question, params, history=history, on_token=stream)
    if stream is not None:
        typer.echo(answer[len(stream.shown):])  # whatever was held back, then the newline
    return answer


@app.command()
def batch(
    inputs: Annotated[list[str], typer.Argument(help="Folders, files or globs.")],
    task: Annotated[str, typer.Option(help="ocr, table, chart, ask, ground or caption.")] = "ocr",
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (resumable).")] = Path("results"),
    question: Annotated[str | None, typer.Option(help="Question (ask) or object (ground).")] = None,
    glob: Annotated[str | None, typer.Option(help="Only files matching this pattern in folders.")] = None,
    model: Model = "tiny", quant: Quant = "auto", device: Device = "auto", dtype: Dtype = "auto",
    max_new_tokens: MaxNew = 2048, temperature: Temp = 0.0, prompt_file: PromptFile = None,
    fmt: Annotated[str | None, typer.Option("--format", "-f", help="Output format per page.")] = None,
    verbose: Verbose = False, quiet: Quiet = False, json_out: JsonOut = False, pages: Pages = None,
    dpi: Dpi = 144, password: Password = None, revision: Revision = None, offline: Offline = False,
    batch_size: BatchSize = 4, split: Split = "auto", text_layer: TextLayer = "off",
    max_pixels: MaxPixels = 64_000_000,
) -> None:
    """Read every page of many documents into --out; rerun to resume.

    Example: vl2 batch samples/ --task table --out results/
    """
    from vl2cli.pages import expand_inputs
    from vl2cli.tasks import get_task
    _state["verbose"] = verbose
    try:
        t = get_task(task)
        files = expand_inputs(inputs, glob, exclude=out)
        if not files:
            raise UsageError("batch: no input files found")
    except Exception as exc:
        raise _fail(exc) from None
    _run_task(task, files, question, model=model, quant=quant, device=device, dtype=dtype,
              max_new_tokens=max_new_tokens, temperature=temperature, prompt_file=prompt_file, out=out,
              fmt=fmt or t.formats[0], verbose=verbose, quiet=quiet, json_out=json_out, pages=pages, dpi=dpi,
              password=password, revision=revision, offline=offline, batch_size=batch_size, split=split,
              text_layer=text_layer, max_pixels=max_pixels)


@app.command()
def trace(
    model: Annotated[str, typer.Option("--model", "-m", help="Checkpoint folder.")],
    prompt: Annotated[str, typer.Option(help="User message; <image> marks each image.")],
    out: Annotated[str, typer.Option(help="Output prefix: PREFIX.json + PREFIX.npz.")],
    image: Annotated[list[Path] | None, typer.Option("--image", help="Image files, in <image> order.")] = None,
    max_new_tokens: MaxNew = 16, dtype: Dtype = "float32", device: Device = "cpu",
    all_positions: Annotated[bool, typer.Option(help="Store logits at every prompt position.")] = False,
    verbose: Verbose = False,
) -> None:
    """Write the parity trace of one prompt (tokens, tiles, logits, greedy ids); also a debugging view.

    Example: vl2 trace --model ckpt/ --image page.png --prompt "<image>\\nConvert the document to markdown." --out t
    """
    _state["verbose"] = verbose
    try:
        from vl2cli.engine.loading import load_model
        from vl2cli.engine.trace import load_reference_image, run_trace
        loaded = load_model(model, device=device, dtype=dtype, quant="none")
        images = [load_reference_image(p) for p in image or []]
        prepared = loaded.processor.prepare_prompt(prompt, images)
        meta = run_trace(loaded, prepared, max_new_tokens, out, all_positions)
        err(f"prompt tokens {len(meta['input_ids'])}, image spans {meta['image_spans']}, "
            f"tiles {meta['images_spatial_crop']}, generated {len(meta['generated_ids'])}")
        typer.echo(f"{out}.json")
    except Exception as exc:
        raise _fail(exc) from None


@models_app.callback()
def models(ctx: typer.Context, json_out: JsonOut = False) -> None:
    """The three variants: parameters, estimated VRAM at nf4/bf16, and whether each is downloaded."""
    if ctx.invoked_subcommand:
        return
    from vl2cli.engine.config import PRESETS
    from vl2cli.engine.loading import cached_model_path
    from vl2cli.engine.memory import estimate_vram
    rows = []
    for name, preset in PRESETS.items():
        est = estimate_vram(name)
        path = cached_model_path(name)
        rows.append({"name": name, "hub_id": preset["hub_id"], "total_params_b": preset["total_params"] / 1e9,
                     "active_params_b": preset["active_params"] / 1e9, "vram_nf4_gib": est["nf4"],
                     "vram_bf16_gib": est["bf16"], "cached": str(path) if path else None})
    if json_out:
        typer.echo(json.dumps(rows, indent=1))
        return
    from rich.console import Console
    from rich.table import Table
    table = Table(title="DeepSeek-VL2 variants (VRAM: weights + one page, estimated)")
    for col in ("name", "hub id", "total", "activated", "nf4", "bf16", "local"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["hub_id"], f"{r['total_params_b']:.1f}B", f"{r['active_params_b']:.1f}B",
                      f"{r['vram_nf4_gib']:.1f} GiB", f"{r['vram_bf16_gib']:.1f} GiB", "yes" if r["cached"] else "no")
    Console().print(table)


@models_app.command("download")
def models_download(name: Annotated[str, typer.Argument(help="tiny, small, base or a hub id.")],
                    revision: Revision = None) -> None:
    """Download a variant into the Hugging Face cache (safetensors and configs only)."""
    try:
        from vl2cli.engine.loading import resolve_model
        typer.echo(str(resolve_model(name, revision=revision, offline=False)))
    except Exception as exc:
        raise _fail(exc) from None


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err("vl2: interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
