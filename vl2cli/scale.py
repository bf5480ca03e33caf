"""`vl2 batch --ray`: the local batch's pages, keys and sink, with Ray Data in between.

The driver plans (the index says which pages are done), then streams page references through Ray Data: CPU tasks
render them (one PDFium user per process) to PNG bytes; a pool of model actors, each loading the model once, reads
them with the engine's continuous batching; the records come back to the driver, which alone writes every file and
index line through the same FolderSink as the local batch. So the output tree and records are the local batch's, and
a page that Ray retries (an actor killed mid-batch is restarted and its batch redone) is still written once.

Object store traffic: a page travels as PNG bytes (tens to hundreds of KB), never as tiles (float32, megabytes:
`benchmarks/run.py ray` measures both); tiling happens in the actor.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vl2cli.errors import ConfigError, UsageError
from vl2cli.pages import STDIN, Page, Source, render_pages
from vl2cli.pipeline import StopFlag, record_result
from vl2cli.results import failed_page

if TYPE_CHECKING:
    from vl2cli.models import ModelChoice
    from vl2cli.options import PageOptions
    from vl2cli.pipeline import Job, PageItem, Progress, Sink, Summary

log = logging.getLogger("vl2cli")
IMAGE_TASKS = ("ground", "caption")  # the sink draws their boxes on the page: its image comes back to the driver


def connect(address: str, verbose: bool = False) -> bool:
    """Start or join Ray: 'local' starts an instance on this machine (True: ours to shut down), 'auto' joins the
    cluster this machine is part of, anything else is a cluster address. Unless `verbose`, Ray keeps its own
    progress blocks and log lines to its log files (vl2 reports pages, failures and the summary itself)."""
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray Data: pip install 'vl2cli[ray]'") from None
    if ray.is_initialized():
        return False
    if not verbose:  # the driver's C++ core worker reads this when ray.init starts it; the user's own value wins
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    logging.getLogger("ray").setLevel(logging.INFO if verbose else logging.CRITICAL)
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    try:
        if address == "local":
            ray.init(address="local", num_cpus=os.cpu_count() or 1, **options)
            return True
        ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"--ray {address}: cannot join the Ray cluster ({str(exc).splitlines()[0][:200]})") from None
    return False


def render_row(row: dict[str, Any], page_opts: PageOptions) -> dict[str, Any]:
    """A page reference -> its PNG bytes (and text layer), or the reason it cannot be rendered. Runs in a Ray task."""
    source = Source(row["path"], row["label"], kind=row["kind"])
    out = {"i": row["i"], "label": row["label"], "number": row["number"], "png": b"", "text_layer": "",
           "has_text": False, "error": "", "rotation": 0, "rotation_source": ""}
    try:
        page = next(render_pages(source, page_opts, [row["number"]]))
    except Exception as exc:  # a damaged page fails alone
        out["error"] = str(exc) if str(exc).startswith(row["label"]) else f"{row['label']} page {row['number']}: " \
            f"cannot render ({type(exc).__name__}: {str(exc)[:160]})"
        return out
    buffer = io.BytesIO()
    page.image.save(buffer, format="PNG", compress_level=1)  # fast: the bytes live only in the object store
    out.update(png=buffer.getvalue(), text_layer=page.text_layer or "", has_text=page.text_layer is not None,
               rotation=page.rotation, rotation_source=page.rotation_source or "")
    return out


class PageReader:
    """A Ray Data actor: loads the model once, then reads batches of rendered pages."""

    def __init__(self, spec: ModelChoice, job: Job, threads: int):
        import socket

        import torch

        if spec.device in ("auto", "cpu") and threads:
            torch.set_num_threads(threads)  # actors on one machine share its cores
        if not os.path.isdir(spec.model):
            raise ConfigError(f"{spec.model}: the model folder is not on node {socket.gethostname()} (every node "
                              "needs the model at the same path: a shared folder, or `vl2 models download` on each)")
        self.reader = spec.load(Path(spec.model))  # the library's one way to load (vl2cli.load)
        self.reader.check_mode(job.read.ocr_mode)
        self.job = job
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.keep_image = job.task.name in IMAGE_TASKS or self.reader.family == "ocr"

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        from PIL import Image
        pages: list[tuple[int, Page]] = []
        results: dict[int, Any] = {}
        for i, label, number, png, text, has_text, error, rotation, rotation_source in zip(
                batch["i"], batch["label"], batch["number"], batch["png"], batch["text_layer"], batch["has_text"],
                batch["error"], batch["rotation"], batch["rotation_source"]):
            label, number = str(label), int(number)
            if error:
                results[int(i)] = failed_page(label, number, self.job.task.name, str(error), self.job.read.text)
                continue
            image = Image.open(io.BytesIO(png)).convert("RGB")
            pages.append((int(i), Page(label, number, image, text_layer=str(text) if has_text else None,
                                       rotation=int(rotation), rotation_source=str(rotation_source) or None)))
        for i, result in self.reader.read_stream(self.job.task, pages, self.job.read):
            results[i] = result
        order = [int(i) for i in batch["i"]]
        by_index = dict(zip(order, batch["png"]))
        return {"i": order, "result": [pickle.dumps(results[i]) for i in order],
                "png": [by_index[i] if self.keep_image else b"" for i in order], "worker": [self.name] * len(order)}


def run_on_ray(job: Job, work: list[PageItem], sink: Sink, summary: Summary, spec: ModelChoice, workers: int,
               gpus_per_worker: float | None, progress: Progress | None = None, stop: StopFlag | None = None,
               verbose: bool = False) -> None:
    """Read `work` on the connected Ray cluster; each result goes to `sink` on this process as it arrives. `spec`:
    the model's words, its `model` the resolved folder (on every node: a shared path or the same cache)."""
    import ray
    from PIL import Image
    stop = stop or StopFlag()
    if any(item.source.path == STDIN for item in work):
        raise UsageError("--ray reads files by path on every node: standard input cannot be one")
    if not work:
        return
    gpus = ray.cluster_resources().get("GPU", 0)
    per_gpu = (1.0 if gpus else 0.0) if gpus_per_worker is None else gpus_per_worker
    cpus = ray.cluster_resources().get("CPU", 1)
    rows = [{"i": n, "path": os.path.abspath(item.source.path), "label": item.source.label,
             "kind": item.source.kind, "number": item.number} for n, item in enumerate(work)]
    actor_cpus = 1.0 if per_gpu else max(0.25, min(1.0, cpus / (workers + 1)))
    threads = max(1, int(cpus // workers)) if not per_gpu else 0
    ds: Any = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 16 * workers)))
    ds = ds.map(render_row, fn_kwargs={"page_opts": job.pages}, num_cpus=0.25)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = context.print_on_execution_start = verbose
    for handler in logging.getLogger("ray.data").handlers:  # Ray Data's own console handler; its log file keeps all
        if isinstance(handler, logging.StreamHandler):
            handler.setLevel(logging.INFO if verbose else logging.CRITICAL)
    ds = ds.map_batches(PageReader, fn_constructor_args=(spec, job, threads), batch_size=job.read.batch_size,
                        compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=actor_cpus, num_gpus=per_gpu)
    # Ray Data's actor pool restarts a dead actor without limit and retries its batch (max_restarts and
    # max_task_retries -1 by default; tests/test_ray.py kills one mid-run).
    started, done = time.perf_counter(), 0
    tokens_before = summary.generated_tokens
    workers_seen: dict[str, int] = {}
    for row in ds.iter_rows():
        if stop.stopping:
            break
        item = work[int(row["i"])]
        result = pickle.loads(row["result"])
        page = None
        if row["png"]:
            page = Page(result.source, result.page, Image.open(io.BytesIO(row["png"])).convert("RGB"),
                        rotation=result.rotation, rotation_source=result.rotation_source)
        record_result(sink, summary, item, result, page)
        workers_seen[str(row["worker"])] = workers_seen.get(str(row["worker"]), 0) + 1
        done += 1
        if progress:
            progress(done, len(work), summary.generated_tokens - tokens_before)
    summary.workers = workers_seen
    summary.seconds += time.perf_counter() - started
    summary.interrupted_by = stop.signal


def run_work_on_ray(address: str, job: Job, work: list[PageItem], sink: Sink, summary: Summary, spec: ModelChoice,
                    workers: int, gpus_per_worker: float | None, progress: Progress | None = None,
                    stop: StopFlag | None = None, verbose: bool = False) -> None:
    """Connect (or start a local instance), read, and shut down what we started."""
    if workers < 1:
        raise UsageError(f"--workers {workers}: expected a positive number")
    ours = connect(address, verbose)
    try:
        run_on_ray(job, work, sink, summary, spec, workers, gpus_per_worker, progress, stop, verbose)
    finally:
        if ours:
            import ray
            ray.shutdown()

