"""Hostile and broken inputs, interruption by real signals, runaway generation and out-of-memory."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image
from testkit import encrypted_pdf, read_pages, text_pdf
from typer.testing import CliRunner

from tests.helpers import CKPT, IMG, PARITY
from vl2cli.cli import app
from vl2cli.pages import display_path

TINY = str(CKPT / "tiny")
CORPUS_STATS = {"files tried": 0, "handled cleanly": 0, "outputs lost": 0}


def _png_with_size(path: Path, w: int, h: int) -> None:
    """A PNG whose header claims w x h (a decompression bomb when large)."""
    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data[16:29]
    ihdr[0:8] = struct.pack(">II", w, h)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


def make_corpus(folder: Path) -> dict[str, str]:
    """name -> 'ok' or the words the error line must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    good = Image.open(PARITY / "images" / "note_300x200.png")
    cases = {}
    (folder / "empty.pdf").write_bytes(b"")
    cases["empty.pdf"] = "empty"
    full = text_pdf("hello", pages=2)
    (folder / "truncated.pdf").write_bytes(full[: len(full) // 3])
    cases["truncated.pdf"] = "PDF"
    (folder / "random.pdf").write_bytes(os.urandom(3000))
    cases["random.pdf"] = "not a readable image"
    (folder / "random.png").write_bytes(os.urandom(3000))
    cases["random.png"] = "not a readable image"
    (folder / "random.jpg").write_bytes(b"\xff\xd8\xff" + os.urandom(500))
    cases["random.jpg"] = "image"
    (folder / "text.png").write_text("this is just text\n" * 10)
    cases["text.png"] = "not a readable image"
    Image.new("RGB", (1, 1)).save(folder / "one.png")
    cases["one.png"] = "too small"
    _png_with_size(folder / "bomb.png", 30000, 30000)
    cases["bomb.png"] = "decompression bomb"
    Image.new("I;16", (64, 48), 40000).save(folder / "deep16.png")
    cases["deep16.png"] = "ok"
    good.convert("CMYK").save(folder / "cmyk.jpg")
    cases["cmyk.jpg"] = "ok"
    good.convert("P").save(folder / "palette.png")
    cases["palette.png"] = "ok"
    good.convert("RGBA").save(folder / "alpha.png")
    cases["alpha.png"] = "ok"
    frames = [good.convert("P"), good.rotate(90).convert("P")]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    cases["anim.gif"] = "ok"
    frames[0].convert("RGB").save(folder / "anim.webp", save_all=True, append_images=[frames[1].convert("RGB")])
    cases["anim.webp"] = "ok"
    (folder / "good.pdf").write_bytes(text_pdf("fine", pages=2))
    cases["good.pdf"] = "ok"
    long_name = "l" * 200 + ".png"
    good.save(folder / long_name)
    cases[long_name] = "ok"
    odd = os.fsdecode(b"caf\xe9-latin1.png")
    good.save(folder / odd)
    cases[odd] = "ok"
    Image.new("RGB", (600, 2), "white").save(folder / "flat.png")  # bands of height 0 once crashed the run
    cases["flat.png"] = "ok"
    Image.new("RGB", (2, 20000), "white").save(folder / "strip.png")  # once a 2.6-gigapixel density estimate
    cases["strip.png"] = "ok"
    (folder / "flat.pdf").write_bytes(text_pdf("x", page_size=(14400, 1)))
    cases["flat.pdf"] = "ok"  # 28800 x 2 px at 144 DPI: read, never a crash
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * 2_000_000, zip=True)  # a compressed text chunk over Pillow's limit
    good.save(folder / "textchunk.png", pnginfo=info)
    cases["textchunk.png"] = "not a readable image"
    return cases


def test_bad_inputs_never_crash_the_batch(tmp_path):
    cases = make_corpus(tmp_path / "in")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["batch", str(tmp_path / "in"), "--out", str(out), "--model", TINY,
                                      "--max-new-tokens", "3", "--split", "never", "--json"])
    assert result.exit_code == 1, result.output  # some failed
    assert "Traceback" not in result.output
    assert " at 0x" not in result.stderr and "<_io." not in result.stderr  # the problem in words, no Python reprs
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    by_source: dict[str, list] = {}
    for e in index:
        by_source.setdefault(Path(e["source"]).name, []).append(e)
    lost = 0
    for name, expect in cases.items():
        name = display_path(name)
        entries = by_source.get(name)
        assert entries, f"{name} missing from the index"
        if expect == "ok":
            assert all(e["status"] == "ok" for e in entries), entries
            for e in entries:
                lost += sum(not (out / o).exists() for o in e["outputs"])
        else:
            assert entries[0]["status"] == "failed"
            assert expect.lower() in entries[0]["error"].lower(), (name, entries[0]["error"])
            assert name in entries[0]["error"] or "stdin" in entries[0]["error"]
            line = [ln for ln in result.stderr.splitlines() if name[:40] in ln]
            assert len(line) >= 1
    assert len(by_source["good.pdf"]) == 2 and len(by_source["anim.gif"]) == 1
    assert not list(out.rglob("*.part"))
    rerun = CliRunner().invoke(app, ["batch", str(tmp_path / "in"), "--out", str(out), "--model", TINY,
                                     "--max-new-tokens", "3", "--split", "never", "--json"])
    summary = json.loads(rerun.stdout)  # the rerun reads nothing again: done and failed pages are remembered
    assert summary["pages_done"] == summary["pages_failed"] == summary["files_failed"] == 0, summary
    CORPUS_STATS["files tried"] += len(cases)
    CORPUS_STATS["handled cleanly"] += len(cases)
    CORPUS_STATS["outputs lost"] += lost
    assert lost == 0


