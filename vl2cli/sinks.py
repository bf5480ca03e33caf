"""The folder sink: one file per page result (written atomically), index.jsonl, results.jsonl, whole documents.

A folder is written by one run at a time: a lock file (`.vl2.lock`, an OS lock that dies with its process,
kill -9 included; the file is removed at the run's end) makes a second concurrent run refuse at once. Only under
the lock are an earlier run's own temp files (`.vl2-*.part`) removed; nothing else in the folder is ever deleted.

Names stay readable: `<input name>.pNNNN.<task>.<ext>`. The index maps each page key (what determines the
result) to its files; a result asked for differently (another query, model or setting) whose plain name an
earlier result already holds gets `-<8 hex of its key>` added, so it lands next to the old one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vl2cli.errors import OutputBusy, OutputError, UsageError
from vl2cli.options import Redo
from vl2cli.results import PageResult, failed_page
from vl2cli.tasks import annotate
from vl2cli.writers import atomic_write_bytes, atomic_write_text, remove_own_temp_files

if TYPE_CHECKING:
    from vl2cli.pages import Page, Source
    from vl2cli.pipeline import Job, PageItem

INDEX_NAME, RESULTS_NAME, LOCK_NAME = "index.jsonl", "results.jsonl", ".vl2.lock"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_component(part: str, limit: int = 96) -> str:
    clean = _SAFE.sub("_", part).strip("._") or "_"
    if clean != part or len(clean) > limit:  # keep distinct names distinct after cleaning
        digest = hashlib.sha1(part.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        clean = f"{clean[:limit - 9]}-{digest}"
    return clean


def safe_name(name: str) -> str:
    """A relative output path from an input name: every part cleaned, never leaving the folder."""
    return "/".join(safe_component(p) for p in name.split("/") if p not in ("", ".", "..")) or "_"


def check_output_folder(out: Path) -> None:
    """Before any model loads: --out must be a folder vl2 can create and write."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is an existing file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create the output folder ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: output folder is not writable")


class FolderLock:
    """`.vl2.lock`: an flock held for the run and removed at its end. A file a killed run left (its pid dead) holds
    no lock: the next run takes it over. Removing the file on release is safe because a run that locked a file
    which was removed meanwhile sees that the path no longer names it and tries again."""

    def __init__(self, out: Path):
        import fcntl
        self.path = out / LOCK_NAME
        while True:
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputError(f"{self.path}: cannot create the lock file ({exc.strerror or exc})") from None
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(self.fd)
                raise OutputBusy(f"{out}: another vl2 run (pid {holder}) is writing there; wait for it to finish "
                                 "or choose another --out") from None
            if self._still_named():
                break
            os.close(self.fd)  # the run before removed it between our open and our lock: lock the new file
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def _still_named(self) -> bool:
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(self.fd)
        return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # still locked: no run can take this file between the unlink and the close
            os.close(self.fd)  # closing drops the lock
            self.fd = -1


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

    def add(self, entry: dict) -> None:
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                os.write(fd, line)  # one write per line: a kill leaves at most one torn last line
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write ({exc.strerror or exc})") from None
        self.entries[entry["key"]] = entry


