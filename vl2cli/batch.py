"""Batch runs: many documents, one output folder, resumable, interruption-safe.

One thread renders pages (PDFium is not thread-safe, so only that thread touches it) into a
bounded queue while the model reads the previous batch. Each finished page is written
atomically and then recorded in index.jsonl; a rerun skips every page the index marks done.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vl2cli.api import Reader, ReadOptions
from vl2cli.errors import OutputError, Vl2Error
from vl2cli.pages import DEFAULT_DPI, DEFAULT_MAX_PIXELS, Page, count_pages, display_path, iter_pages
from vl2cli.engine.processor import tile_image
from vl2cli.tasks import Task, annotate
from vl2cli.writers import atomic_write_bytes, atomic_write_text

INDEX_NAME = "index.jsonl"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_component(part: str, limit: int = 96) -> str:
    clean = _SAFE.sub("_", part).strip("._") or "_"
    if clean != part or len(clean) > limit:  # keep distinct names distinct after cleaning
        digest = hashlib.sha1(part.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        clean = f"{clean[:limit - 9]}-{digest}"
    return clean


def output_key(source: str, root: Path | None) -> str:
    """A relative output path for a source: mirrors its place under the input root, can never escape --out."""
    if source == "-":
        return "stdin"
    path = Path(os.path.abspath(source))
    try:
        rel = path.relative_to(root) if root else Path(path.name)
    except ValueError:
        rel = Path(path.name)
    parts = [safe_component(p) for p in rel.parts if p not in ("", ".", "..", "/")]
    return "/".join(parts) or "_"


def input_root(sources: list[str]) -> Path | None:
    dirs = [os.path.dirname(os.path.abspath(s)) for s in sources if s != "-"]
    return Path(os.path.commonpath(dirs)) if dirs else None


@dataclass
class BatchOptions:
    out: Path
    fmt: str
    pages: str | None = None
    dpi: int = DEFAULT_DPI
    password: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    annotate: bool = True


@dataclass
class BatchSummary:
    files: int = 0
    pages_done: int = 0
    pages_skipped: int = 0
    pages_failed: int = 0
    files_failed: int = 0
    loops_flagged: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)
    interrupted_by: int | None = None

    @property
    def exit_code(self) -> int:
        if self.interrupted_by:
            return 128 + self.interrupted_by
        return 1 if (self.pages_failed or self.files_failed) else 0


class Index:
    """index.jsonl: one JSON line per page event; the last line for a key wins; torn lines are ignored."""

    def __init__(self, out: Path):
        self.path = out / INDEX_NAME
        self.entries: dict[str, dict] = {}
        if self.path.exists():
            raw = self.path.read_bytes()
            if raw and not raw.endswith(b"\n"):  # a line torn by a kill: end it so the next line starts clean
                with open(self.path, "ab") as f:
                    f.write(b"\n")
            for line in raw.decode("utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry
                except (ValueError, KeyError, TypeError):
                    continue

    def done(self, key: str, out: Path) -> bool:
        entry = self.entries.get(key)
        return bool(entry and entry.get("status") == "ok" and all((out / o).exists() for o in entry.get("outputs", [])))

    def add(self, entry: dict) -> None:
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)  # one write per line: a kill leaves at most one torn last line
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write ({exc.strerror or exc})") from None
        self.entries[entry["key"]] = entry


def page_key(file_key: str, number: int) -> str:
    return f"{file_key}.p{number:04d}"


def write_page(task: Task, record: dict, page: Page, key: str, opts: BatchOptions) -> list[str]:
    """Write one page's outputs atomically; returns their paths relative to --out."""
    written = []
    ext = task.extension(opts.fmt if opts.fmt != "jsonl" else "json")
    body = task.render(record, opts.fmt if opts.fmt != "jsonl" else "json")
    rel = key + ext
    _inside(opts.out, rel)
    atomic_write_text(opts.out / rel, body if body.endswith("\n") else body + "\n")
    written.append(rel)
    if opts.fmt not in ("json", "jsonl"):  # the structured record always lands beside the chosen format
        rel_json = key + ".json"
        atomic_write_text(opts.out / rel_json, task.render(record, "json") + "\n")
        written.append(rel_json)
    if record.get("objects") and opts.annotate:
        import io
        buf = io.BytesIO()
        annotate(page.image, record["objects"]).save(buf, format="PNG")
        rel_png = key + ".boxes.png"
        atomic_write_bytes(opts.out / rel_png, buf.getvalue())
        written.append(rel_png)
    return written


def _inside(out: Path, rel: str) -> None:
    target = (out / rel).resolve()
    if not str(target).startswith(str(out.resolve()) + os.sep):
        raise OutputError(f"{rel}: output path would leave {out}")


class _Stop:
    def __init__(self):
        self.signal: int | None = None  # SIGINT/SIGTERM received: finish the pages in flight
        self.abandoned = False  # the consumer has gone (error or signal): the renderer stops too

    @property
    def stopping(self) -> bool:
        return bool(self.signal) or self.abandoned