@pytest.mark.parametrize("revision", [2, 6])  # RC4 (older PDFs), AES-256 (what current tools write)
def test_encrypted_pdf_needs_the_right_password(tmp_path, revision):
    pdf = tmp_path / "locked.pdf"
    pdf.write_bytes(encrypted_pdf("Secret invoice 99", "s3cret", revision=revision))
    base = ["ocr", str(pdf), "--model", TINY, "--text-layer", "only", "--json"]
    missing = CliRunner().invoke(app, base)
    assert missing.exit_code == 1 and "locked.pdf: the PDF is encrypted; pass --password" in missing.stderr
    wrong = CliRunner().invoke(app, [*base, "--password", "nope"])
    assert wrong.exit_code == 1 and "locked.pdf: the --password is wrong" in wrong.stderr
    right = CliRunner().invoke(app, [*base, "--password", "s3cret"])
    assert right.exit_code == 0, right.output
    assert "Secret invoice 99" in json.loads(right.stdout)[0]["answer"]


def test_thousand_page_pdf_streams_through_the_pipeline_in_flat_memory(tmp_path, reader):
    """`vl2cli.read` (the CLI's pipeline: plan, one rendering thread that tiles ahead, the reader, the sink) holds a
    page only while it is read: reading 1000 pages (their text layers, so no model time) peaks at about the memory a
    few pages take, measured from before the read (a renderer running ahead, or a page kept after its record, would
    hold 1000 pages: 250 MB at 30 DPI, more with their tiles)."""
    import threading

    import psutil

    import vl2cli
    pdf = tmp_path / "long.pdf"
    pdf.write_bytes(text_pdf("line of a very long report", pages=1000))
    options = vl2cli.ReadOptions(text_layer="only")

    def read(pages: str) -> list:
        return vl2cli.read(reader, [str(pdf)], options=options,
                           page_options=vl2cli.PageOptions(pages=pages, dpi=30, text_layer=True))
    assert len(read("1-20")) == 20  # warm: PDFium, the tiler and the pipeline's threads have run once
    proc = psutil.Process()
    before, peak, reading = proc.memory_info().rss, 0, True

    def sample() -> None:
        nonlocal peak
        while reading:
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.005)
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        results = read("1-1000")
    finally:
        reading = False
        sampler.join()
    assert [r.page for r in results] == list(range(1, 1001))
    assert all(r.ok and r.finish_reason == "text_layer" and r.answer.endswith(f" p{r.page}") for r in results), results[0]
    assert peak - before < 40 * 1024**2, (before, peak)


def test_full_disk_fails_the_write_and_keeps_the_old_file(tmp_path, monkeypatch):
    import errno

    from vl2cli.errors import OutputError
    from vl2cli.writers import atomic_write_text
    target = tmp_path / "page.md"
    atomic_write_text(target, "finished page\n")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OutputError, match=r"page\.md: cannot write \(No space left on device\)"):
        atomic_write_text(target, "new text")
    assert target.read_text() == "finished page\n"
    assert [p.name for p in tmp_path.iterdir()] == ["page.md"]  # no temp file left behind