class FolderSink:
    def __init__(self, out: Path, job: Job, redo: Redo = "none", boxes_png: bool = True, per_document: bool = False):
        check_output_folder(out)
        self.out, self.job, self.redo, self.boxes_png = out, job, redo, boxes_png
        self.per_document = per_document
        self.lock = FolderLock(out)
        remove_own_temp_files(out)
        self.index = Index(out)
        self.owner = {e["stem"]: k for k, e in self.index.entries.items() if isinstance(e.get("stem"), str)}
        self.settings = job.settings_digest()[:16]

    def done(self, item: PageItem) -> bool:
        entry = self.index.entries.get(item.key)
        if entry is None or self.redo == "all":
            return False
        if entry.get("status") == "failed":
            return self.redo != "failed"
        return entry.get("status") == "ok" and all((self.out / o).exists() for o in entry.get("outputs", []))

    def _stem(self, item: PageItem) -> str:
        name = safe_name(item.source.name or item.source.label)
        stem = f"{name}.p{item.number:04d}.{self.job.task.name}" if item.number else f"{name}.{self.job.task.name}"
        return self._claim(stem, item.key)

    def _claim(self, stem: str, key: str) -> str:
        """The plain stem for its first owner; anything else asked for under it gets `-<8 hex of its key>`."""
        if self.owner.get(stem, key) != key:
            stem = f"{stem}-{key[:8]}"
        self.owner[stem] = key
        return stem

    def emit(self, item: PageItem, result: PageResult, page: Page | None) -> PageResult:
        stem = self._stem(item)
        outputs: list[str] = []
        if result.ok:
            try:
                outputs = self._write(stem, result, page)
            except OutputError as exc:
                result = replace(result, status="failed", error=str(exc))
        self.index.add({"key": item.key, "stem": stem, "source": result.source, "page": result.page,
                        "task": result.task, "status": result.status, "outputs": outputs, "error": result.error,
                        "flags": list(result.flags), "seconds": round(result.seconds, 3),
                        "prompt_tokens": result.prompt_tokens, "generated_tokens": result.generated_tokens,
                        "split": result.to_json()["split"], "settings": self.settings})
        return result

    def _write(self, stem: str, result: PageResult, page: Page | None) -> list[str]:
        """One page's files, atomically; paths relative to --out."""
        task, fmt = self.job.task, self.job.fmt
        files: list[tuple[str, bytes]] = []
        if page is not None and result.fields.get("blocks"):
            result, figures = _crop_figures(stem, result, page)
            files += figures
        if fmt in task.text_formats:
            body = task.render(result, fmt, self.job.keep_furniture)
            if body.strip():  # no table found: no empty .csv, the record says so
                files.append((stem + task.extension(fmt), (body.rstrip("\n") + "\n").encode()))
        files.append((stem + ".json", (task.render(result, "json") + "\n").encode()))
        objects = result.fields.get("objects")
        if objects and page is not None and self.boxes_png:
            buf = io.BytesIO()
            annotate(page.as_given(), objects).save(buf, format="PNG")  # boxes are on the page as given
            files.append((stem + ".boxes.png", buf.getvalue()))
        for rel, data in files:
            self._check_inside(rel)
            atomic_write_bytes(self.out / rel, data)
        return [rel for rel, _ in files]

    def _check_inside(self, rel: str) -> None:
        target = (self.out / rel).resolve()
        if not str(target).startswith(str(self.out.resolve()) + os.sep):
            raise OutputError(f"{rel}: output path would leave {self.out}")

    def close(self, sources: list[Source]) -> list[str]:
        """Write the files that cover a whole run (results.jsonl, whole documents); release the lock."""
        written = []
        try:
            if self.job.task.whole_document:  # first: it may rewrite page records with the document's furniture
                written += [rel for s in sources if self._any_done(s) for rel in self._write_document(s)]
            if self.job.fmt == "jsonl":
                written.append(self._write_results(sources))
            if self.per_document:
                written += [rel for s in sources if self._any_done(s) for rel in self._write_merged(s)]
        finally:
            self.lock.release()
        return written

    def _any_done(self, source: Source) -> bool:
        return any((self._entry(source, n) or {}).get("status") == "ok" for n in source.numbers)

    def _entry(self, source: Source, number: int) -> dict[str, Any] | None:
        return self.index.entries.get(self.job.page_key(source, number))

    def _record(self, entry: dict[str, Any]) -> dict[str, Any] | None:
        rel = next((o for o in entry.get("outputs", []) if o.endswith(".json")), None)
        if entry.get("status") != "ok" or rel is None or not (self.out / rel).exists():
            return None
        return json.loads((self.out / rel).read_text("utf-8"))

    def _page_records(self, source: Source) -> Iterator[tuple[int, dict[str, Any] | None, dict[str, Any] | None]]:
        """Each planned page of a source: its number, its index entry and its record on disk (None when not done)."""
        for number in source.numbers:
            entry = self._entry(source, number)
            yield number, entry, (self._record(entry) if entry else None)

    def _write_whole(self, source: Source, ext: str, text: str) -> str:
        """A file for a whole document, `<name>.<task><ext>`, beside its pages' files."""
        # keyed like the document's page 0: two inputs of one name (a/letter.pdf, b/letter.pdf) get two files
        stem = f"{safe_name(source.name or source.label)}.{self.job.task.name}"
        rel = self._claim(stem, self.job.page_key(source, 0)) + ext
        self._check_inside(rel)
        atomic_write_text(self.out / rel, text)
        return rel

    def _write_results(self, sources: list[Source]) -> str:
        lines = [json.dumps(record, ensure_ascii=False) for source in sources
                 for _, _, record in self._page_records(source) if record is not None]
        atomic_write_text(self.out / RESULTS_NAME, "\n".join(lines) + ("\n" if lines else ""))
        return RESULTS_NAME

    def _write_merged(self, source: Source) -> list[str]:
        """extract --per document: one record for the document, from its pages' records on disk (resumed runs too);
        with -f csv also its row (header and one line), as the pages get theirs."""
        from vl2cli.extract import merged_result
        results = [PageResult(**_result_fields(record)) for _, _, record in self._page_records(source)
                   if record is not None]
        merged = merged_result(results)
        written = [self._write_whole(source, ".json", self.job.task.render(merged, "json") + "\n")]
        if self.job.fmt == "csv":
            written.append(self._write_whole(source, ".csv", self.job.task.csv_lines(  # type: ignore[attr-defined]
                [merged], self.job.read.schema_json)))
        return written

    def _write_document(self, source: Source) -> list[str]:
        """The pages of one document in order (vl2cli/document.py): furniture found across its pages (the pages'
        records and text files rewritten with it), then the whole-document text file, or its DoclingDocument."""
        from vl2cli.document import document_text, settle_furniture
        results, entries = [], []
        for number, entry, record in self._page_records(source):
            why = (entry or {}).get("error") or "not read yet"
            results.append(PageResult(**_result_fields(record)) if record is not None
                           else failed_page(source.label, number, self.job.task.name, why))
            entries.append(entry)
        settled = settle_furniture(results)
        for before, after, entry in zip(results, settled, entries):
            if after is not before and entry is not None:
                self._rewrite_page(entry, after)
        if self.job.fmt == "docling":
            from vl2cli.docling import docling_json
            return [self._write_whole(source, ".docling.json", docling_json(settled) + "\n")]
        if self.job.fmt in ("markdown", "text"):
            text = document_text(settled, self.job.fmt, self.job.keep_furniture)
            return [self._write_whole(source, self.job.task.extension(self.job.fmt), text)]
        return []

    def _rewrite_page(self, entry: dict[str, Any], result: PageResult) -> None:
        """A page's record and text file again, with what the whole document showed (its furniture)."""
        task = self.job.task
        for rel in entry.get("outputs", []):
            if rel.endswith(".json") and not rel.endswith(".docling.json"):
                atomic_write_text(self.out / rel, task.render(result, "json") + "\n")
            elif self.job.fmt in task.text_formats and rel.endswith(task.extension(self.job.fmt)):
                atomic_write_text(self.out / rel, task.render(result, self.job.fmt, self.job.keep_furniture).rstrip("\n")
                                  + "\n")


