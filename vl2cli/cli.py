"""The `vl2` command line: parse arguments, call the library, print. Results to stdout, the rest to stderr.

The commands' options come from the one option table (vl2cli/options.py, made Typer parameters by vl2cli/flags.py)
and are resolved by the library's resolver (vl2cli/resolve.py); what a run shows is vl2cli/terminal.py's, its
signal handling vl2cli/signals.py's. One error boundary (`Vl2Group.invoke`) turns a known error into its one line
and exit code, Ctrl-C into 130, and anything else into one line plus a pointer to -v.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

import vl2cli
from vl2cli.errors import UsageError, Vl2Error
from vl2cli.flags import plain_help_types, with_options
from vl2cli.run import ReadRequest, load_reader, not_a_file, run_read
from vl2cli.signals import StartingUp
from vl2cli.terminal import err, follow_up, print_variants, setup_logging

if TYPE_CHECKING:
    from vl2cli.options import ReadOptions
    from vl2cli.reader import Reader

log = logging.getLogger("vl2cli")


def _typer_error() -> type[Exception]:
    """The base of the usage errors typer prints itself: TyperException from typer 0.29, (vendored) click's
    ClickException before it (docling-core pins typer<0.27, so vl2 runs on both)."""
    bases = {cls.__name__: cls for cls in typer.BadParameter.__mro__}
    return bases.get("TyperException") or bases["ClickException"]


TyperError = _typer_error()


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


app = typer.Typer(cls=Vl2Group, add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Read documents locally with DeepSeek-VL2: OCR, questions, tables, charts, grounding.")
models_app = typer.Typer(help="List the DeepSeek-VL2 variants and download them.", invoke_without_command=True,
                         context_settings={"help_option_names": ["-h", "--help"]})
app.add_typer(models_app, name="models")


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"vl2 {vl2cli.__version__}")
        raise typer.Exit()


@app.callback()
def _root(version_flag: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                                     help="Print the version and exit.")] = False) -> None:
    """Read documents locally with DeepSeek-VL2: OCR, questions, tables, charts, grounding."""


# ---------------------------------------------------------------------- the reading commands


def _request(task_name: str, inputs: list[str], words: dict[str, Any], text: str | None = None,
             **rest: Any) -> ReadRequest:
    """A reading command's words (the option table's, by name) as one request, resolved as the server and the
    library resolve them."""
    from vl2cli.extract import load_schema_file
    if words["per"] not in ("page", "document"):
        raise UsageError(f"--per {words['per']!r}: expected page or document")
    fmt = "json" if words["json_out"] and words["out"] is None else words["fmt"]
    schema = load_schema_file(words["schema"]) if words["schema"] is not None else None
    resolved = vl2cli.resolve_options(task_name, {**words, "question": text, "fmt": fmt, "schema": schema})
    return ReadRequest(resolved.task, inputs, text, resolved.fmt, words["out"], vl2cli.ModelChoice.from_words(words),
                       resolved.read, resolved.pages, auto_batch=words["batch_size"] is None,
                       per_document=words["per"] == "document", redo=words["redo"], verbose=words["verbose"],
                       quiet=words["quiet"], summary_json=words["json_out"], keep_furniture=words["keep_furniture"],
                       **rest)


def _task_command(name: str, help_text: str, needs: str | None = None) -> None:
    inputs_help = "PDFs, images, folders, or - for stdin" + (f"; the {needs} comes last." if needs else ".")

    def command(inputs: list[str], **words: Any) -> None:
        text = None
        if needs:
            if len(inputs) < 2:
                raise UsageError(f"{name}: give the input file(s) and then the {needs}")
            *inputs, text = inputs
        run_read(_request(name, inputs, words, text))

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
    run_read(_request(task, inputs, {**words, "out": out}, words["question"], glob=glob, named_files=False, ray=ray,
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
    from vl2cli.tasks import get_task
    verbose, quiet, json_out, out = words["verbose"], words["quiet"], words["json_out"], words["out"]
    setup_logging(verbose, quiet)
    if len(inputs) < 2:
        raise UsageError("ask: give the input file(s) and then the question")
    *files, question = inputs
    get_task("ask").check_text(question)
    not_a_file("question", question)
    resolved = vl2cli.resolve_options("ask", {**words, "question": question}, asking=True)
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
    choice = vl2cli.ModelChoice.from_words(words)
    reader = load_reader(choice, choice.resolve(), verbose)
    reader.check_mode(opts.ocr_mode)
    labels = [s.label for s in sources]
    result = _answer(reader, images, question, opts, [], labels, json_out)
    if out is not None:
        from vl2cli.sinks import write_answer
        written = write_answer(out, sources, result.to_json())
        if not quiet:
            err(f"vl2: wrote {written}")
    history = [(question, result.answer)]
    while chat:
        follow = follow_up()
        if follow in (None, "", "exit", "quit"):
            break
        result = _answer(reader, images, follow, opts, history, labels, json_out)
        history.append((follow, result.answer))


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
    setup_logging(verbose, False)
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
        choice = vl2cli.ModelChoice.from_words(words)
        folder = choice.resolve()
        starting.check()
        reader = load_reader(choice, folder, verbose)
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
    setup_logging(words["verbose"], False)
    meta = vl2cli.trace(model, prompt.replace("\\n", "\n"), out, image, max_new_tokens=words["max_new_tokens"],
                        dtype=words["dtype"], device=words["device"], ocr_mode=ocr_mode, all_positions=all_positions)
    if "num_tokens" in meta:  # DeepSeek-OCR's and DeepSeek-OCR 2's traces
        err(f"prompt tokens {meta['num_tokens']}, image tokens {meta['num_image_positions']}, "
            f"tiles {meta['images_spatial_crop']}, generated {len(meta['generated_ids'])}")
    else:
        err(f"prompt tokens {len(meta['input_ids'])}, image spans {meta['image_spans']}, "
            f"tiles {meta['images_spatial_crop']}, generated {len(meta['generated_ids'])}")
    typer.echo(f"{out}.json")


@models_app.callback()
def models(ctx: typer.Context,
           json_out: Annotated[bool, typer.Option("--json", help="The table as JSON on stdout.")] = False) -> None:
    """The three variants: parameters, download size, estimated VRAM, and whether each is downloaded."""
    if ctx.invoked_subcommand:
        return
    rows = vl2cli.variants()
    if json_out:
        typer.echo(json.dumps(rows, indent=1))
    else:
        print_variants(rows)


@models_app.command("download")
@with_options("models download")
def models_download(name: Annotated[str, typer.Argument(help="tiny, small, base, ocr (DeepSeek-OCR) or a hub id "
                                                                                "(ORG/NAME).")],
                    **words: Any) -> None:
    """Download a variant into the Hugging Face cache (safetensors and configs only).

    Example: vl2 models download small
    """
    typer.echo(str(vl2cli.download(name, words["revision"])))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # before a command started (imports): the boundary is not in place yet
        err("vl2: interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
