"""vl2: read documents locally with DeepSeek-VL2.

    import vl2cli

    reader = vl2cli.load("tiny")  # an alias, a checkpoint folder, or hf:ORG/NAME
    for result in vl2cli.read(reader, ["samples/report.pdf"], task="table", pages="2"):
        print(result.fields["tables"])  # result.to_json() is the documented record

Files -> pages (`pages`) -> tiles and tokens (`engine.processor`) -> model (`engine`) -> answer (`reader`)
-> parser (`tasks`, `parsers`) -> sink (`pipeline`, `sinks`).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from vl2cli.errors import Vl2Error
from vl2cli.options import PageOptions, ReadOptions

if TYPE_CHECKING:
    from pathlib import Path

    from vl2cli.models import ModelChoice as ModelChoice  # the CLI's names: re-exported, outside __all__
    from vl2cli.models import download as download
    from vl2cli.models import variants as variants
    from vl2cli.reader import Reader
    from vl2cli.resolve import resolve_options as resolve_options
    from vl2cli.results import AskResult, PageResult
    from vl2cli.tasks import get_task

# Imported on first use (PEP 562), not with the package: `import vl2cli.cli` (every `vl2 --help`) must not pay
# for torch, which the reader pulls in.
_LAZY = {"Reader": "vl2cli.reader", "AskResult": "vl2cli.results", "PageResult": "vl2cli.results",
         "get_task": "vl2cli.tasks", "ModelChoice": "vl2cli.models", "variants": "vl2cli.models",
         "download": "vl2cli.models", "resolve_options": "vl2cli.resolve"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vl2cli' has no attribute {name!r}")


try:
    __version__ = version("vl2cli")
except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["AskResult", "PageOptions", "PageResult", "ReadOptions", "Reader", "Vl2Error", "__version__", "get_task",
           "load", "read"]
# Also here, for the command line (which reaches the engine only through this face), outside the documented API:
# ModelChoice, resolve_options, trace, variants, download.


def load(model: str = "tiny", *, device: str | None = None, dtype: str | None = None, quant: str = "auto",
         revision: str | None = None, offline: bool | None = None) -> Reader:
    """Load a model once; read with it as often as you like."""
    from vl2cli.models import ModelChoice
    return ModelChoice(model, quant, device or "auto", dtype or "auto", revision, bool(offline)).load()


def read(reader: Reader, paths: list[str], task: str = "ocr", question: str | None = None, pages: str | None = None,
         options: ReadOptions | None = None, page_options: PageOptions | None = None) -> list[PageResult]:
    """Every page of the given files (PDFs, images, folders), through the same pipeline as the CLI, with the CLI's
    defaults: `options`/`page_options` as given, the task's own defaults where they leave a choice (ground's
    grammar), `question` and `pages` over them when given."""
    from vl2cli.pages import expand_inputs
    from vl2cli.pipeline import Job, ListSink, plan_inputs, read_documents
    from vl2cli.resolve import resolve_options
    resolved = resolve_options(task, {"question": question, "pages": pages, "fmt": "json"}, read=options,
                               pages=page_options)
    the_task, opts, page_opts = resolved.task, resolved.read, resolved.pages
    sources, _ = plan_inputs(expand_inputs(list(paths)), page_opts, strict=True)
    template = the_task.template(opts.prompt_file, reader.family, opts.plain)  # the prompt the reader will use
    job = Job(the_task, opts, page_opts, "json", str(reader.loaded.folder), template)
    sink = ListSink()
    read_documents(reader, job, sources, sink)
    if not the_task.whole_document:
        return sink.results
    from vl2cli.document import settle_furniture  # ocr: each document's furniture, found across its pages
    return [r for s in sources for r in settle_furniture(sorted((r for r in sink.results if r.source == s.label),
                                                                key=lambda r: r.page))]


def trace(model: str, prompt: str, out: str, images: list[Path] | None = None, *, max_new_tokens: int = 16,
          dtype: str = "float32", device: str = "cpu", ocr_mode: str | None = None,
          all_positions: bool = False) -> dict[str, Any]:
    """Write the parity trace of one prompt (OUT.json + OUT.npz: tokens, tiles, logits, greedy ids); its metadata.
    DeepSeek-OCR and DeepSeek-OCR 2 take exactly one image (their own trace formats)."""
    from vl2cli.engine.family import get_family
    from vl2cli.engine.hub import model_kind
    from vl2cli.engine.loading import load_model
    from vl2cli.models import ModelChoice
    family = get_family(model_kind(str(ModelChoice(model).resolve())))
    images = list(images or [])
    family.check_trace(len(images), ocr_mode)  # before any weight loads
    loaded = load_model(model, device=device, dtype=dtype, quant="none")
    return family.trace(loaded, images, prompt, max_new_tokens, out, ocr_mode, all_positions)