def test_full_disk_in_a_batch_fails_pages_not_the_run(tmp_path, monkeypatch):
    import errno
    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        Image.open(PARITY / "images" / "note_300x200.png").save(src / f"p{i}.png")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", no_space)
    result = CliRunner().invoke(app, ["batch", str(src), "--out", str(tmp_path / "out"), "--model", TINY,
                                      "--max-new-tokens", "2", "--json"])
    assert result.exit_code == 1
    assert "No space left on device" in result.output and "Traceback" not in result.output


def test_folders_and_broken_links_given_as_files(tmp_path):
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "gone.png").symlink_to(tmp_path / "missing.png")
    for name, code, words in (("dir.png", 2, "the folder holds no PDF or image files"), ("gone.png", 2, "no such file")):
        result = CliRunner().invoke(app, ["ocr", str(tmp_path / name), "--model", TINY])
        assert result.exit_code == code and f"{name}: {words}" in result.stderr


def test_output_folder_that_cannot_be_created_fails_cleanly(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(app, ["ocr", str(PARITY / "images" / "note_300x200.png"), "--model", TINY,
                                      "--out", str(blocker / "sub"), "--max-new-tokens", "2"])
    assert result.exit_code == 1 and "vl2: error:" in result.output and "Traceback" not in result.output
    assert "Loading" not in result.output  # found before the model loads


def test_runaway_loop_is_stopped_retried_and_flagged(reader, page_image, monkeypatch):
    from vl2cli.engine import scheduler
    from vl2cli.options import LOOP_RETRY_TEMPERATURES, ReadOptions
    from vl2cli.pages import Page
    from vl2cli.tasks import get_task
    temps = []
    original = scheduler.LocalBatch.add

    def spy(self, request):
        if request.params.temperature > 0:  # a re-read (the first read is greedy)
            temps.append(request.params.temperature)
            time.sleep(1.0)  # a retry that takes time: the page's seconds must count it
        return original(self, request)
    monkeypatch.setattr(scheduler.LocalBatch, "add", spy)
    import time
    started = time.perf_counter()
    result = read_pages(reader, get_task("ocr"), [Page("p.png", 1, page_image)], ReadOptions(max_new_tokens=400,
                                                                                      split="never"))[0]
    wall = time.perf_counter() - started
    assert result.generated_tokens < 120  # stopped early, not at the 400-token budget
    assert temps and all(t <= 0.7 for t in temps)  # the greedy read looped: re-read at rising temperatures
    # seconds: the wall time of the page's own requests, retries included (all but tiling the page and parsing)
    assert wall - 1.0 <= result.seconds <= wall, (result.seconds, wall)
    assert temps == list(LOOP_RETRY_TEMPERATURES)[:len(temps)]
    if result.finish_reason == "loop":
        assert "repetition_loop" in result.flags


def _oom_in_moe(monkeypatch, fails_when):
    """A simulated CUDA out-of-memory inside the model (MoE.forward), where a real one would strike."""
    import torch

    from vl2cli.engine import moe
    real = moe.MoE.forward

    def forward(self, x):
        if fails_when(x):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, x)
    monkeypatch.setattr(moe.MoE, "forward", forward)


def test_out_of_memory_halves_batch_then_chunks_then_fails_one_page(reader, page_image, monkeypatch):
    from vl2cli.options import ReadOptions
    from vl2cli.pages import Page
    from vl2cli.tasks import get_task
    seen = []
    _oom_in_moe(monkeypatch, lambda x: seen.append((x.shape[0], reader.engine.prefill_chunk)) or x.shape[0] > 1)
    pages = [Page("a.png", i, page_image) for i in range(1, 5)]
    results = read_pages(reader, get_task("ocr"), pages, ReadOptions(max_new_tokens=2, split="never", batch_size=4))
    assert all(r.ok for r in results)
    assert seen[0] == (4, None) and (2, None) in seen and (1, None) in seen
    _oom_in_moe(monkeypatch, lambda x: True)
    results = read_pages(reader, get_task("ocr"), pages[:2], ReadOptions(max_new_tokens=2, split="never"))
    assert [r.status for r in results] == ["failed", "failed"]
    assert "out of memory even at batch 1 with chunked prefill" in (results[0].error or "")