def _crop_figures(stem: str, result: PageResult, page: Page) -> tuple[PageResult, list[tuple[str, bytes]]]:
    """Figure blocks with a box (DeepSeek-OCR's) cut from the page as `<stem>.figN.png`; each block then names its file."""
    blocks: list[dict] = []
    files: list[tuple[str, bytes]] = []
    image = page.as_given()  # the blocks' boxes are on the page as given
    for block in result.fields["blocks"]:
        box = block.get("box")
        if block.get("label") == "figure" and box and box[2] > box[0] and box[3] > box[1]:
            rel = f"{stem}.fig{len(files) + 1}.png"
            buf = io.BytesIO()
            image.crop(tuple(box)).save(buf, format="PNG")
            files.append((rel, buf.getvalue()))
            block = {**block, "figure": rel.rsplit("/", 1)[-1]}  # beside the page's files
        blocks.append(block)
    return replace(result, fields={**result.fields, "blocks": blocks}), files


def _result_fields(record: dict[str, Any]) -> dict[str, Any]:
    """A record read back from disk as PageResult arguments (the text renderings need answer and fields)."""
    from vl2cli.results import TASK_FIELDS, Split
    common = {k: record[k] for k in ("source", "page", "task", "status", "question", "width", "height", "answer",
                                     "finish_reason", "prompt_tokens", "generated_tokens", "retry_temperature",
                                     "seconds", "error", "grammar")}
    split = record.get("split")
    return {**common, "flags": tuple(record.get("flags", ())), "split": Split(**split) if split else None,
            "rotation": record.get("rotation", 0), "rotation_source": record.get("rotation_source"),
            "fields": {k: record.get(k, default) for k, default in TASK_FIELDS.get(record["task"], {}).items()}}


def write_answer(out: Path, sources: list[Source], record: dict) -> Path:
    """`ask --out`: `<first input>.ask-<digest of inputs and question>.json`, so another question never overwrites
    this one; the file written."""
    what = json.dumps([[s.digest for s in sources], record["question"]])
    path = out / f"{safe_name(sources[0].name or 'input')}.ask-{hashlib.sha256(what.encode()).hexdigest()[:8]}.json"
    atomic_write_text(path, json.dumps(record, ensure_ascii=False, indent=1) + "\n")
    return path