def _producer(sources: list[str], root: Path | None, index: Index, opts: BatchOptions, text_layer: bool,
              q: queue.Queue, stop: _Stop, cfg) -> None:
    """Runs in the one rendering thread; queues ('page', key, Page), ('error', source, msg), then ('end', ...)."""
    try:
        for source in sources:
            if stop.stopping:
                break
            file_key = output_key(source, root)
            try:
                for page in iter_pages(source, pages=opts.pages, dpi=opts.dpi, password=opts.password,
                                       max_pixels=opts.max_pixels, text_layer=text_layer,
                                       skip=lambda n, fk=file_key: index.done(page_key(fk, n), opts.out)):
                    if stop.stopping:
                        break
                    page.tiling = tile_image(page.image, cfg)  # tiles are cut here, overlapping model compute
                    q.put(("page", page_key(file_key, page.number), page))
            except Vl2Error as exc:
                q.put(("error", source, str(exc)))
            except MemoryError:
                q.put(("error", source, f"{source}: out of memory while decoding"))
            except Exception as exc:  # a library bug on a hostile file must not end the batch
                q.put(("error", source, f"{source}: unreadable ({type(exc).__name__}: {str(exc)[:120]})"))
    finally:
        q.put(("end", None, None))


Progress = Callable[[int, int, int], None]  # (pages finished this run, pages to do this run, tokens generated)


def run_batch(reader: Reader, task: Task, sources: list[str], read_opts: ReadOptions, opts: BatchOptions,
              log: Callable[[str], None], progress: Progress | None = None) -> BatchSummary:
    opts.out.mkdir(parents=True, exist_ok=True)
    if not os.access(opts.out, os.W_OK):
        raise OutputError(f"{opts.out}: output folder is not writable")
    for stale in opts.out.rglob(".*.part"):  # temp files of a run killed mid-write
        stale.unlink(missing_ok=True)
    index = Index(opts.out)
    summary = BatchSummary(files=len(sources))
    root = input_root(sources)
    stop = _Stop()
    started = time.perf_counter()
    total = 0
    if progress:  # counted before the rendering thread starts: PDFium is never called from two threads at once
        total = sum(count_pages(s, opts.pages, opts.password) for s in sources)
        total -= sum(1 for e in index.entries.values() if e.get("status") == "ok")
        progress(0, max(total, 0), 0)

    def on_signal(signum, frame):
        if stop.signal:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        stop.signal = signum
        reader.stop_requested = True
        log(f"vl2: {signal.Signals(signum).name} received: finishing the pages in flight, then stopping")

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    q: queue.Queue = queue.Queue(maxsize=max(2, 2 * read_opts.batch_size))
    thread = threading.Thread(target=_producer, daemon=True,
                              args=(sources, root, index, opts, read_opts.text_layer != "off", q, stop,
                                    reader.loaded.cfg))
    thread.start()
    pending: list[tuple[str, Page]] = []
    try:
        finished = False
        while not finished:
            kind, a, b = q.get()
            if kind == "page":
                pending.append((a, b))
            elif kind == "error":
                summary.files_failed += 1
                summary.failures.append((display_path(a), b))
                log(f"vl2: {b}")
                index.add({"key": output_key(a, root), "source": display_path(a), "status": "failed", "error": b})
            elif kind == "end":
                finished = True
            if pending and (len(pending) >= read_opts.batch_size or finished):
                _process(reader, task, pending, read_opts, opts, index, summary, log)
                pending = []
            if progress and (not pending or kind in ("error", "end")):
                progress(summary.pages_done + summary.pages_failed + summary.files_failed, max(total, 0),
                         summary.generated_tokens)
            if stop.signal:
                break
        skipped = sum(1 for k, e in index.entries.items() if e.get("status") == "ok")
        summary.pages_skipped = max(0, skipped - summary.pages_done)
    finally:
        stop.abandoned = True
        while thread.is_alive():  # let a renderer blocked on a full queue see that nobody is reading
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        reader.stop_requested = False
    summary.interrupted_by = stop.signal
    summary.seconds = time.perf_counter() - started
    if opts.fmt == "jsonl":
        _write_jsonl(opts.out, index)
    return summary


def _process(reader: Reader, task: Task, pending, read_opts, opts, index: Index, summary: BatchSummary, log) -> None:
    records = reader.read(task, [p for _, p in pending], read_opts)
    for (key, page), record in zip(pending, records):
        if record["status"] == "interrupted":
            continue  # not written, not indexed: the rerun reads it again
        entry = {"key": key, "source": page.source, "page": page.number, "status": record["status"]}
        if record["status"] == "ok":
            try:
                entry["outputs"] = write_page(task, record, page, key, opts)
            except OutputError as exc:
                record = {**record, "status": "failed", "error": str(exc)}
                entry.update(status="failed", error=str(exc))
        if record["status"] != "ok":
            summary.pages_failed += 1
            entry["error"] = record.get("error", "")
            summary.failures.append((page.label, entry["error"]))
            log(f"vl2: {page.label}: {entry['error']}")
        else:
            summary.pages_done += 1
            summary.generated_tokens += record.get("generated_tokens", 0)
            if "repetition_loop" in record.get("flags", []):
                summary.loops_flagged += 1
            entry.update(flags=record.get("flags", []), seconds=record.get("seconds"),
                         prompt_tokens=record.get("prompt_tokens"), generated_tokens=record.get("generated_tokens"),
                         split=record.get("split"))
        index.add(entry)


def _write_jsonl(out: Path, index: Index) -> None:
    lines = []
    for _, entry in sorted(index.entries.items()):
        if entry.get("status") == "ok":
            for rel in entry.get("outputs", []):
                if rel.endswith(".json") and (out / rel).exists():
                    lines.append(json.dumps(json.loads((out / rel).read_text("utf-8")), ensure_ascii=False))
    atomic_write_text(out / "results.jsonl", "\n".join(lines) + ("\n" if lines else ""))