def test_out_of_memory_frees_the_failed_attempt_before_retrying(reader, page_image, monkeypatch):
    """The failed attempt's KV cache must be dead before the retry allocates its own (else empty_cache frees
    nothing and the retry runs out of memory too): the retry happens outside the except block."""
    import weakref

    from vl2cli.engine import cache as cache_module
    from vl2cli.options import ReadOptions
    from vl2cli.pages import Page
    from vl2cli.tasks import get_task
    caches: list[weakref.ref] = []
    alive_at_retry: list[int] = []
    real_init = cache_module.KVCache.__init__

    def tracking_init(self, cfg, batch, *args, **kwargs):
        if batch < 4:  # a retry is allocating: how many batch-4 caches are still alive?
            alive_at_retry.append(sum(1 for ref in caches if ref() is not None))
        real_init(self, cfg, batch, *args, **kwargs)
        if batch == 4:
            caches.append(weakref.ref(self))
    monkeypatch.setattr(cache_module.KVCache, "__init__", tracking_init)
    _oom_in_moe(monkeypatch, lambda x: x.shape[0] == 4)
    pages = [Page("a.png", i, page_image) for i in range(1, 5)]
    results = read_pages(reader, get_task("ocr"), pages, ReadOptions(max_new_tokens=2, split="never", batch_size=4))
    assert all(r.ok for r in results) and caches and alive_at_retry
    assert alive_at_retry == [0] * len(alive_at_retry)


def test_any_error_while_generating_fails_only_its_page(reader, page_image, monkeypatch):
    from vl2cli.engine.vl2 import vision
    from vl2cli.options import ReadOptions
    from vl2cli.pages import Page
    from vl2cli.tasks import get_task
    real = vision.VisionTower.forward
    poisoned = page_image.copy()
    poisoned.putpixel((0, 0), (1, 2, 3))

    def forward(self, pixels):
        if pixels.shape[0] > 0 and any(abs(float(t[0, 0, 0]) - (-0.9921568)) < 1e-4 for t in pixels):
            raise ValueError("a bug only this page triggers")
        return real(self, pixels)
    monkeypatch.setattr(vision.VisionTower, "forward", forward)
    pages = [Page("a.png", 1, page_image), Page("b.png", 1, Image.new("RGB", (400, 300), (1, 2, 3))),
             Page("c.png", 1, page_image)]
    results = read_pages(reader, get_task("ocr"), pages, ReadOptions(max_new_tokens=2, split="never", batch_size=3))
    assert [r.status for r in results] == ["ok", "failed", "ok"]
    assert "a bug only this page triggers" in (results[1].error or "")


@pytest.mark.parametrize("where", ["engine step", "prompt"])
def test_where_a_page_failed_is_shown_with_v_and_only_then(monkeypatch, where):
    """The record says "run with -v for details": -v shows the traceback of what raised (the engine step, or the
    page's prompt before any step), on stderr; without it the one-line error is all."""
    from tests.helpers import vl2
    from vl2cli.engine.vl2 import processor, vision

    def forward(self, *args, **kwargs):
        raise ValueError("a bug in the vision tower")
    if where == "engine step":
        monkeypatch.setattr(vision.VisionTower, "forward", forward)
    else:
        monkeypatch.setattr(processor.Processor, "prepare_prompt", forward)
    for verbose in (False, True):
        result = vl2("ocr", IMG, "--split", "never", "--json", *(["-v"] if verbose else []), tokens=2)
        assert result.exit_code == 1, result.output
        [record] = json.loads(result.stdout)
        assert record["status"] == "failed" and "run with -v for details" in record["error"]
        assert "ValueError: a bug in the vision tower" in result.stderr
        where = [line for line in result.stderr.splitlines() if line.strip().startswith('File "')]
        assert ("Traceback (most recent call last)" in result.stderr) is verbose
        assert any("test_reliability.py" in line and "in forward" in line for line in where) is verbose
        assert "Traceback" not in json.dumps(record)  # the record keeps its documented one-line error


def test_output_names_never_escape_out():
    from vl2cli.sinks import safe_name
    for source in ["../../etc/passwd", "/abs/../x.pdf", "a/../../b.png", "..", "con:\x00.png"]:
        name = safe_name(source)
        assert ".." not in name.split("/") and not name.startswith("/")


def _batch_cmd(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "vl2cli.cli", "batch", str(src), "--out", str(out), "--model", TINY,
            "--max-new-tokens", "40", "--batch-size", "1", "--split", "never", "-q"]


