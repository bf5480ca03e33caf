"""The reading pipeline and the folder sink: page keys, resume, redo, names, the lock, temp files, permissions."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import IMG, TINY, index_entries, vl2


def folder_sink(out: Path, task: str = "ocr", fmt: str = "markdown", text: str | None = None, model: str = "m"):
    from vl2cli.options import PageOptions, ReadOptions
    from vl2cli.pipeline import Job
    from vl2cli.sinks import FolderSink
    from vl2cli.tasks import get_task
    job = Job(get_task(task), ReadOptions(text=text), PageOptions(), fmt, model, "template")
    return FolderSink(out, job), job


def _two_folders(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "in", tmp_path / "in2"
    a.mkdir()
    b.mkdir()
    Image.open(IMG).save(a / "a.png")
    Image.open(IMG).rotate(90, expand=True).save(b / "b.png")
    return a, b


def test_a_rerun_with_another_task_writes_its_results_next_to_the_old_ones(tmp_path):
    src, _ = _two_folders(tmp_path)
    out = tmp_path / "out"
    assert vl2("batch", str(src), "--task", "ocr", "--out", str(out), "--no-strict", tokens=3).exit_code == 0
    table = vl2("batch", str(src), "--task", "table", "--out", str(out), "--json", "--no-strict", tokens=3)
    assert json.loads(table.stdout)["pages_done"] == 1  # not skipped: a table was never asked for
    assert (out / "a.png.p0001.ocr.md").exists() and (out / "a.png.p0001.table.json").exists()


def test_other_inputs_on_the_command_line_never_rename_or_reread_a_file(tmp_path):
    src, src2 = _two_folders(tmp_path)
    out = tmp_path / "out"
    assert vl2("batch", str(src), "--out", str(out), "--no-strict", tokens=3).exit_code == 0
    both = vl2("batch", str(src), str(src2), "--out", str(out), "--json", "--no-strict", tokens=3)
    summary = json.loads(both.stdout)
    assert summary["pages_skipped"] == 1 and summary["pages_done"] == 1
    assert sorted(p.name for p in out.glob("*.md")) == ["a.png.ocr.md", "a.png.p0001.ocr.md", "b.png.ocr.md",
                                                         "b.png.p0001.ocr.md"]
    assert not (out / "in").exists()


def test_another_query_into_the_same_folder_lands_beside_the_first(tmp_path):
    out = tmp_path / "b"
    assert vl2("ground", IMG, "the red circle", "--out", str(out), "--no-strict", tokens=3).exit_code == 0
    blue = vl2("ground", IMG, "the blue square", "--out", str(out), "--no-strict", tokens=3)
    assert blue.exit_code == 0, blue.output
    records = sorted(out.glob("note_300x200.png.p0001.ground*.json"))
    assert len(records) == 2
    assert {json.loads(p.read_text())["question"] for p in records} == {"the red circle", "the blue square"}
    same = vl2("ground", IMG, "the blue square", "--out", str(out), "--json", "--no-strict", tokens=3)
    assert json.loads(same.stdout)["pages_skipped"] == 1


def test_a_setting_that_changes_the_answer_changes_the_key(tmp_path):
    from vl2cli.options import PageOptions, ReadOptions
    from vl2cli.pages import Source
    from vl2cli.pipeline import Job
    from vl2cli.tasks import get_task
    source = Source("a.png", "a.png", digest="abc")

    def key(**changes) -> str:
        read = ReadOptions(**{k: v for k, v in changes.items() if k in ReadOptions.__dataclass_fields__})
        pages = PageOptions(dpi=changes.get("dpi", 144))
        job = Job(get_task(changes.get("task", "ocr")), read, pages, changes.get("fmt", "markdown"),
                  changes.get("model", "m"), changes.get("template", "t"))
        return job.page_key(source, changes.get("page", 1))
    base = key()
    assert base == key()
    for change in ({"task": "table", "fmt": "json"}, {"fmt": "text"}, {"model": "other"}, {"template": "u"},
                   {"temperature": 0.5}, {"split": "never"}, {"text_layer": "hint"}, {"dpi": 200}, {"page": 2},
                   {"max_new_tokens": 10}):
        assert key(**change) != base, change
    assert Job(get_task("ocr"), ReadOptions(), PageOptions(), "markdown", "m", "t").page_key(
        Source("b.png", "b.png", digest="xyz"), 1) != base  # other bytes


def test_redo_failed_and_all(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.open(IMG).save(src / "a.png")
    (src / "broken.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "out"
    first = vl2("batch", str(src), "--out", str(out), "--json", "--no-strict", tokens=3)
    assert first.exit_code == 1 and json.loads(first.stdout)["files_failed"] == 1
    again = json.loads(vl2("batch", str(src), "--out", str(out), "--json", "--no-strict", tokens=3).stdout)
    assert again["pages_skipped"] == 2 and again["files_failed"] == 0  # failures are remembered too
    failed = json.loads(vl2("batch", str(src), "--out", str(out), "--json", "--redo", "failed", tokens=3).stdout)
    assert failed["files_failed"] == 1 and failed["pages_skipped"] == 1
    everything = json.loads(vl2("batch", str(src), "--out", str(out), "--json", "--redo", "all", tokens=3).stdout)
    assert everything["pages_done"] == 1 and everything["files_failed"] == 1


def test_different_piped_images_are_different_inputs(tmp_path):
    out = tmp_path / "out"
    for color in ("white", "black"):
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), color).save(buf, format="PNG")
        result = vl2("ocr", "-", "--out", str(out), "--json", stdin=buf.getvalue(), tokens=2)
        assert json.loads(result.stdout)["pages_done"] == 1, result.output
    assert len(list(out.glob("stdin-*.p0001.ocr.md"))) == 2


def test_outputs_get_normal_permissions_and_only_vl2_temp_files_are_removed(tmp_path):
    out = tmp_path / "out"
    (out / "mine").mkdir(parents=True)
    (out / "mine" / ".notes.part").write_text("the user's own file")
    (out / ".vl2-x.md.abc.part").write_text("a temp file a killed run left")
    assert vl2("ocr", IMG, "--out", str(out), tokens=2).exit_code == 0
    assert (out / "mine" / ".notes.part").exists() and not (out / ".vl2-x.md.abc.part").exists()
    mode = stat.S_IMODE((out / "note_300x200.png.p0001.ocr.md").stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask == stat.S_IMODE((out / "index.jsonl").stat().st_mode)


def test_a_second_run_on_the_same_folder_refuses_at_once(tmp_path):
    from vl2cli.errors import OutputBusy
    sink, _ = folder_sink(tmp_path)
    with pytest.raises(OutputBusy, match="another vl2 run"):
        folder_sink(tmp_path)
    result = vl2("ocr", IMG, "--out", str(tmp_path), tokens=2)
    assert result.exit_code == 1 and f"pid {os.getpid()}" in result.stderr
    sink.close([])
    assert not (tmp_path / ".vl2.lock").exists()  # the lock file goes with the run
    (tmp_path / ".vl2.lock").write_text("999999999\n")  # what a killed run leaves: a dead pid, no lock held
    assert vl2("ocr", IMG, "--out", str(tmp_path), tokens=2).exit_code == 0  # taken over
    assert not (tmp_path / ".vl2.lock").exists()


def test_a_lock_file_removed_while_a_run_waits_to_lock_it_is_not_shared(tmp_path, monkeypatch):
    """Release removes the file while still holding it; a run that opened the old file just before must not
    believe it holds the folder (it would share it with the next run, which creates a new file)."""
    import fcntl

    from vl2cli.sinks import FolderLock
    first = FolderLock(tmp_path)
    real_flock = fcntl.flock

    def flock_after_release(fd, op):  # the second run opened the file; the first releases before it locks
        if first.fd >= 0:
            first.release()
        return real_flock(fd, op)
    monkeypatch.setattr(fcntl, "flock", flock_after_release)
    second = FolderLock(tmp_path)
    monkeypatch.setattr(fcntl, "flock", real_flock)
    assert os.fstat(second.fd).st_ino == os.stat(tmp_path / ".vl2.lock").st_ino  # it locked the file now named
    from vl2cli.errors import OutputBusy
    with pytest.raises(OutputBusy):
        FolderLock(tmp_path)
    second.release()


@pytest.mark.slow
def test_two_concurrent_batches_lose_nothing_and_read_no_page_twice(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        Image.open(IMG).rotate(i * 10).save(src / f"p{i}.png")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "vl2cli.cli", "batch", str(src), "--out", str(out), "--model", TINY,
           "--max-new-tokens", "30", "--batch-size", "1", "--split", "never", "-q"]
    first = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    codes = [first.wait(timeout=300), second.wait(timeout=300)]
    errors = first.stderr.read() + second.stderr.read()  # type: ignore[union-attr]
    assert sorted(codes) in ([0, 0], [0, 1]), errors  # the loser either waited for nothing or refused clearly
    if 1 in codes:
        assert "another vl2 run" in errors
    ok = [e["key"] for e in index_entries(out) if e["status"] == "ok"]
    assert len(ok) == len(set(ok)) == 4


def test_stdout_gets_page_separators_and_json_is_one_list(tmp_path):
    from testkit import text_pdf
    pdf = tmp_path / "d.pdf"
    pdf.write_bytes(text_pdf("x", pages=2))
    md = vl2("ocr", str(pdf), "--split", "never", tokens=2)
    assert md.exit_code == 0, md.output
    assert md.stdout.count("<!-- page ") == 2 and "<!-- page 2: " in md.stdout
    js = vl2("ocr", str(pdf), IMG, "-f", "json", "--split", "never", tokens=2)
    assert [r["page"] for r in json.loads(js.stdout)] == [1, 2, 1]


def test_pages_past_the_end(tmp_path):
    from testkit import text_pdf
    pdf = tmp_path / "d.pdf"
    pdf.write_bytes(text_pdf("x", pages=3))
    past = vl2("ocr", str(pdf), "--pages", "5", model="/nonexistent")
    assert past.exit_code == 2 and "d.pdf: --pages 5 asks for pages past the end; it has 3 pages" in past.stderr
    clipped = vl2("ocr", str(pdf), "--pages", "2-9", "-f", "json", "--split", "never", tokens=2)
    assert [r["page"] for r in json.loads(clipped.stdout)] == [2, 3]
    assert "d.pdf has 3 pages: --pages 2-9 reads pages 2-3" in clipped.stderr


def test_one_bad_png_never_stops_the_next_file(tmp_path):
    bad = tmp_path / "a.png"
    png = io.BytesIO()
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * 2_000_000, zip=True)  # a compressed text chunk over Pillow's limit
    Image.new("RGB", (40, 30)).save(png, format="PNG", pnginfo=info)
    bad.write_bytes(png.getvalue())
    result = vl2("ocr", str(bad), IMG, "-f", "json", "--split", "never", tokens=2)
    assert result.exit_code == 1, result.output
    assert [r["status"] for r in json.loads(result.stdout)] == ["failed", "ok"]