def _corpus_of_pages(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    img = Image.open(PARITY / "images" / "page_1000x700.png")
    for i in range(n):
        img.save(folder / f"page{i:03d}.png")


def _wait_for_index(out: Path, lines: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        index = out / "index.jsonl"
        if index.exists() and len(index.read_text().splitlines()) >= lines:
            return
        time.sleep(0.05)
    raise AssertionError("the batch made no progress")


def _check_resume(src: Path, out: Path, n: int) -> None:
    rerun = subprocess.run(_batch_cmd(src, out), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    entries = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines() if line.strip()]
    ok = [e["key"] for e in entries if e["status"] == "ok"]
    assert len(ok) == len(set(ok)) == n  # every page once: nothing redone, nothing duplicated
    for e in entries:
        for rel in e["outputs"]:
            assert (out / rel).read_text().endswith("\n")
    assert not list(out.rglob("*.part"))


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_cleanly_and_rerun_resumes(tmp_path, sig, code):
    src, out, n = tmp_path / "in", tmp_path / "out", 12
    _corpus_of_pages(src, n)
    proc = subprocess.Popen(_batch_cmd(src, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_index(out, 2)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    done = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert 2 <= len(done) < n and all(e["status"] == "ok" for e in done)
    for e in done:
        assert all((out / rel).exists() for rel in e["outputs"])
    assert "finishing the pages in flight" in stderr
    assert f"{len(done)} pages finished, {n - len(done)} left; rerun the same command to resume" in stderr
    _check_resume(src, out, n)


@pytest.mark.slow
def test_a_signal_finishes_the_page_in_flight(tmp_path):
    """The page being generated when SIGTERM arrives is finished and written, not dropped."""
    src, out, n = tmp_path / "in", tmp_path / "out", 4
    _corpus_of_pages(src, n)
    cmd = [*_batch_cmd(src, out), "--max-new-tokens", "400"]  # long answers: the signal lands mid-generation
    cmd = [c for c in cmd if c != "-q"] + ["-v"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "VL2_DRAIN_SECONDS": "120"})
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:  # -v says when a batch starts: its page is then in flight
        seen.append(line)
        if line.startswith("vl2: reading "):
            break
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=300)
    stderr = "".join(seen) + rest
    assert proc.returncode == 143, stderr
    done = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert len(done) >= 1 and all(e["status"] == "ok" for e in done), stderr


@pytest.mark.slow
def test_kill_9_mid_run_loses_nothing_finished(tmp_path):
    src, out, n = tmp_path / "in", tmp_path / "out", 12
    _corpus_of_pages(src, n)
    proc = subprocess.Popen(_batch_cmd(src, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_index(out, 3)
    proc.kill()
    proc.wait(timeout=60)
    _check_resume(src, out, n)


def test_index_torn_by_a_kill_is_repaired_before_appending(tmp_path):
    from vl2cli.sinks import Index
    good = json.dumps({"key": "a.p0001", "status": "ok", "outputs": []})
    (tmp_path / "index.jsonl").write_text(good + "\n" + '{"key": "a.p0002", "sta')
    index = Index(tmp_path)
    assert set(index.entries) == {"a.p0001"}
    index.add({"key": "a.p0002", "status": "ok", "outputs": []})
    assert set(Index(tmp_path).entries) == {"a.p0001", "a.p0002"}


def test_unreadable_file_and_read_only_output_are_reported(tmp_path, monkeypatch):
    """Root reads anything, so permission errors are injected where the OS would raise them."""
    import builtins
    secret = tmp_path / "secret.png"
    Image.open(PARITY / "images" / "note_300x200.png").save(secret)
    real_open = builtins.open

    def guarded(path, *args, **kwargs):
        if str(path) == str(secret):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", guarded)
    result = CliRunner().invoke(app, ["ocr", str(secret), IMG, "--model", TINY, "--max-new-tokens", "2", "--json"])
    assert result.exit_code == 1 and "secret.png: cannot read (Permission denied)" in result.stderr
    assert [r["status"] for r in json.loads(result.stdout)] == ["failed", "ok"]
    monkeypatch.setattr(builtins, "open", real_open)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    result = CliRunner().invoke(app, ["batch", str(secret), "--out", str(tmp_path / "ro"), "--model", TINY])
    assert result.exit_code == 1 and "output folder is not writable" in result.stderr
